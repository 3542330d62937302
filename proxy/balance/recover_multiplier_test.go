package balance

import (
	"testing"
	"time"
)

// An endpoint un-ejected by a health recovery that then stays in rotation
// for a full MaxEjectionTime must have its ejection multiplier restart, as
// any other endpoint's does: a later failure burst ejects it for the base
// time, not for longer.
func TestRecoveredEndpointMultiplierRestarts(t *testing.T) {
	local := Endpoint{Key: "a", Address: "10.0.0.1:8443", Healthy: true}
	west := Endpoint{Key: "west", Address: "10.0.0.9:15443", Healthy: true, Priority: 1}
	base := 30 * time.Second
	b, clk := newTestBalancer(t, Config{Outlier: OutlierConfig{ConsecutiveErrors: 3, BaseEjectionTime: base, MaxEjectionPercent: 50}},
		[]Endpoint{local, west})
	failLocal := func() {
		for range 3 {
			p := mustPick(t, b)
			if p.Endpoint.Key != local.Key {
				t.Fatalf("picked %s, want %s", p.Endpoint.Key, local.Key)
			}
			p.Done(time.Millisecond, Failure)
		}
	}
	failLocal()
	down := local
	down.Healthy = false
	b.Update([]Endpoint{down, west})
	clk.Advance(5 * time.Second)
	b.Update([]Endpoint{local, west})
	// In rotation for well over MaxEjectionTime.
	clk.Advance(MaxEjectionTime + time.Minute)
	failLocal()
	for _, s := range b.Stats() {
		if s.Endpoint.Key != local.Key {
			continue
		}
		if !s.Ejected {
			t.Fatal("not ejected")
		}
		if got := s.EjectedUntil.Sub(clk.Now()); got != base {
			t.Fatalf("ejected for %s (times %d), want %s: the multiplier never restarts after a health recovery", got, s.TimesEjected, base)
		}
	}
}
