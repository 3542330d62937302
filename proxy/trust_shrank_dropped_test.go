package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	strca "github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/proxy/balance"
)

// A pooled upstream connection whose pool was already dropped (here by
// the SVID moving to the re-signed intermediate at activate) and that is
// still busy (a long streaming response) must still be cut when the root
// its upstream chains to leaves the bundle: the upstream may be an
// impostor holding the removed root's key, which will not cut it itself.
func TestTrustShrankCutsBusyConnOfDroppedPool(t *testing.T) {
	const td = "strait.example"
	c := catest.New(t, td, catest.Options{Cluster: "east"})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		for r.Context().Err() == nil {
			io.WriteString(w, "x")
			w.(http.Flusher).Flush()
			time.Sleep(20 * time.Millisecond)
		}
	})}
	go app.Serve(appLn)
	defer app.Close()

	// The upstream keeps the old root (as an impostor would): it never
	// cuts the connection itself.
	backend, frontend := newCPlessSidecar(t, c, "backend", appLn.Addr().String()), newCPlessSidecar(t, c, "frontend", appLn.Addr().String())
	backend.in.setPolicy(compileAuthorization(&controlplanev1.Authorization{}))
	inAddr := serveInbound(ctx, t, backend)
	frontend.out.busyGrace = 200 * time.Millisecond
	go frontend.credentialsLoop(ctx)

	for _, h2 := range []bool{false, true} {
		o := frontend.out
		st := &upstreamState{svc: &controlplanev1.Service{Name: "backend"}, policy: &controlplanev1.TrafficPolicy{}}
		ep := balance.Endpoint{Key: "backend-0", Address: inAddr, SPIFFEID: "spiffe://" + td + "/ns/default/sa/backend"}
		p, err := o.transport(ep, st, h2)
		if err != nil {
			t.Fatal(err)
		}
		req, _ := http.NewRequest("GET", "https://backend/stream", nil)
		resp, err := p.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if _, err := io.ReadFull(resp.Body, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		go io.Copy(io.Discard, resp.Body)
		// Every pool is dropped (as svidMoved at activate, or a snapshot
		// without the endpoint, does); the stream goes on on its
		// connection, which no pool holds any more.
		o.dropPools()
	}
	a := c.Authority
	if _, err := a.Prepare(ctx, strca.PrepareOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := frontend.creds.SetBundle(a.Bundle()); err != nil {
		t.Fatal(err)
	}
	if err := a.Activate(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Retire(ctx, strca.RetireOptions{Acknowledged: true}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if _, err := frontend.creds.SetBundle(a.Bundle()); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		n := 0
		frontend.out.pooled.Range(func(_, _ any) bool { n++; return true })
		if n == 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	n := 0
	frontend.out.pooled.Range(func(_, _ any) bool { n++; return true })
	t.Fatalf("%d pooled connection(s) to an upstream chained to the removed root still open 3s after it left the bundle (busy grace 200ms)", n)
}
