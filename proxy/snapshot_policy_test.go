package proxy

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// TestInvalidPolicyRefusesWholeSnapshot: a snapshot whose traffic
// policy the balancer cannot take is refused whole, not half applied (new
// endpoints with the old balancer settings, and the snapshot recorded as
// in force).
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
