package client_test

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
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
