package proxy

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/catest"
)

// newCPlessSidecar is a sidecar of service name in namespace default,
// in front of app, holding an SVID from c and no control plane.
func newCPlessSidecar(t *testing.T, c *catest.CA, name, app string) *Sidecar {
	t.Helper()
	td := c.Bundle().TrustDomain()
	s, err := New(Config{ControlPlane: "127.0.0.1:1", TrustDomain: td, TrustBundle: c.Bundle(),
		Instance: name + "-0", Service: name, Namespace: "default", Inbound: "127.0.0.1:0", App: app})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.creds.SetSVID(c.SVID(t, spiffeid.RequireFromPath(td, "/ns/default/sa/"+name).String(), time.Hour)); err != nil {
		t.Fatal(err)
	}
	return s
}

// serveInbound serves s's inbound side on a loopback port until ctx ends
// and returns its address.
func serveInbound(ctx context.Context, t *testing.T, s *Sidecar) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.in.run(ctx, ln)
	return ln.Addr().String()
}
