package proxy

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// A snapshot that drops an endpoint (a peer unlinked or expired, an
// instance gone) drops the pool toward it; a request in flight on it then
// returns its connection to that pool, which nothing uses or sweeps any
// more: the connection stayed open for ever (a descriptor and a session
// to an endpoint no longer in the mesh's view, per request in flight).
func TestDroppedPoolClosesConnectionsReturnedLater(t *testing.T) {
	release := make(chan struct{})
	closed := make(chan struct{}, 1)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
		io.WriteString(w, "ok")
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateClosed {
			closed <- struct{}{}
		}
	}
	srv.Start()
	defer srv.Close()

	o, _ := newBackendOutbound(t)
	const id = "spiffe://strait.example/ns/default/sa/backend"
	addr := srv.Listener.Addr().String()
	snap := func(eps ...*controlplanev1.Endpoint) []*controlplanev1.Service {
		return []*controlplanev1.Service{{Name: "backend", Namespace: "default", Policy: &controlplanev1.TrafficPolicy{}, Endpoints: eps}}
	}
	o.apply(snap(&controlplanev1.Endpoint{Instance: "backend-0", Address: addr, SpiffeId: id, Health: controlplanev1.Health_HEALTH_HEALTHY}))
	p, _ := newTestPool(srv, 0)
	o.tmu.Lock()
	o.transports[transportKey{"backend", addr, id, false}] = p
	o.tmu.Unlock()

	done := make(chan error, 1)
	go func() {
		req, _ := http.NewRequest("GET", srv.URL, nil)
		resp, err := p.RoundTrip(req)
		if err == nil {
			_, err = io.ReadAll(resp.Body)
			resp.Body.Close()
		}
		done <- err
	}()
	time.Sleep(100 * time.Millisecond) // the request is in flight
	o.apply(snap(&controlplanev1.Endpoint{Instance: "backend-1", Address: "127.0.0.1:1", SpiffeId: id, Health: controlplanev1.Health_HEALTH_HEALTHY}))
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	select {
	case <-closed:
	case <-time.After(2 * time.Second):
		t.Fatal("the connection of a request that ended after its endpoint left the snapshot is still open")
	}
}
