package proxy

import (
	"crypto/tls"
	"io"
	"log/slog"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/proxy/balance"
)

// A root leaving the bundle (retire, revoke) cuts outbound pooled
// connections whose endpoint chains to it even while a request is in
// flight on them, once the grace given to busy connections is over: a
// response that never ends (a stream, or an endpoint under a compromised
// root that keeps it open on purpose) must not keep a session under the
// revoked root alive.
func TestTrustShrankCutsBusyPooledConnections(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		name := "http1"
		if h2 {
			name = "http2"
		}
		t.Run(name, func(t *testing.T) { testTrustShrankCutsBusy(t, h2) })
	}
}

func testTrustShrankCutsBusy(t *testing.T, h2 bool) {
	const td = "strait.example"
	trustDomain := spiffeid.RequireTrustDomainFromString(td)
	mine := catest.New(t, td, catest.Options{Cluster: "east"})
	revoked := catest.New(t, td, catest.Options{Cluster: "west"})

	// The endpoint: an SVID under the root about to leave, answering with a
	// body that never ends.
	backendID := "spiffe://" + td + "/ns/default/sa/backend"
	sv := revoked.SVID(t, backendID, time.Hour)
	cert := tls.Certificate{PrivateKey: sv.PrivateKey, Leaf: sv.Certificates[0]}
	for _, c := range sv.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		ClientAuth: tls.RequireAnyClientCert, NextProtos: []string{alpnH2, alpnHTTP1}})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for {
			if _, err := io.WriteString(w, "tick\n"); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	})}
	go srv.Serve(ln)
	defer srv.Close()

	creds, err := NewCredentials(trustDomain, nil)
	if err != nil {
		t.Fatal(err)
	}
	both, err := bundle.New(trustDomain, 2, append(mine.Bundle().Roots(), revoked.Bundle().Roots()...))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := creds.SetBundle(both); err != nil {
		t.Fatal(err)
	}
	if err := creds.SetSVID(mine.SVID(t, "spiffe://"+td+"/ns/default/sa/frontend", time.Hour)); err != nil {
		t.Fatal(err)
	}
	o := newOutbound(creds, NewMetrics(prometheus.NewRegistry()), slog.New(slog.DiscardHandler), time.Now)
	o.busyGrace = 200 * time.Millisecond
	st := &upstreamState{svc: &controlplanev1.Service{Name: "backend"}, policy: &controlplanev1.TrafficPolicy{}}
	ep := balance.Endpoint{Key: "backend-0", Address: ln.Addr().String(), SPIFFEID: backendID}
	p, err := o.transport(ep, st, h2)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("GET", "https://backend/", nil)
	resp, err := p.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if got := resp.ProtoMajor == 2; got != h2 {
		t.Fatalf("response over %s, want HTTP/2 %v", resp.Proto, h2)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(resp.Body, buf); err != nil {
		t.Fatalf("first bytes of the stream: %v", err)
	}

	// The endpoint's root leaves the bundle.
	only, err := bundle.New(trustDomain, 3, mine.Bundle().Roots())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := creds.SetBundle(only); err != nil {
		t.Fatal(err)
	}
	o.trustShrank()

	cut := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, resp.Body)
		if err == nil {
			err = io.EOF
		}
		cut <- err
	}()
	select {
	case <-cut:
	case <-time.After(3 * time.Second):
		srv.Close() // ends the stream, so that the test can end
		t.Fatal("the stream from an endpoint under the removed root still flows 3s after the bundle shrank")
	}
}

// newBackendOutbound is an outbound side with no credentials beyond the
// trust domain strait.example and one upstream, backend.
func newBackendOutbound(t *testing.T) (*outbound, *upstream) {
	t.Helper()
	creds, err := NewCredentials(spiffeid.RequireTrustDomainFromString("strait.example"), nil)
	if err != nil {
		t.Fatal(err)
	}
	o := newOutbound(creds, NewMetrics(prometheus.NewRegistry()), slog.New(slog.DiscardHandler), time.Now)
	u, err := o.addUpstream("backend")
	if err != nil {
		t.Fatal(err)
	}
	return o, u
}

