package client_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/client"
	"github.com/straitmesh/strait/proxy"
)

const (
	testTD     = "example.org"
	workloadID = "spiffe://example.org/ns/shop/sa/cart"
	cpID       = "spiffe://example.org/cluster/east/controlplane"
)

var td = spiffeid.RequireTrustDomainFromString(testTD)

func wireBundle(b *bundle.Bundle) *controlplanev1.TrustBundle {
	tb := &controlplanev1.TrustBundle{TrustDomain: b.TrustDomain().Name(), Sequence: b.Sequence(), Digest: b.Digest()}
	for _, r := range b.Roots() {
		tb.Roots = append(tb.Roots, r.Raw)
	}
	return tb
}

// fakeCP is an IdentityService that issues workloadID for the token
// "good" or for a caller presenting an SVID, and refuses other tokens.
type fakeCP struct {
	controlplanev1.UnimplementedIdentityServiceServer
	ca       *catest.CA
	byToken  atomic.Int32
	byCert   atomic.Int32
	addr     string
	failNext atomic.Int32 // Unavailable this many times first
}

func (f *fakeCP) Certify(ctx context.Context, req *controlplanev1.CertifyRequest) (*controlplanev1.CertifyResponse, error) {
	if f.failNext.Load() > 0 {
		f.failNext.Add(-1)
		return nil, status.Error(codes.Unavailable, "not yet")
	}
	if tok := req.GetCredential().GetRegistrationToken(); tok != "" {
		if tok != "good" {
			return nil, status.Error(codes.PermissionDenied, "token already used")
		}
		f.byToken.Add(1)
	} else {
		p, _ := peer.FromContext(ctx)
		ti, ok := p.AuthInfo.(credentials.TLSInfo)
		if !ok || len(ti.State.PeerCertificates) == 0 {
			return nil, status.Error(codes.Unauthenticated, "no credential")
		}
		f.byCert.Add(1)
	}
	chain, err := f.ca.Issuer.IssueSVID(ca.SVIDRequest{CSR: req.GetCsr(), ID: spiffeid.RequireFromString(workloadID), TTL: time.Hour})
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	resp := &controlplanev1.CertifyResponse{SpiffeId: workloadID, Bundle: wireBundle(f.ca.Bundle())}
	for _, c := range chain {
		resp.CertificateChain = append(resp.CertificateChain, c.Raw)
	}
	return resp, nil
}

func startFakeCP(t *testing.T, c *catest.CA) *fakeCP {
	t.Helper()
	s := c.SVID(t, cpID, time.Hour)
	cert := tls.Certificate{Leaf: s.Certificates[0], PrivateKey: s.PrivateKey}
	for _, c := range s.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert,
	})))
	f := &fakeCP{ca: c}
	controlplanev1.RegisterIdentityServiceServer(srv, f)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = ln.Addr().String()
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return f
}

