package server

import (
	"maps"
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// With failover by RTT, two peers about as far away keep their order
// while their RTTs jitter across a rounding step (1.4 and 1.6 ms, then
// 1.55 and 1.45 ms): the tiers do not swap, moving traffic, on every
// report. A real change (one peer now 6 ms away) reorders them.
func TestFailoverByRTTHoldsThroughJitter(t *testing.T) {
	e := rttFailoverEnv(t, "a", "b")
	first := func(rttA, rttB time.Duration) string {
		t.Helper()
		return firstOf(rttPriorities(t, e.srv, map[string]time.Duration{"a": rttA, "b": rttB}))
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

// With two live gateways, only the newer report feeds the hold: the older
// one (10 ms to both peers) went through it too, reset what was held, and
// let the newer one's jitter swap the tiers.
func TestFailoverByRTTHoldsWithTwoGateways(t *testing.T) {
	e := rttFailoverEnv(t, "a", "b")
	s := e.srv
	reportAs := func(name string, at time.Time, rtt map[string]time.Duration) {
		s.mu.Lock()
		defer s.mu.Unlock()
		g := s.gateways[name]
		if g == nil {
			g = &gatewayNode{name: name, streams: 1}
			s.gateways[name] = g
		}
		g.entry = "127.0.0.1:15443"
		g.reports = map[string]*controlplanev1.PeerReport{}
		for _, peer := range slices.Sorted(maps.Keys(rtt)) {
			g.reports[peer] = &controlplanev1.PeerReport{Peer: peer, ControlStreamUp: true, Rtt: durationpb.New(rtt[peer]), LastHeard: timestamppb.New(at), Imports: []*federationv1.ExportedService{exported("payments", "http", 2)}}
		}
		g.reported = at
	}
	first := func(rttA, rttB time.Duration) string {
		t.Helper()
		now := time.Now()
		reportAs("gw-a", now.Add(-time.Second), map[string]time.Duration{"a": 10 * time.Millisecond, "b": 10 * time.Millisecond})
		reportAs("gw-b", now, map[string]time.Duration{"a": rttA, "b": rttB})
		return firstOf(snapshotPriorities(t, s))
	}
	if got := first(1600*time.Microsecond, 1400*time.Microsecond); got != "b" {
		t.Fatalf("a at 1.6 ms, b at 1.4 ms: %s first, want b", got)
	}
	if got := first(1450*time.Microsecond, 1550*time.Microsecond); got != "b" {
		t.Fatalf("after jitter: %s first, want b still", got)
	}
}

// firstOf is the peer of a and b whose tier comes first.
func firstOf(prio map[string]uint32) string {
	if prio["a"] < prio["b"] {
		return "a"
	}
	return "b"
}
