package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// A connection to a sidecar dialled again resumes the TLS session of the
// last one, and is still judged against the current policy at its
// handshake: resumption skips certificates and signatures, not the
// authorization. A new SVID starts over with full handshakes.
func TestOutboundResumesAndStillAuthorizes(t *testing.T) {
	env := newPairEnv(t, okHandler(), nil, controlplanev1.Protocol_PROTOCOL_HTTP)
	rc := dialRaw(t, env.upAddr)
	call := func() int {
		t.Helper()
		resp, _ := rc.do(t, "GET / HTTP/1.1\r\nHost: backend\r\n\r\n")
		return resp.StatusCode
	}
	// inbound returns the backend sidecar's open connections' states, and
	// closeInbound closes them (the pooled connection on the frontend goes
	// with them, so its next request dials).
	inbound := func() []tls.ConnectionState {
		env.back.in.mu.Lock()
		defer env.back.in.mu.Unlock()
		var out []tls.ConnectionState
		for c := range env.back.in.conns {
			out = append(out, c.ConnectionState())
		}
		return out
	}
	closeInbound := func() {
		env.back.in.mu.Lock()
		for c := range env.back.in.conns {
			c.Close()
		}
		env.back.in.mu.Unlock()
		deadline := time.Now().Add(5 * time.Second)
		for len(inbound()) > 0 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
	}
	resumed := func() bool {
		t.Helper()
		cs := inbound()
		if len(cs) != 1 {
			t.Fatalf("backend sidecar holds %d connections, want 1", len(cs))
		}
		if len(cs[0].PeerCertificates) == 0 {
			t.Fatal("a connection without the caller's certificates")
		}
		return cs[0].DidResume
	}

	if code := call(); code != http.StatusOK {
		t.Fatalf("first call: %d", code)
	}
	if resumed() {
		t.Fatal("the first connection resumed a session")
	}
	closeInbound()
	if code := call(); code != http.StatusOK {
		t.Fatalf("call on a new connection: %d", code)
	}
	if !resumed() {
		t.Fatal("the second connection did a full handshake, want a resumed session")
	}
	for _, dir := range []string{"inbound", "outbound"} {
		m := env.front.metrics
		if dir == "inbound" {
			m = env.back.metrics
		}
		for _, resumed := range []string{"true", "false"} {
			var got dto.Metric
			if err := m.handshakes.WithLabelValues(dir, resumed).Write(&got); err != nil {
				t.Fatal(err)
			}
			if got.GetCounter().GetValue() != 1 {
				t.Errorf("%s handshakes with resumed=%s counted: %v, want 1", dir, resumed, got.GetCounter().GetValue())
			}
		}
	}

	// The frontend leaves the policy: its cached session does not let it
	// back in.
	env.back.in.setPolicy(compileAuthorization(&controlplanev1.Authorization{Deny: []*controlplanev1.AuthorizationRule{
		{Policy: "no-frontend", SpiffeIds: []string{"spiffe://strait.example/ns/default/sa/frontend"}}}}))
	closeInbound()
	if code := call(); code == http.StatusOK {
		t.Fatal("a caller denied by policy got through on a resumed session")
	}
	env.back.in.setPolicy(compileAuthorization(&controlplanev1.Authorization{}))
	if code := call(); code != http.StatusOK {
		t.Fatalf("call after the policy allows the frontend again: %d", code)
	}

	// A renewed SVID empties the cache: the next connection presents it.
	closeInbound()
	if err := env.front.creds.SetSVID(env.ca.SVID(t, "spiffe://strait.example/ns/default/sa/frontend", 2*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if code := call(); code != http.StatusOK {
		t.Fatalf("call after renewal: %d", code)
	}
	if resumed() {
		t.Error("a connection after the SVID changed resumed a session made with the old one")
	}
	if got, want := inbound()[0].PeerCertificates[0].SerialNumber, env.front.creds.SVID().Certificates[0].SerialNumber; got.Cmp(want) != 0 {
		t.Errorf("backend saw caller certificate %s, want the renewed %s", got, want)
	}
}

// A session whose peer chain this side no longer takes costs one more
// handshake, a full one, not a failed connect; the session is forgotten.
func TestDialRetriesARefusedResumptionInFull(t *testing.T) {
	c := catest.New(t, resumeTD)
	var handshakes atomic.Int32
	addr := resumeServer(t, c, func(tls.ConnectionState) error {
		handshakes.Add(1)
		return nil
	})
	creds := resumeClient(t, c)
	var refuseResumed atomic.Bool
	cfg := creds.ResumingClientTLS("backend-0", []string{alpnHTTP1}, func(cs tls.ConnectionState) error {
		if cs.DidResume && refuseResumed.Load() {
			return errors.New("not this session")
		}
		return nil
	})
	raw := func(ctx context.Context) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	}
	dial := func() *tls.Conn {
		return resumeDial(t, func() (*tls.Conn, error) { return dialTLS(context.Background(), raw, cfg, 5*time.Second) })
	}
	dial().Close()
	if tc := dial(); !tc.ConnectionState().DidResume {
		t.Fatal("second dial did not resume")
	} else {
		tc.Close()
	}
	refuseResumed.Store(true)
	before := handshakes.Load()
	tc := dial()
	defer tc.Close()
	if tc.ConnectionState().DidResume {
		t.Error("the connection made after a refused resumption is resumed")
	}
	if n := handshakes.Load() - before; n != 2 {
		t.Errorf("server saw %d handshakes, want the refused resumption and a full one", n)
	}

	// A session from a handshake that began before the SVID changed is
	// not kept: it would present the old SVID.
	slot := creds.sessions.endpoint("backend-1").bound()
	creds.sessions.reset()
	slot.Put("", new(tls.ClientSessionState))
	if creds.sessions.endpoint("backend-1").held() {
		t.Error("a session from an older generation was kept")
	}
	// Nor is one offered to a handshake bound before the change.
	creds.sessions.endpoint("backend-1").Put("", new(tls.ClientSessionState))
	late := creds.sessions.endpoint("backend-1").bound()
	creds.sessions.reset()
	creds.sessions.endpoint("backend-1").Put("", new(tls.ClientSessionState))
	if late.held() {
		t.Error("a handshake bound before the SVID changed is offered a session")
	}
	if full := creds.sessions.endpoint("backend-1").full(); full.held() {
		t.Error("a full handshake is offered a session")
	}
}

// Behind a gateway, the instance a connection reaches is the far gateway's
// pick, and each instance has its own ticket keys: a sidecar keeps a
// session per instance, by the tag the reply names it with, and resumes
// with whichever instance it reaches. Without tags (an older gateway) it
// keeps one session per endpoint, as before.
func TestTunnelledEndpointResumesWithEachInstance(t *testing.T) {
	c := catest.New(t, resumeTD)
	// Two instances, each with its own ticket keys (crypto/tls makes them
	// for each config).
	addrs := [2]string{resumeServer(t, c, nil), resumeServer(t, c, nil)}
	creds := resumeClient(t, c)
	o := &outbound{} // for dialPooled, the pools' dial: the tag under its tracking
	for _, mode := range []string{"tagged", "tagged, pooled", "untagged"} {
		cfg := creds.ResumingClientTLS("backend via gateway, "+mode, []string{alpnHTTP1}, func(tls.ConnectionState) error { return nil })
		raw := tunnelTo(addrs, mode != "untagged")
		dial := dialTLS
		if mode == "tagged, pooled" {
			dial = o.dialPooled
		}
		var resumed []bool
		for range 6 {
			tc := resumeDial(t, func() (*tls.Conn, error) { return dial(context.Background(), raw, cfg, 5*time.Second) })
			resumed = append(resumed, tc.ConnectionState().DidResume)
			tc.Close()
		}
		// The first dial may reach either instance (the far gateway's
		// pick); each is offered its own session from the third dial on.
		want := []bool{false, false, true, true, true, true}
		if mode == "untagged" {
			// Each instance is offered the other's session, which it
			// cannot open: every handshake is a full one.
			want = []bool{false, false, false, false, false, false}
		}
		if !slices.Equal(resumed, want) {
			t.Errorf("%s: resumed %v, want %v", mode, resumed, want)
		}
	}
}

// A resumption refused on one instance is retried in full on whichever
// instance the redial reaches, and the session it brings is kept for that
// instance: the refused one's is forgotten.
func TestRetryInFullKeepsTheSessionOfTheInstanceReached(t *testing.T) {
	c := catest.New(t, resumeTD)
	addrs := [2]string{resumeServer(t, c, nil), resumeServer(t, c, nil)}
	creds := resumeClient(t, c)
	var refuseResumed atomic.Bool
	cfg := creds.ResumingClientTLS("backend via gateway", []string{alpnHTTP1}, func(cs tls.ConnectionState) error {
		if cs.DidResume && refuseResumed.Load() {
			return errors.New("not this session")
		}
		return nil
	})
	raw := tunnelTo(addrs, true) // instance 0, 1, 0, 1, ...
	dial := func() *tls.Conn {
		return resumeDial(t, func() (*tls.Conn, error) { return dialTLS(context.Background(), raw, cfg, 5*time.Second) })
	}
	dial().Close() // instance 0: full
	dial().Close() // instance 1: full
	refuseResumed.Store(true)
	tc := dial() // instance 0 offered its session, refused; then instance 1 in full
	defer tc.Close()
	if tc.ConnectionState().DidResume {
		t.Fatal("the retry resumed")
	}
	slot := creds.sessions.endpoint(cfg.ClientSessionCache.(endpointSessions).key)
	if slot.on(tunnelTag(0)).held() {
		t.Error("instance 0 keeps the session it refused, or the retry's")
	}
	if !slot.on(tunnelTag(1)).held() {
		t.Error("instance 1 has no session")
	}
}

// A peer gateway that tags every reply anew, or a service of many
// instances, keeps at most instancesPerEndpoint sessions for one endpoint,
// so other endpoints' sessions stay.
func TestInstancesPerEndpointBounded(t *testing.T) {
	var s sessionCache
	other := s.endpoint("other")
	other.Put("", new(tls.ClientSessionState))
	e := s.endpoint("busy")
	for i := range 10 * instancesPerEndpoint {
		e.on(fmt.Sprint(i)).Put("", new(tls.ClientSessionState))
	}
	held := 0
	for i := range 10 * instancesPerEndpoint {
		if e.on(fmt.Sprint(i)).held() {
			held++
		}
	}
	if held != instancesPerEndpoint {
		t.Errorf("busy endpoint keeps %d instances' sessions, want %d", held, instancesPerEndpoint)
	}
	if !e.on(fmt.Sprint(10*instancesPerEndpoint - 1)).held() {
		t.Error("the newest instance's session went")
	}
	if !other.held() {
		t.Error("another endpoint's session was pushed out")
	}
}

// tunnelTo dials addrs in turn, as a peer gateway's round robin would
// pick instances, each connection tagged with its instance if tagged.
func tunnelTo(addrs [2]string, tagged bool) func(context.Context) (net.Conn, error) {
	var next atomic.Int32
	return func(ctx context.Context) (net.Conn, error) {
		i := int(next.Add(1)-1) % len(addrs)
		nc, err := (&net.Dialer{}).DialContext(ctx, "tcp", addrs[i])
		if err != nil || !tagged {
			return nc, err
		}
		return &tunnelledConn{TCPConn: nc.(*net.TCPConn), instance: tunnelTag(i)}, nil
	}
}

func tunnelTag(i int) string { return string([]byte{'i', byte(i)}) }

const resumeTD = "strait.example"

// resumeServer serves TLS 1.3 as default/backend of c's trust domain,
// with its own ticket keys, asking for any client certificate and judging
// each handshake by verify (nil: any). It writes a byte after the
// handshake (so that a client reading it has taken the session ticket in)
// and reads until the client closes.
func resumeServer(t *testing.T, c *catest.CA, verify func(tls.ConnectionState) error) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", resumeCreds(t, c, "backend").ServerTLS([]string{alpnHTTP1}, verify))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if c.(*tls.Conn).Handshake() == nil {
					c.Write([]byte("x")) // after the session ticket
					io.Copy(io.Discard, c)
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// resumeClient returns credentials for default/frontend of c's trust
// domain.
func resumeClient(t *testing.T, c *catest.CA) *Credentials { return resumeCreds(t, c, "frontend") }

// resumeCreds returns credentials for default/sa of c's trust domain.
func resumeCreds(t *testing.T, c *catest.CA, sa string) *Credentials {
	t.Helper()
	creds, err := NewCredentials(spiffeid.RequireTrustDomainFromString(resumeTD), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := creds.SetBundle(c.Bundle()); err != nil {
		t.Fatal(err)
	}
	if err := creds.SetSVID(c.SVID(t, "spiffe://"+resumeTD+"/ns/default/sa/"+sa, time.Hour)); err != nil {
		t.Fatal(err)
	}
	return creds
}

// resumeDial dials a resumeServer with dial and reads its byte, taking
// the session ticket in.
func resumeDial(t *testing.T, dial func() (*tls.Conn, error)) *tls.Conn {
	t.Helper()
	tc, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	if _, err := io.ReadFull(tc, b[:]); err != nil {
		t.Fatal(err)
	}
	return tc
}
