package server

import (
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/store"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// With failover by RTT, two peers about as far away keep their order
// while their RTTs jitter across a rounding step (1.4 and 1.6 ms, then
// 1.55 and 1.45 ms): the tiers do not swap, moving traffic, on every
// report. A real change (one peer now 6 ms away) reorders them.
func TestFailoverByRTTHoldsThroughJitter(t *testing.T) {
	e := newTestEnv(t)
	s := e.srv
	ctx := t.Context()
	now := time.Now()
	for i, peer := range []string{"a", "b"} {
		if err := e.store.PutLink(store.Link{ID: "l-" + peer, Peer: peer, PeerGateways: []string{"127.0.0.1:1"}, Role: "issuer", Created: now.Add(time.Duration(i) * time.Second)}); err != nil {
			t.Fatal(err)
		}
	}
	applyYAML(t, e.store, "apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: payments, namespace: default}\nspec:\n  service: payments\n  failover: {order: rtt}\n")
	first := func(rttA, rttB time.Duration) string {
		t.Helper()
		heard := timestamppb.New(time.Now())
		report(s, "127.0.0.1:15443",
			&controlplanev1.PeerReport{Peer: "a", ControlStreamUp: true, Rtt: durationpb.New(rttA), LastHeard: heard, Imports: []*federationv1.ExportedService{exported("payments", "http", 2)}},
			&controlplanev1.PeerReport{Peer: "b", ControlStreamUp: true, Rtt: durationpb.New(rttB), LastHeard: heard, Imports: []*federationv1.ExportedService{exported("payments", "http", 2)}},
		)
		if err := s.rebuild(ctx); err != nil {
			t.Fatal(err)
		}
		s.mu.Lock()
		w := s.world
		s.mu.Unlock()
		snap := snapshotFor(w, testCluster, "default", &controlplanev1.WatchRequest{Node: "fe", Upstreams: []string{"payments"}})
		prio := map[string]uint32{}
		for _, ep := range snap.GetServices()[0].GetEndpoints() {
			prio[ep.GetCluster()] = ep.GetPriority()
		}
		if prio["a"] < prio["b"] {
			return "a"
		}
		return "b"
	}
	if got := first(1600*time.Microsecond, 1400*time.Microsecond); got != "b" {
		t.Fatalf("a at 1.6 ms, b at 1.4 ms: %s first, want b", got)
	}
	if got := first(1450*time.Microsecond, 1550*time.Microsecond); got != "b" {
		t.Fatalf("after jitter (a 1.45 ms, b 1.55 ms): %s first, want b still", got)
	}
	if got := first(1500*time.Microsecond, 6*time.Millisecond); got != "a" {
		t.Fatalf("b now 6 ms away: %s first, want a", got)
	}
}
