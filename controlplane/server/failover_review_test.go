package server

import (
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/registry"
	"github.com/straitmesh/strait/controlplane/store"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// A peer whose export of the service expired (not heard from for longer
// than the service's staleness, the partition case) is not used; explain
// must say so, instead of claiming no linked peer exports the service.
func TestExplainNamesStalePeer(t *testing.T) {
	e := newTestEnv(t)
	s := e.srv
	ctx := t.Context()
	if err := e.store.PutLink(store.Link{ID: "l-west", Peer: "west", PeerGateways: []string{"127.0.0.1:1"}, Role: "issuer", Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	report(s, "127.0.0.1:15443", &controlplanev1.PeerReport{Peer: "west", Imports: []*federationv1.ExportedService{exported("payments", "http", 2)},
		LastHeard: timestamppb.New(time.Now().Add(-time.Minute))})
	if err := s.rebuild(ctx); err != nil {
		t.Fatal(err)
	}
	r, err := adminServer{s: s}.Explain(ctx, &controlplanev1.ExplainRequest{Service: "payments"})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.GetTiers()) != 0 {
		t.Fatalf("tiers %v: west's expired export is used", r.GetTiers())
	}
	found := false
	for _, x := range r.GetExcluded() {
		found = found || strings.HasPrefix(x, "west:")
	}
	if !found || strings.Contains(r.GetSummary(), "no linked peer exports it") {
		t.Fatalf("explain says %q, left out %q: nothing about west's export having expired", r.GetSummary(), r.GetExcluded())
	}
}

// With failover by RTT, the nearest peer comes first: a peer in the same
// data centre, 400µs away, before one 5ms away. Its RTT was rounded to
// 0ms and taken for "not measured", so it went last.
func TestFailoverByRTTSubMillisecondPeerFirst(t *testing.T) {
	e := rttFailoverEnv(t, "far", "near")
	prio := rttPriorities(t, e.srv, map[string]time.Duration{"far": 5 * time.Millisecond, "near": 400 * time.Microsecond})
	if !(prio["near"] < prio["far"]) {
		t.Fatalf("priorities %v: the peer 400µs away comes after the one 5ms away", prio)
	}
}

// rttFailoverEnv links peers (in that order) and fails payments over by
// RTT.
func rttFailoverEnv(t *testing.T, peers ...string) *testEnv {
	t.Helper()
	e := newTestEnv(t)
	now := time.Now()
	for i, peer := range peers {
		if err := e.store.PutLink(store.Link{ID: "l-" + peer, Peer: peer, PeerGateways: []string{"127.0.0.1:1"}, Role: "issuer", Created: now.Add(time.Duration(i) * time.Second)}); err != nil {
			t.Fatal(err)
		}
	}
	applyYAML(t, e.store, "apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: payments, namespace: default}\nspec:\n  service: payments\n  failover: {order: rtt}\n")
	return e
}

// rttPriorities has the gateway report each peer up, exporting payments,
// at the RTT given, and returns the failover priority a sidecar's snapshot
// then gives each peer's endpoints.
func rttPriorities(t *testing.T, s *Server, rtt map[string]time.Duration) map[string]uint32 {
	t.Helper()
	heard := timestamppb.New(time.Now())
	var reports []*controlplanev1.PeerReport
	for _, peer := range slices.Sorted(maps.Keys(rtt)) {
		reports = append(reports, &controlplanev1.PeerReport{Peer: peer, ControlStreamUp: true, Rtt: durationpb.New(rtt[peer]), LastHeard: heard, Imports: []*federationv1.ExportedService{exported("payments", "http", 2)}})
	}
	report(s, "127.0.0.1:15443", reports...)
	return snapshotPriorities(t, s)
}

// snapshotPriorities rebuilds s and returns the failover priority a
// sidecar's snapshot gives each cluster's payments endpoints.
func snapshotPriorities(t *testing.T, s *Server) map[string]uint32 {
	t.Helper()
	if err := s.rebuild(t.Context()); err != nil {
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
	return prio
}

// explain --from counts as unhealthy only what the sidecar ejects now: an
// ejection it reported whose time is over (the sidecar already sends to
// that endpoint again; it reports every few seconds) is not one.
func TestExplainFromIgnoresEndedEjections(t *testing.T) {
	e := newTestEnv(t)
	s := e.srv
	ctx := t.Context()
	id := spiffeid.RequireFromString("spiffe://" + testTD + "/ns/default/sa/backend")
	for _, n := range []string{"backend-0", "backend-1"} {
		if err := e.reg.Register(ctx, registry.Instance{Name: n, Service: "backend", Namespace: "default", Address: "127.0.0.1:7000"}, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.rebuild(ctx); err != nil {
		t.Fatal(err)
	}
	fe := spiffeid.RequireFromString("spiffe://" + testTD + "/ns/default/sa/frontend")
	n, wake := s.attach("frontend-0", fe)
	defer s.detach(n, wake)
	s.mu.Lock()
	n.sentVersion, n.upTo = s.world.version, s.world.version
	s.mu.Unlock()
	s.noteEjections("frontend-0", fe, []*controlplanev1.Ejection{
		{Service: "backend", Endpoint: "backend-0", Until: timestamppb.New(time.Now().Add(-time.Second))},
	})
	r, err := adminServer{s: s}.Explain(ctx, &controlplanev1.ExplainRequest{Service: "backend", From: "frontend-0"})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.GetFrom().GetEjected()) != 0 || r.GetTiers()[0].GetHealthy() != 2 {
		t.Fatalf("explain --from: ejected %v, tier %v: an ejection that ended still counts", r.GetFrom().GetEjected(), r.GetTiers()[0])
	}
}

// explain says part of the traffic spills to the next tier only when
// there is one with a healthy endpoint: the sidecar's balancer keeps
// everything in the last tier that has candidates, below the threshold
// or not.
func TestExplainSpillNeedsNextTier(t *testing.T) {
	policy := &controlplanev1.TrafficPolicy{Failover: &controlplanev1.Failover{SpillThresholdPercent: 80}}
	local := &controlplanev1.ExplainTier{Priority: 0, Clusters: []string{"local"}, Healthy: 1, Total: 2}
	for _, tc := range []struct {
		name  string
		tiers []*controlplanev1.ExplainTier
		spill bool
	}{
		{"no other tier", []*controlplanev1.ExplainTier{local}, false},
		{"next tier unhealthy", []*controlplanev1.ExplainTier{local, {Priority: 1, Clusters: []string{"west"}, Healthy: 0, Total: 1}}, false},
		{"next tier healthy", []*controlplanev1.ExplainTier{local, {Priority: 1, Clusters: []string{"west"}, Healthy: 1, Total: 1}}, true},
	} {
		r := &controlplanev1.ExplainResponse{Namespace: "default", Service: "payments", Policy: policy, Tiers: tc.tiers}
		got := strings.Contains(explainSummary(r), "moves to the next tier")
		if got != tc.spill {
			t.Errorf("%s: %q, want a spill said: %v", tc.name, explainSummary(r), tc.spill)
		}
	}
}

// A peer named in the policy's failover peers but not linked (a typo, or
// a link not made yet) is named among those left out.
func TestExplainNamesUnlinkedPolicyPeer(t *testing.T) {
	e := newTestEnv(t)
	s := e.srv
	ctx := t.Context()
	if err := e.store.PutLink(store.Link{ID: "l-west", Peer: "west", PeerGateways: []string{"127.0.0.1:1"}, Role: "issuer", Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	applyYAML(t, e.store, "apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: payments, namespace: default}\nspec:\n  service: payments\n  failover: {peers: [wset, west]}\n")
	report(s, "127.0.0.1:15443", &controlplanev1.PeerReport{Peer: "west", ControlStreamUp: true, LastHeard: timestamppb.Now(), Imports: []*federationv1.ExportedService{exported("payments", "http", 2)}})
	if err := s.rebuild(ctx); err != nil {
		t.Fatal(err)
	}
	r, err := adminServer{s: s}.Explain(ctx, &controlplanev1.ExplainRequest{Service: "payments"})
	if err != nil {
		t.Fatal(err)
	}
	want := "wset: named in the policy's failover peers, but not linked to this cluster"
	if !slices.Contains(r.GetExcluded(), want) {
		t.Fatalf("left out %q, want %q among them", r.GetExcluded(), want)
	}
	for _, x := range r.GetExcluded() {
		if strings.HasPrefix(x, "west:") {
			t.Fatalf("west, linked and named, is left out: %q", x)
		}
	}
}