// balancerEndpoint is the endpoint key as the upstream's balancer holds it
// (what a pick returns).
func balancerEndpoint(t *testing.T, u *upstream, key string) balance.Endpoint {
	t.Helper()
	for _, st := range u.lb.Stats() {
		if st.Key == key {
			return st.Endpoint
		}
	}
	t.Fatalf("no endpoint %s in the balancer", key)
	return balance.Endpoint{}
}

// A snapshot that changes nothing keeps the pools toward endpoints in peer
// clusters (reached through a tunnel) as it keeps those toward local ones:
// their keys once differed between the pools and the check of which are
// live, and every snapshot closed the tunnelled ones.
func TestSnapshotKeepsTunnelPools(t *testing.T) {
	o, u := newBackendOutbound(t)
	const td = "strait.example"
	id := "spiffe://" + td + "/ns/default/sa/backend"
	svcs := []*controlplanev1.Service{{Name: "backend", Policy: &controlplanev1.TrafficPolicy{}, Endpoints: []*controlplanev1.Endpoint{
		{Instance: "backend-0", Address: "127.0.0.1:1", SpiffeId: id, Health: controlplanev1.Health_HEALTH_HEALTHY},
		{Instance: "backend-w0", Address: "198.18.0.1:1", SpiffeId: id, Health: controlplanev1.Health_HEALTH_HEALTHY, Cluster: "west",
			Tunnel: &controlplanev1.Tunnel{GatewayAddress: "127.0.0.1:2", GatewaySpiffeId: "spiffe://" + td + "/gateway/east", Cluster: "west", Port: 8080}},
	}}}
	o.apply(svcs)
	pools := map[string]pool{}
	for _, key := range []string{"backend-0", "backend-w0"} {
		st := u.state.Load()
		ep := balancerEndpoint(t, u, key)
		p, err := o.transport(ep, st, false)
		if err != nil {
			t.Fatal(err)
		}
		pools[key] = p
	}
	o.apply(svcs)
	for key, want := range pools {
		o.tmu.RLock()
		found := false
		for _, p := range o.transports {
			found = found || p == want
		}
		o.tmu.RUnlock()
		if !found {
			t.Errorf("the pool toward %s was dropped by a snapshot that changed nothing", key)
		}
	}
}

// A snapshot that changes the identity of the gateway a peer's endpoint
// is reached through replaces the pool toward it: the old one verifies
// the old identity.
func TestSnapshotReplacesTunnelPoolOnNewGatewayID(t *testing.T) {
	o, u := newBackendOutbound(t)
	const td = "strait.example"
	id := "spiffe://" + td + "/ns/default/sa/backend"
	snapshot := func(gw string) []*controlplanev1.Service {
		return []*controlplanev1.Service{{Name: "backend", Policy: &controlplanev1.TrafficPolicy{}, Endpoints: []*controlplanev1.Endpoint{
			{Instance: "backend-w0", Address: "198.18.0.1:1", SpiffeId: id, Health: controlplanev1.Health_HEALTH_HEALTHY, Cluster: "west",
				Tunnel: &controlplanev1.Tunnel{GatewayAddress: "127.0.0.1:2", GatewaySpiffeId: "spiffe://" + td + "/gateway/" + gw, Cluster: "west", Port: 8080}},
		}}}
	}
	o.apply(snapshot("east"))
	before, err := o.transport(balancerEndpoint(t, u, "backend-w0"), u.state.Load(), false)
	if err != nil {
		t.Fatal(err)
	}
	o.apply(snapshot("east-2"))
	after, err := o.transport(balancerEndpoint(t, u, "backend-w0"), u.state.Load(), false)
	if err != nil {
		t.Fatal(err)
	}
	if before == after {
		t.Error("the pool built for the old gateway identity was kept")
	}
}
