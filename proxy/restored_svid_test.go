package proxy

import (
	"context"
	"testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/straitmesh/strait/ca/catest"
)

// TestRestoredSVIDSetsExpiryMetric: a sidecar restarted with its
// saved SVID reports that SVID's expiry, not 0 (1970: "expired"), until
// its first renewal.
func TestRestoredSVIDSetsExpiryMetric(t *testing.T) {
	c := catest.New(t, "example.org")
	cp := startTokenCP(t, c)
	dir := t.TempDir()
	a := testAgent(t, c, cp, "good", dir)
	if err := a.bootstrap(context.Background()); err != nil {
		t.Fatal(err)
	}
	b := testAgent(t, c, cp, "", dir)
	if err := b.bootstrap(context.Background()); err != nil {
		t.Fatalf("bootstrap from the saved SVID: %v", err)
	}
	var m dto.Metric
	if err := b.metrics.svidExpiry.Write(&m); err != nil {
		t.Fatal(err)
	}
	if got, want := m.GetGauge().GetValue(), float64(b.creds.Expiry().Unix()); got != want {
		t.Errorf("strait_proxy_svid_expiry_timestamp_seconds after a restart = %v, want %v (the restored SVID's expiry)", got, want)
	}
}