func newCreds(t *testing.T, b *bundle.Bundle) *proxy.Credentials {
	t.Helper()
	c, err := proxy.NewCredentials(td, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.SetBundle(b); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestTokenThenRestoreThenRenew(t *testing.T) {
	c := catest.New(t, testTD)
	f := startFakeCP(t, c)
	dir := t.TempDir()
	ctx := context.Background()

	var issued []*x509svid.SVID
	creds := newCreds(t, c.Bundle())
	id := &client.Identity{ControlPlane: f.addr, Creds: creds, DataDir: dir, Issued: func(s *x509svid.SVID) { issued = append(issued, s) }}
	if id.LoadSaved() {
		t.Fatal("LoadSaved with an empty data dir reported an SVID")
	}
	conn, err := id.Dial(false)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := id.Certify(ctx, conn, "good"); err != nil {
		t.Fatalf("Certify with a token: %v", err)
	}
	if len(issued) != 1 || issued[0] != creds.SVID() || creds.SVID().ID.String() != workloadID {
		t.Fatalf("after Certify: issued %d, SVID %v", len(issued), creds.SVID())
	}
	cp, kp := id.Paths()
	if cp != filepath.Join(dir, "svid.pem") || kp != filepath.Join(dir, "svid-key.pem") {
		t.Errorf("Paths = %s, %s", cp, kp)
	}
	if fi, err := os.Stat(kp); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("saved key: %v, %v; want mode 0600", fi, err)
	}
	if _, err := os.Stat(cp + ".next"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a completed save left %s.next: %v", cp, err)
	}

	// A restart restores the saved SVID and renews over mTLS with it.
	creds2 := newCreds(t, c.Bundle())
	id2 := &client.Identity{ControlPlane: f.addr, Creds: creds2, DataDir: dir}
	if !id2.LoadSaved() {
		t.Fatal("LoadSaved did not restore the saved SVID")
	}
	if !creds2.SVID().Certificates[0].Equal(creds.SVID().Certificates[0]) {
		t.Fatal("restored SVID differs from the saved one")
	}
	if err := id2.Connect(); err != nil {
		t.Fatal(err)
	}
	defer id2.Close()
	if err := id2.Certify(ctx, id2.Conn(), ""); err != nil {
		t.Fatalf("Certify over mTLS: %v", err)
	}
	if f.byToken.Load() != 1 || f.byCert.Load() != 1 {
		t.Errorf("control plane saw %d token and %d mTLS certifications, want 1 and 1", f.byToken.Load(), f.byCert.Load())
	}
	id2.Close()
	if id2.Conn() != nil {
		t.Error("Conn after Close is not nil")
	}
}

func TestRefusedTokenKeepsItsStatus(t *testing.T) {
	c := catest.New(t, testTD)
	f := startFakeCP(t, c)
	id := &client.Identity{ControlPlane: f.addr, Creds: newCreds(t, c.Bundle())}
	conn, err := id.Dial(false)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	err = id.Certify(context.Background(), conn, "used")
	// The sidecar tells a refused token from an unreachable control plane
	// by the status code of the unwrapped error.
	if code := status.Code(errors.Unwrap(err)); code != codes.PermissionDenied {
		t.Fatalf("Certify with a refused token: %v (code %s), want PermissionDenied", err, code)
	}
}

func TestRenewLoopRenewsAtHalfLife(t *testing.T) {
	c := catest.New(t, testTD)
	f := startFakeCP(t, c)
	creds := newCreds(t, c.Bundle())
	// Renewed at half life: within a few seconds.
	if err := creds.SetSVID(c.SVID(t, workloadID, 4*time.Second)); err != nil {
		t.Fatal(err)
	}
	issued := make(chan *x509svid.SVID, 4)
	id := &client.Identity{ControlPlane: f.addr, Creds: creds, Issued: func(s *x509svid.SVID) { issued <- s }}
	if err := id.Connect(); err != nil {
		t.Fatal(err)
	}
	defer id.Close()
	first := id.Conn()
	f.failNext.Store(1) // the first attempt fails and is retried
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- id.RenewLoop(ctx) }()
	var s *x509svid.SVID
	select {
	case s = <-issued:
	case <-time.After(15 * time.Second):
		t.Fatal("no renewal")
	}
	// The new SVID lives an hour: the loop reconnects, then sleeps.
	deadline := time.Now().Add(5 * time.Second)
	for id.Conn() == first && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("RenewLoop: %v", err)
	}
	if creds.SVID() != s {
		t.Error("renewed SVID not installed")
	}
	if id.Conn() == first {
		t.Error("Conn not moved to a connection with the renewed SVID")
	}
}

