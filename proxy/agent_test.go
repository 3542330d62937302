package proxy

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// tokenCP is an IdentityService that issues an SVID for the token "good"
// and refuses any other with the status code it names.
type tokenCP struct {
	controlplanev1.UnimplementedIdentityServiceServer
	ca *catest.CA
}

func (f *tokenCP) Certify(_ context.Context, req *controlplanev1.CertifyRequest) (*controlplanev1.CertifyResponse, error) {
	tok := req.GetCredential().GetRegistrationToken()
	for _, c := range []codes.Code{codes.PermissionDenied, codes.InvalidArgument, codes.Unauthenticated} {
		if tok == c.String() {
			return nil, status.Error(c, "no")
		}
	}
	if tok != "good" {
		return nil, status.Error(codes.Internal, "unexpected token")
	}
	id := "spiffe://example.org/ns/shop/sa/cart"
	chain, err := f.ca.Issuer.IssueSVID(ca.SVIDRequest{CSR: req.GetCsr(), ID: spiffeid.RequireFromString(id), TTL: time.Hour})
	if err != nil {
		return nil, err
	}
	b := f.ca.Bundle()
	resp := &controlplanev1.CertifyResponse{SpiffeId: id, Bundle: &controlplanev1.TrustBundle{
		TrustDomain: b.TrustDomain().Name(), Sequence: b.Sequence(), Digest: b.Digest()}}
	for _, r := range b.Roots() {
		resp.Bundle.Roots = append(resp.Bundle.Roots, r.Raw)
	}
	for _, c := range chain {
		resp.CertificateChain = append(resp.CertificateChain, c.Raw)
	}
	return resp, nil
}

func startTokenCP(t *testing.T, c *catest.CA) string {
	t.Helper()
	s := c.SVID(t, "spiffe://example.org/cluster/east/controlplane", time.Hour)
	cert := tls.Certificate{Leaf: s.Certificates[0], PrivateKey: s.PrivateKey}
	for _, c := range s.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}})))
	controlplanev1.RegisterIdentityServiceServer(srv, &tokenCP{ca: c})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return ln.Addr().String()
}

func testAgent(t *testing.T, c *catest.CA, cp, token, dataDir string) *agent {
	t.Helper()
	cfg := &Config{TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"), ControlPlane: cp, TrustBundle: c.Bundle(),
		Token: token, DataDir: dataDir, Clock: time.Now, Logger: slog.New(slog.DiscardHandler)}
	creds, err := NewCredentials(cfg.TrustDomain, cfg.Clock)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := creds.SetBundle(cfg.TrustBundle); err != nil {
		t.Fatal(err)
	}
	a := newAgent(cfg, creds, NewMetrics(prometheus.NewRegistry()), func(*controlplanev1.Snapshot) error { return nil })
	t.Cleanup(a.id.Close)
	return a
}

func TestBootstrapRefusedToken(t *testing.T) {
	c := catest.New(t, "example.org")
	cp := startTokenCP(t, c)
	for _, code := range []codes.Code{codes.PermissionDenied, codes.InvalidArgument, codes.Unauthenticated} {
		a := testAgent(t, c, cp, code.String(), "")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := a.bootstrap(ctx)
		cancel()
		if err == nil || !strings.Contains(err.Error(), "the control plane refused the registration token (use a fresh one from `strait workload token`)") {
			t.Errorf("%s: bootstrap = %v, want the refused-token message", code, err)
		}
	}
}

func TestBootstrapSavesAndRestores(t *testing.T) {
	c := catest.New(t, "example.org")
	cp := startTokenCP(t, c)
	dir := t.TempDir()
	a := testAgent(t, c, cp, "good", dir)
	if err := a.bootstrap(context.Background()); err != nil {
		t.Fatal(err)
	}
	if a.id.Conn() == nil {
		t.Fatal("no control-plane connection after bootstrap")
	}
	want := float64(a.creds.Expiry().Unix())
	var m dto.Metric
	if err := a.metrics.svidExpiry.Write(&m); err != nil {
		t.Fatal(err)
	}
	if got := m.GetGauge().GetValue(); got != want {
		t.Errorf("svid expiry metric = %v, want %v", got, want)
	}
	// Restarted without a token: the saved SVID is used.
	b := testAgent(t, c, cp, "", dir)
	if err := b.bootstrap(context.Background()); err != nil {
		t.Fatalf("bootstrap from the saved SVID: %v", err)
	}
	if !b.creds.SVID().Certificates[0].Equal(a.creds.SVID().Certificates[0]) {
		t.Error("restored SVID differs from the one issued")
	}
}
