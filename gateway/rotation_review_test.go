package gateway

import (
	"context"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	strca "github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/proxy"
)

// A root rotation moves every node to SVIDs under the new root before
// retire; a tunnel opened after that, between parties that all present
// the new chains, must not be cut when the old root leaves the bundle.
// The peer connection it rides on must not be one whose chains were
// presented before activate (Recheck closes it at retire, with every
// stream on it).
func TestTunnelOpenedAfterActivateSurvivesRetire(t *testing.T) {
	p := newPair(t, gwOptions{}, gwOptions{})
	// Traffic before the rotation: the gateways connect with SVIDs under
	// the old root.
	c0 := mustTunnel(t, p.east, p.sidecar, echoHeader())
	if err := echoLine(c0, "before\n"); err != nil {
		t.Fatal(err)
	}
	c0.Close()

	ctx := context.Background()
	a := p.ca.Authority
	all := []*proxy.Credentials{p.east.creds, p.west.creds, p.sidecar}
	setBundle := func() {
		t.Helper()
		for _, c := range all {
			if _, err := c.SetBundle(a.Bundle()); err != nil {
				t.Fatal(err)
			}
		}
	}
	renew := func(c *proxy.Credentials, cluster, id string) {
		t.Helper()
		iss, err := a.Issuer(cluster)
		if err != nil {
			t.Fatal(err)
		}
		sv, err := iss.MintSVID(spiffeid.RequireFromString(id), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.SetSVID(sv); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.Prepare(ctx, strca.PrepareOptions{}); err != nil {
		t.Fatal(err)
	}
	setBundle()
	if err := a.Activate(ctx); err != nil {
		t.Fatal(err)
	}
	// Every node is re-issued under the new root (what the retire gate
	// waits for).
	renew(p.east.creds, "east", gatewayID("east"))
	renew(p.west.creds, "west", gatewayID("west"))
	renew(p.sidecar, "east", workloadID("default", "client"))
	time.Sleep(200 * time.Millisecond) // the gateways saw their new SVIDs

	c1 := mustTunnel(t, p.east, p.sidecar, echoHeader())
	if err := echoLine(c1, "after activate\n"); err != nil {
		t.Fatal(err)
	}
	if err := a.Retire(ctx, strca.RetireOptions{Acknowledged: true}); err != nil {
		t.Fatal(err)
	}
	setBundle()
	time.Sleep(500 * time.Millisecond) // Recheck ran on both gateways
	if err := echoLine(c1, "after retire\n"); err != nil {
		t.Fatalf("a tunnel opened after every node moved to the new root was cut at retire: %v", err)
	}
}