func TestBundleFromProto(t *testing.T) {
	c := catest.New(t, testTD)
	b := c.Bundle()
	got, err := client.BundleFromProto(td, wireBundle(b))
	if err != nil || got.Digest() != b.Digest() || got.Sequence() != b.Sequence() {
		t.Fatalf("BundleFromProto = %v, %v; want %s", got, err, b.Digest())
	}
	noDigest := wireBundle(b)
	noDigest.Digest = ""
	if _, err := client.BundleFromProto(td, noDigest); err != nil {
		t.Errorf("without a digest: %v", err)
	}
	for name, tb := range map[string]*controlplanev1.TrustBundle{
		"nil":          nil,
		"other domain": func() *controlplanev1.TrustBundle { x := wireBundle(b); x.TrustDomain = "other.org"; return x }(),
		"bad digest":   func() *controlplanev1.TrustBundle { x := wireBundle(b); x.Digest = "sha256:00"; return x }(),
		"bad root":     func() *controlplanev1.TrustBundle { x := wireBundle(b); x.Roots = [][]byte{{1, 2, 3}}; return x }(),
	} {
		if _, err := client.BundleFromProto(td, tb); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestBackoff(t *testing.T) {
	b := client.NewBackoff(20*time.Millisecond, 40*time.Millisecond)
	ctx := context.Background()
	for i, maxWait := range []time.Duration{20, 40, 40} {
		start := time.Now()
		if !b.Wait(ctx) {
			t.Fatal("Wait returned false")
		}
		// Each wait is between half the current delay and the delay.
		if d := time.Since(start); d < maxWait*time.Millisecond/2 {
			t.Errorf("wait %d took %s, want at least %s", i, d, maxWait*time.Millisecond/2)
		}
	}
	b.Reset()
	start := time.Now()
	b.Wait(ctx)
	if d := time.Since(start); d < 10*time.Millisecond {
		t.Errorf("after Reset: waited %s, want at least 10ms", d)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if client.NewBackoff(time.Hour, time.Hour).Wait(cctx) {
		t.Error("Wait with an ended context returned true")
	}
}

// fakeClock is a clock the test moves by hand.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock(t time.Time) *fakeClock {
	c := &fakeClock{}
	c.ns.Store(t.UnixNano())
	return c
}

func (c *fakeClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

const otherIssuer = "sha256:0000000000000000000000000000000000000000000000000000000000000000"

// A reissue hint naming another issuer than the SVID's schedules one early
// renewal at a random moment within its window; the renewal happens when
// the clock gets there (after a failed attempt, retried with backoff), and
// the same hint repeated by later snapshots does not schedule another.
func TestReissueRenewsEarlyOncePerIssuer(t *testing.T) {
	c := catest.New(t, testTD)
	f := startFakeCP(t, c)
	creds := newCreds(t, c.Bundle())
	if err := creds.SetSVID(c.SVID(t, workloadID, time.Hour)); err != nil {
		t.Fatal(err)
	}
	clk := newFakeClock(time.Now())
	start := clk.Now()
	var windows []time.Duration
	issued := make(chan *x509svid.SVID, 4)
	id := &client.Identity{ControlPlane: f.addr, Creds: creds, Clock: clk.Now,
		Issued: func(s *x509svid.SVID) { issued <- s },
		Jitter: func(w time.Duration) time.Duration { windows = append(windows, w); return 4 * time.Minute }}
	if err := id.Connect(); err != nil {
		t.Fatal(err)
	}
	defer id.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- id.RenewLoop(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("RenewLoop: %v", err)
		}
	}()

	hint := &controlplanev1.Reissue{Issuer: otherIssuer, Window: durationpb.New(10 * time.Minute)}
	id.Reissue(hint)
	if got, want := id.PendingReissue(), start.Add(4*time.Minute); !got.Equal(want) {
		t.Fatalf("PendingReissue = %v, want %v (4 minutes into the window)", got, want)
	}
	if len(windows) != 1 || windows[0] != 10*time.Minute {
		t.Fatalf("Jitter called with %v, want [10m]", windows)
	}
	select {
	case <-issued:
		t.Fatal("renewed before the scheduled moment")
	case <-time.After(300 * time.Millisecond):
	}
	f.failNext.Store(1) // the first attempt fails and is retried with backoff
	clk.Advance(4 * time.Minute)
	select {
	case <-issued:
	case <-time.After(10 * time.Second):
		t.Fatal("no renewal at the scheduled moment")
	}
	if got := f.byCert.Load(); got != 1 {
		t.Errorf("control plane issued %d SVIDs over mTLS, want 1", got)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !id.PendingReissue().IsZero() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if p := id.PendingReissue(); !p.IsZero() {
		t.Fatalf("after the renewal a reissue is still pending at %v", p)
	}
	// The fake control plane still signs with the same intermediate, so the
	// SVID is still not from otherIssuer: the same hint again must not
	// renew again (once per distinct issuer).
	for range 3 {
		id.Reissue(hint)
	}
	if p := id.PendingReissue(); !p.IsZero() {
		t.Fatalf("a repeated hint scheduled another renewal at %v", p)
	}
	clk.Advance(10 * time.Minute)
	select {
	case <-issued:
		t.Fatal("a repeated hint renewed again")
	case <-time.After(1500 * time.Millisecond):
	}
}

// With a real clock and no window, the hint wakes a RenewLoop that sleeps
// until half life.
func TestReissueWakesRenewLoop(t *testing.T) {
	c := catest.New(t, testTD)
	f := startFakeCP(t, c)
	creds := newCreds(t, c.Bundle())
	if err := creds.SetSVID(c.SVID(t, workloadID, time.Hour)); err != nil {
		t.Fatal(err)
	}
	issued := make(chan *x509svid.SVID, 4)
	id := &client.Identity{ControlPlane: f.addr, Creds: creds, Issued: func(s *x509svid.SVID) { issued <- s }}
	if err := id.Connect(); err != nil {
		t.Fatal(err)
	}
	defer id.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go id.RenewLoop(ctx)
	time.Sleep(50 * time.Millisecond) // RenewLoop is asleep until half life
	id.Reissue(&controlplanev1.Reissue{Issuer: otherIssuer})
	select {
	case s := <-issued:
		if creds.SVID() != s {
			t.Error("renewed SVID not installed")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no renewal after a hint without a window")
	}
}

func TestReissueSchedule(t *testing.T) {
	c := catest.New(t, testTD)
	s := c.SVID(t, workloadID, time.Hour)
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	window := func(d time.Duration) *durationpb.Duration { return durationpb.New(d) }
	for _, tc := range []struct {
		name       string
		hint       *controlplanev1.Reissue
		jitter     time.Duration
		want       time.Duration // after start; -1: nothing scheduled
		wantWindow time.Duration // passed to Jitter; 0: not called
	}{
		{"nil hint", nil, 0, -1, 0},
		{"empty issuer", &controlplanev1.Reissue{Window: window(time.Minute)}, 0, -1, 0},
		{"oversize issuer", &controlplanev1.Reissue{Issuer: "sha256:" + strings.Repeat("a", 300)}, 0, -1, 0},
		{"the SVID's own issuer", &controlplanev1.Reissue{Issuer: svid.IssuerFingerprint(s.Certificates), Window: window(time.Minute)}, 0, -1, 0},
		{"no window: now", &controlplanev1.Reissue{Issuer: otherIssuer}, time.Minute, 0, 0},
		{"negative window: now", &controlplanev1.Reissue{Issuer: otherIssuer, Window: window(-time.Minute)}, time.Minute, 0, 0},
		{"invalid window: now", &controlplanev1.Reissue{Issuer: otherIssuer, Window: &durationpb.Duration{Seconds: 1, Nanos: -1}}, time.Minute, 0, 0},
		{"within the window", &controlplanev1.Reissue{Issuer: otherIssuer, Window: window(5 * time.Minute)}, 3 * time.Minute, 3 * time.Minute, 5 * time.Minute},
		{"window capped at 10m", &controlplanev1.Reissue{Issuer: otherIssuer, Window: window(24 * time.Hour)}, time.Minute, time.Minute, 10 * time.Minute},
		{"jitter past the window clamped", &controlplanev1.Reissue{Issuer: otherIssuer, Window: window(time.Minute)}, time.Hour, time.Minute - 1, time.Minute},
		{"negative jitter clamped", &controlplanev1.Reissue{Issuer: otherIssuer, Window: window(time.Minute)}, -time.Hour, 0, time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			creds := newCreds(t, c.Bundle())
			if err := creds.SetSVID(s); err != nil {
				t.Fatal(err)
			}
			var gotWindow time.Duration
			id := &client.Identity{Creds: creds, Clock: func() time.Time { return start },
				Jitter: func(w time.Duration) time.Duration { gotWindow = w; return tc.jitter }}
			id.Reissue(tc.hint)
			got := id.PendingReissue()
			switch {
			case tc.want < 0 && !got.IsZero():
				t.Errorf("PendingReissue = %v, want none", got)
			case tc.want >= 0 && !got.Equal(start.Add(tc.want)):
				t.Errorf("PendingReissue = %v, want start+%v", got, tc.want)
			}
			if gotWindow != tc.wantWindow {
				t.Errorf("Jitter got window %v, want %v", gotWindow, tc.wantWindow)
			}
		})
	}
}

// A hint for a new issuer never postpones a renewal already scheduled; one
// naming the SVID's own issuer cancels it.
func TestReissueNeverPostpones(t *testing.T) {
	c := catest.New(t, testTD)
	s := c.SVID(t, workloadID, time.Hour)
	creds := newCreds(t, c.Bundle())
	if err := creds.SetSVID(s); err != nil {
		t.Fatal(err)
	}
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	jitter := time.Minute
	id := &client.Identity{Creds: creds, Clock: func() time.Time { return start }, Jitter: func(time.Duration) time.Duration { return jitter }}
	w := durationpb.New(10 * time.Minute)
	id.Reissue(&controlplanev1.Reissue{Issuer: "sha256:a", Window: w})
	jitter = 5 * time.Minute
	id.Reissue(&controlplanev1.Reissue{Issuer: "sha256:b", Window: w})
	if got := id.PendingReissue(); !got.Equal(start.Add(time.Minute)) {
		t.Fatalf("after a later hint: PendingReissue = %v, want start+1m", got)
	}
	id.Reissue(&controlplanev1.Reissue{Issuer: "sha256:c"})
	if got := id.PendingReissue(); !got.Equal(start) {
		t.Fatalf("after a hint without a window: PendingReissue = %v, want start", got)
	}
	id.Reissue(&controlplanev1.Reissue{Issuer: svid.IssuerFingerprint(s.Certificates)})
	if got := id.PendingReissue(); !got.IsZero() {
		t.Fatalf("after a hint naming the SVID's issuer: PendingReissue = %v, want none", got)
	}
}

// watchCP is a DiscoveryService whose Watch sends one snapshot naming the
// stream, then holds the stream open; it counts the streams open.
type watchCP struct {
	controlplanev1.UnimplementedDiscoveryServiceServer
	mu       sync.Mutex
	open     int
	opened   int
	minAfter int // fewest streams open at once after the first opened
}

func (w *watchCP) Watch(_ *controlplanev1.WatchRequest, stream controlplanev1.DiscoveryService_WatchServer) error {
	w.mu.Lock()
	w.open++
	w.opened++
	n := w.opened
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.open--
		w.minAfter = min(w.minAfter, w.open)
		w.mu.Unlock()
	}()
	if err := stream.Send(&controlplanev1.WatchResponse{Snapshot: &controlplanev1.Snapshot{Version: uint64(n)}}); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

// A renewal moves Follow's stream to the new connection make-before-break:
// the control plane never sees the node without a stream, each stream's
// first message is marked, and the replaced connection stays open for
// calls in flight until Close.
func TestFollowMovesStreamWithoutGap(t *testing.T) {
	c := catest.New(t, testTD)
	f := startFakeCP(t, c)
	// The fake control plane's server also serves Watch.
	s := c.SVID(t, cpID, time.Hour)
	cert := tls.Certificate{Leaf: s.Certificates[0], PrivateKey: s.PrivateKey}
	for _, c := range s.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert})))
	w := &watchCP{minAfter: 1 << 30}
	controlplanev1.RegisterDiscoveryServiceServer(srv, w)
	controlplanev1.RegisterIdentityServiceServer(srv, f)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Stop()

	creds := newCreds(t, c.Bundle())
	if err := creds.SetSVID(c.SVID(t, workloadID, time.Hour)); err != nil {
		t.Fatal(err)
	}
	id := &client.Identity{ControlPlane: ln.Addr().String(), Creds: creds}
	if err := id.Connect(); err != nil {
		t.Fatal(err)
	}
	defer id.Close()
	type got struct {
		version uint64
		first   bool
	}
	msgs := make(chan got, 8)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- client.Follow(ctx, id, func(ctx context.Context, conn *grpc.ClientConn) (func() (*controlplanev1.WatchResponse, error), error) {
			s, err := controlplanev1.NewDiscoveryServiceClient(conn).Watch(ctx, &controlplanev1.WatchRequest{Node: "cart-0"})
			if err != nil {
				return nil, err
			}
			return s.Recv, nil
		}, func(r *controlplanev1.WatchResponse, first bool) { msgs <- got{r.GetSnapshot().GetVersion(), first} })
	}()
	next := func() got {
		t.Helper()
		select {
		case g := <-msgs:
			return g
		case <-time.After(10 * time.Second):
			t.Fatal("no message")
			return got{}
		}
	}
	if g := next(); g != (got{1, true}) {
		t.Fatalf("first message %+v, want version 1, first", g)
	}
	old := id.Conn()
	for i := uint64(2); i <= 3; i++ {
		if err := id.Connect(); err != nil {
			t.Fatal(err)
		}
		if g := next(); g != (got{i, true}) {
			t.Fatalf("after renewal %d: message %+v, want version %d from the new stream, first", i-1, g, i)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		w.mu.Lock()
		open, minAfter := w.open, w.minAfter
		w.mu.Unlock()
		if open == 1 {
			if minAfter < 1 {
				t.Errorf("the control plane saw the node without a stream")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d streams open after the moves, want 1 (old ones cancelled)", open)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st := old.GetState(); st == connectivity.Shutdown {
		t.Error("the replaced connection was closed at once; it should stay for calls in flight")
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Follow after its context ended: %v", err)
	}
	id.Close()
	if st := old.GetState(); st != connectivity.Shutdown {
		t.Errorf("replaced connection after Close: %v, want Shutdown", st)
	}
}

// TestLoadSavedAfterACrashMidSave: save writes the new certificate's .next
// copy, then the key, then the certificate. A crash at any point leaves a
// pair LoadSaved restores: the old one, or the new key with the .next
// certificate.
func TestLoadSavedAfterACrashMidSave(t *testing.T) {
	c := catest.New(t, testTD)
	old := c.SVID(t, workloadID, time.Hour)
	renewed := c.SVID(t, workloadID, time.Hour)
	oldCert, oldKey, err := old.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	newCert, newKey, err := renewed.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range []struct {
		name            string
		cert, key, next []byte // next nil: no .next file
		want            *x509svid.SVID
	}{
		{"before the .next certificate", oldCert, oldKey, nil, old},
		{"after the .next certificate", oldCert, oldKey, newCert, old},
		{"after the key", oldCert, newKey, newCert, renewed},
		{"after the certificate", newCert, newKey, newCert, renewed},
		{"done", newCert, newKey, nil, renewed},
	} {
		t.Run(st.name, func(t *testing.T) {
			dir := t.TempDir()
			id := &client.Identity{Creds: newCreds(t, c.Bundle()), DataDir: dir}
			cp, kp := id.Paths()
			write := func(path string, b []byte) {
				if err := os.WriteFile(path, b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			write(cp, st.cert)
			write(kp, st.key)
			if st.next != nil {
				write(cp+".next", st.next)
			}
			if !id.LoadSaved() {
				t.Fatal("LoadSaved restored nothing")
			}
			if got := id.Creds.SVID().Certificates[0]; !got.Equal(st.want.Certificates[0]) {
				t.Errorf("LoadSaved restored the certificate with serial %v, want %v", got.SerialNumber, st.want.Certificates[0].SerialNumber)
			}
		})
	}
	// A key that matches neither certificate restores nothing.
	dir := t.TempDir()
	id := &client.Identity{Creds: newCreds(t, c.Bundle()), DataDir: dir}
	cp, kp := id.Paths()
	os.WriteFile(cp, oldCert, 0o600)
	os.WriteFile(kp, newKey, 0o600)
	if id.LoadSaved() {
		t.Error("LoadSaved restored a certificate beside a key that is not its own")
	}
}

// The key a token is redeemed for is the same on every attempt (kept on
// disk until the SVID is saved); a data directory that cannot hold it
// keeps it in memory instead of stopping the redemption; a key left over
// by a crash after the save goes once the saved SVID is loaded.
func TestRedemptionKey(t *testing.T) {
	c := catest.New(t, testTD)
	f := startFakeCP(t, c)
	ctx := context.Background()
	certify := func(id *client.Identity) {
		t.Helper()
		conn, err := id.Dial(false)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if err := id.Certify(ctx, conn, "good"); err != nil {
			t.Fatalf("Certify with a token: %v", err)
		}
	}

	// Lost answers: the CP answers Unavailable after redeeming (modelled
	// by failNext before it), and the retry uses the same key.
	dir := t.TempDir()
	creds := newCreds(t, c.Bundle())
	id := &client.Identity{ControlPlane: f.addr, Creds: creds, DataDir: dir}
	f.failNext.Store(1)
	conn, err := id.Dial(false)
	if err != nil {
		t.Fatal(err)
	}
	if err := id.Certify(ctx, conn, "good"); err == nil {
		t.Fatal("Certify succeeded through a failure")
	}
	conn.Close()
	kept, err := os.ReadFile(id.RedemptionKeyPath())
	if err != nil {
		t.Fatalf("no redemption key on disk after a failed attempt: %v", err)
	}
	if fi, _ := os.Stat(id.RedemptionKeyPath()); fi.Mode().Perm() != 0o600 {
		t.Errorf("redemption key mode %v, want 0600", fi.Mode().Perm())
	}
	restarted := &client.Identity{ControlPlane: f.addr, Creds: newCreds(t, c.Bundle()), DataDir: dir}
	certify(restarted)
	blk, _ := pem.Decode(kept)
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if !k.(*ecdsa.PrivateKey).PublicKey.Equal(restarted.Creds.SVID().Certificates[0].PublicKey) {
		t.Error("the restarted redemption used another key")
	}
	if _, err := os.Stat(restarted.RedemptionKeyPath()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("redemption key still on disk after the SVID was saved: %v", err)
	}

	// A crash between the save and the removal: loading the saved SVID
	// removes the key.
	if err := os.WriteFile(restarted.RedemptionKeyPath(), kept, 0o600); err != nil {
		t.Fatal(err)
	}
	if !(&client.Identity{ControlPlane: f.addr, Creds: newCreds(t, c.Bundle()), DataDir: dir}).LoadSaved() {
		t.Fatal("LoadSaved did not restore the saved SVID")
	}
	if _, err := os.Stat(restarted.RedemptionKeyPath()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("redemption key left over after LoadSaved: %v", err)
	}

	// A data directory that does not exist: the redemption goes on.
	certify(&client.Identity{ControlPlane: f.addr, Creds: newCreds(t, c.Bundle()), DataDir: filepath.Join(t.TempDir(), "missing")})
}
