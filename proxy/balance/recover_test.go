package balance

import (
	"testing"
	"time"
)

// An instance of the local cluster crashes: the caller's outlier detection
// ejects it (for 30s) and the control plane marks it unhealthy. It comes
// back under the same name and the control plane says it is healthy
// again: traffic must fail back now, not when the ejection, which was
// about the crash, runs out (and a second crash's ejection lasts 60s, and
// so on up to 5 minutes).
func TestRecoveredEndpointIsUnejected(t *testing.T) {
	local := Endpoint{Key: "backend-e0", Address: "10.0.0.1:8443", Healthy: true}
	west := Endpoint{Key: "west/backend", Address: "10.0.0.9:15443", Healthy: true, Priority: 1}
	b, clk := newTestBalancer(t, Config{Outlier: OutlierConfig{ConsecutiveErrors: 3, BaseEjectionTime: 30 * time.Second, MaxEjectionPercent: 50}},
		[]Endpoint{local, west})
	for range 3 {
		p, err := b.Pick()
		if err != nil {
			t.Fatal(err)
		}
		if p.Endpoint.Key != local.Key {
			t.Fatalf("picked %s before the crash", p.Endpoint.Key)
		}
		p.Done(time.Millisecond, Failure)
	}
	if p, _ := b.Pick(); p.Endpoint.Key != west.Key {
		t.Fatalf("picked %s after the crash, want west", p.Endpoint.Key)
	} else {
		p.Done(time.Millisecond, Success)
	}
	// The control plane: unhealthy, then healthy again 5s later.
	down := local
	down.Healthy = false
	b.Update([]Endpoint{down, west})
	clk.Advance(5 * time.Second)
	b.Update([]Endpoint{local, west})
	p, err := b.Pick()
	if err != nil {
		t.Fatal(err)
	}
	p.Done(time.Millisecond, Success)
	if p.Endpoint.Key != local.Key {
		t.Fatalf("picked %s: the recovered local instance stays ejected while the control plane reports it healthy", p.Endpoint.Key)
	}
}
