package proxy

import (
	"errors"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// TestInvalidPolicyRefusesWholeSnapshot: a snapshot whose traffic
// policy the balancer cannot take has its routing refused whole, not half
// applied (new endpoints with the old balancer settings, and the snapshot
// recorded as in force); its trust bundle is still taken (see
// TestRefusedRoutingStillTakesTrust).
func TestInvalidPolicyRefusesWholeSnapshot(t *testing.T) {
	c := catest.New(t, "strait.example")
	s, err := New(Config{TrustDomain: spiffeid.RequireTrustDomainFromString("strait.example"), ControlPlane: "127.0.0.1:1",
		TrustBundle: c.Bundle(), Instance: "frontend-0", Service: "frontend", Namespace: "default",
		Inbound: "127.0.0.1:0", App: "127.0.0.1:1", Upstreams: map[string]string{"backend": "127.0.0.1:0"}})
	if err != nil {
		t.Fatal(err)
	}
	u, err := s.out.addUpstream("backend")
	if err != nil {
		t.Fatal(err)
	}
	id := "spiffe://strait.example/ns/default/sa/backend"
	snap := func(instance string, pol *controlplanev1.TrafficPolicy) *controlplanev1.Snapshot {
		return &controlplanev1.Snapshot{Services: []*controlplanev1.Service{{Name: "backend", Namespace: "default", Policy: pol,
			Endpoints: []*controlplanev1.Endpoint{{Instance: instance, Address: "127.0.0.1:1", SpiffeId: id, Health: controlplanev1.Health_HEALTH_HEALTHY}}}}}
	}
	if err := s.applySnapshot(snap("backend-0", &controlplanev1.TrafficPolicy{})); err != nil {
		t.Fatal(err)
	}
	bad := &controlplanev1.TrafficPolicy{OutlierDetection: &controlplanev1.OutlierDetection{ConsecutiveErrors: 5, MaxEjectionPercent: 150}}
	if err := s.applySnapshot(snap("backend-1", bad)); err == nil {
		t.Error("a snapshot with maxEjectionPercent 150 was accepted")
	}
	stats := u.lb.Stats()
	if len(stats) != 1 || stats[0].Key != "backend-0" {
		t.Errorf("endpoints after the refused snapshot: %+v, want backend-0 only (the last good snapshot)", stats)
	}
	if pol := u.state.Load().policy; pol.GetOutlierDetection().GetMaxEjectionPercent() != 0 {
		t.Errorf("the refused snapshot's policy is in force: %v", pol)
	}
}

// TestRefusedRoutingStillTakesTrust: a snapshot refused for its traffic
// policy still brings its trust bundle in (a root added for a rotation, or
// one removed from the mesh, must not wait for a policy the sidecar can
// take), while the last good routing stays in force.
func TestRefusedRoutingStillTakesTrust(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("strait.example")
	c := catest.New(t, td.Name())
	s, err := New(Config{TrustDomain: td, ControlPlane: "127.0.0.1:1",
		TrustBundle: c.Bundle(), Instance: "frontend-0", Service: "frontend", Namespace: "default",
		Inbound: "127.0.0.1:0", App: "127.0.0.1:1", Upstreams: map[string]string{"backend": "127.0.0.1:0"}})
	if err != nil {
		t.Fatal(err)
	}
	u, err := s.out.addUpstream("backend")
	if err != nil {
		t.Fatal(err)
	}
	id := "spiffe://strait.example/ns/default/sa/backend"
	ep := func(instance string) []*controlplanev1.Endpoint {
		return []*controlplanev1.Endpoint{{Instance: instance, Address: "127.0.0.1:1", SpiffeId: id, Health: controlplanev1.Health_HEALTH_HEALTHY}}
	}
	if err := s.applySnapshot(&controlplanev1.Snapshot{Services: []*controlplanev1.Service{{Name: "backend", Namespace: "default", Endpoints: ep("backend-0")}}}); err != nil {
		t.Fatal(err)
	}
	next := catest.New(t, td.Name()) // the root of a rotation
	grown, err := bundle.New(td, c.Bundle().Sequence()+1, append(c.Bundle().Roots(), next.Bundle().Roots()...))
	if err != nil {
		t.Fatal(err)
	}
	tb := &controlplanev1.TrustBundle{TrustDomain: td.Name(), Sequence: grown.Sequence(), Digest: grown.Digest()}
	for _, r := range grown.Roots() {
		tb.Roots = append(tb.Roots, r.Raw)
	}
	bad := &controlplanev1.TrafficPolicy{OutlierDetection: &controlplanev1.OutlierDetection{ConsecutiveErrors: 5, MaxEjectionPercent: 150}}
	err = s.applySnapshot(&controlplanev1.Snapshot{Bundle: tb, Services: []*controlplanev1.Service{{Name: "backend", Namespace: "default", Policy: bad, Endpoints: ep("backend-1")}}})
	var rr *routingRefused
	if !errors.As(err, &rr) {
		t.Fatalf("applySnapshot = %v, want its routing refused", err)
	}
	if got := s.creds.Bundle(); got == nil || got.Digest() != grown.Digest() {
		t.Errorf("bundle after the refused snapshot: %v, want the snapshot's (the new root trusted)", got)
	}
	if stats := u.lb.Stats(); len(stats) != 1 || stats[0].Key != "backend-0" {
		t.Errorf("endpoints after the refused snapshot: %+v, want backend-0 only (the last good routing)", stats)
	}
}
