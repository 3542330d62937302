package server

import (
	"testing"
	"time"
)

// With failover by RTT, two peers about as far away keep their order
// while their RTTs jitter across a rounding step (1.4 and 1.6 ms, then
// 1.55 and 1.45 ms): the tiers do not swap, moving traffic, on every
// report. A real change (one peer now 6 ms away) reorders them.
func TestFailoverByRTTHoldsThroughJitter(t *testing.T) {
	e := rttFailoverEnv(t, "a", "b")
	first := func(rttA, rttB time.Duration) string {
		t.Helper()
		if prio := rttPriorities(t, e.srv, map[string]time.Duration{"a": rttA, "b": rttB}); prio["a"] < prio["b"] {
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
