package client_test

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/client"
)

// rotatedCP presents a certificate under the old root (what the sidecar's
// --trust-bundle holds) and issues SVIDs under the new one, sending the
// bundle after the old root's retirement (a newer sequence).
type rotatedCP struct {
	*fakeCP
	bundle *bundle.Bundle
}

func (r *rotatedCP) Certify(ctx context.Context, req *controlplanev1.CertifyRequest) (*controlplanev1.CertifyResponse, error) {
	resp, err := r.fakeCP.Certify(ctx, req)
	if err == nil {
		resp.Bundle = wireBundle(r.bundle)
	}
	return resp, err
}

// TestRestartAfterRotationKeepsIdentity: a sidecar whose SVID was
// renewed under a new root (the old one retired) restarts with the same
// --trust-bundle file it was first started with. The trust it learned
// from the control plane must survive the restart with the SVID, or the
// saved SVID no longer verifies and the sidecar needs a new token.
func TestRestartAfterRotationKeepsIdentity(t *testing.T) {
	oldCA, newCA := catest.New(t, testTD), catest.New(t, testTD)
	rotated, err := bundle.New(td, oldCA.Bundle().Sequence()+5, newCA.Bundle().Roots())
	if err != nil {
		t.Fatal(err)
	}
	r := &rotatedCP{fakeCP: &fakeCP{ca: newCA}, bundle: rotated}
	s := oldCA.SVID(t, cpID, time.Hour)
	cert := tls.Certificate{Leaf: s.Certificates[0], PrivateKey: s.PrivateKey}
	for _, c := range s.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert,
	})))
	controlplanev1.RegisterIdentityServiceServer(srv, r)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)

	dir := t.TempDir()
	id := &client.Identity{ControlPlane: ln.Addr().String(), Creds: newCreds(t, oldCA.Bundle()), DataDir: dir}
	conn, err := id.Dial(false)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := id.Certify(context.Background(), conn, "good"); err != nil {
		t.Fatalf("Certify: %v", err)
	}

	// Restart: the same --trust-bundle file (old root only), the same data dir.
	creds2 := newCreds(t, oldCA.Bundle())
	id2 := &client.Identity{ControlPlane: ln.Addr().String(), Creds: creds2, DataDir: dir}
	if !id2.LoadSaved() {
		t.Fatal("after a restart the saved SVID (issued under the rotated root) is not restored: the sidecar needs a new registration token")
	}
	if b := creds2.Bundle(); b.Digest() != rotated.Digest() {
		t.Errorf("restored bundle %s (sequence %d), want the one learned before the restart %s (sequence %d)",
			b.Digest(), b.Sequence(), rotated.Digest(), rotated.Sequence())
	}
}
