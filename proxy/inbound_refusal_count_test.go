package proxy

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	dto "github.com/prometheus/client_model/go"
)

// A request the inbound sidecar refuses itself (an upgrade, answered 501)
// is counted in strait_proxy_requests_total like any other: the caller got
// a 5xx, and the operator looking at the destination's metrics must see it.
func TestInboundRefusalCounted(t *testing.T) {
	in, _, cs := newEdgeInbound(t, "127.0.0.1:1", "spiffe://strait.example/ns/default/sa/frontend")
	r := httptest.NewRequest("GET", "http://backend/ws", nil)
	r.Header.Set("Connection", "Upgrade")
	r.Header.Set("Upgrade", "websocket")
	r.TLS = &cs
	r = r.WithContext(in.connContext(context.Background(), nil))
	w := httptest.NewRecorder()
	in.ServeHTTP(w, r)
	if w.Code != http.StatusNotImplemented {
		t.Fatalf("upgrade answered %d, want 501", w.Code)
	}
	var m dto.Metric
	if err := in.metrics.requests.WithLabelValues("inbound", "spiffe://strait.example/ns/default/sa/frontend", "backend", "5xx").Write(&m); err != nil {
		t.Fatal(err)
	}
	if got := m.GetCounter().GetValue(); got != 1 {
		t.Errorf("requests_total{inbound,5xx} = %v after a refused upgrade, want 1", got)
	}
}
