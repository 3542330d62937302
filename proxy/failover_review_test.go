package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/gateway/tunnel"
)

// alpnRecorder is a TLS listener that records the ALPN protocols each
// client offers, then refuses the handshake.
func alpnRecorder(t *testing.T) (string, chan []string) {
	t.Helper()
	seen := make(chan []string, 16)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		seen <- slices.Clone(h.SupportedProtos)
		return nil, errors.New("recorded")
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { c.(*tls.Conn).Handshake(); c.Close() }()
		}
	}()
	return ln.Addr().String(), seen
}

// A request that read the upstream's state just before a snapshot added a
// peer's endpoint (what failover does the moment local endpoints go) and
// then picked that endpoint must still reach it through the tunnel: the
// tunnel was looked up in the state the request started with, so the
// gateway's entry address was dialled as if it were the workload.
func TestPickDuringSnapshotChangeUsesTunnel(t *testing.T) {
	o, u := newBackendOutbound(t)
	gw, seen := alpnRecorder(t)
	const td = "strait.example"
	id := "spiffe://" + td + "/ns/default/sa/backend"
	local := &controlplanev1.Endpoint{Instance: "backend-0", Address: "127.0.0.1:1", SpiffeId: id, Health: controlplanev1.Health_HEALTH_HEALTHY}
	o.apply([]*controlplanev1.Service{{Name: "backend", Namespace: "default", Policy: &controlplanev1.TrafficPolicy{}, Endpoints: []*controlplanev1.Endpoint{local}}})

	st := u.state.Load() // RoundTrip reads the state first ...
	// ... a snapshot lands: the local endpoint is gone, west's comes in.
	o.apply([]*controlplanev1.Service{{Name: "backend", Namespace: "default", Policy: &controlplanev1.TrafficPolicy{}, Endpoints: []*controlplanev1.Endpoint{
		{Instance: "west/backend", Address: gw, SpiffeId: id, Health: controlplanev1.Health_HEALTH_HEALTHY, Cluster: "west", Priority: 1,
			Tunnel: &controlplanev1.Tunnel{GatewayAddress: gw, GatewaySpiffeId: "spiffe://" + td + "/gateway/east", Cluster: "west", Port: 443}},
	}}})
	pick, err := u.lb.Pick() // ... and the request picks from the new set.
	if err != nil {
		t.Fatal(err)
	}
	defer pick.Done(0, 2)
	if pick.Endpoint.Key != "west/backend" {
		t.Fatalf("picked %s", pick.Endpoint.Key)
	}
	p, err := o.transport(pick.Endpoint, st, false)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("GET", "https://backend/", nil)
	if resp, err := p.RoundTrip(req); err == nil {
		resp.Body.Close()
	}
	protos := <-seen
	if !slices.Contains(protos, tunnel.ALPNEntryRaw) {
		t.Fatalf("the gateway was dialled offering ALPN %q, not through a tunnel (%s): the peer's endpoint was dialled as a local workload", protos, tunnel.ALPNEntryRaw)
	}
}

// Failover tiers beyond balance.MaxPriority keep their order: a policy
// listing nine peers, where only the eighth and ninth export the service,
// sends everything to the eighth while it is healthy (explain says so too),
// instead of splitting it with the ninth because both were clamped into
// one tier.
func TestFailoverTiersBeyondMaxPriorityKeepOrder(t *testing.T) {
	o, u := newBackendOutbound(t)
	const td = "strait.example"
	id := "spiffe://" + td + "/ns/default/sa/backend"
	var eps []*controlplanev1.Endpoint
	for _, p := range []uint32{8, 9} {
		peer := fmt.Sprintf("peer-%d", p)
		eps = append(eps, &controlplanev1.Endpoint{Instance: peer + "/backend", Address: "127.0.0.1:2", SpiffeId: id, Health: controlplanev1.Health_HEALTH_HEALTHY,
			Cluster: peer, Priority: p, Weight: 1,
			Tunnel: &controlplanev1.Tunnel{GatewayAddress: "127.0.0.1:2", GatewaySpiffeId: "spiffe://" + td + "/gateway/east", Cluster: peer, Port: 443}})
	}
	o.apply([]*controlplanev1.Service{{Name: "backend", Namespace: "default", Policy: &controlplanev1.TrafficPolicy{}, Endpoints: eps}})
	got := map[string]int{}
	for range 200 {
		p, err := u.lb.Pick()
		if err != nil {
			t.Fatal(err)
		}
		got[p.Endpoint.Key]++
		p.Done(0, 2)
	}
	if got["peer-9/backend"] > 0 {
		t.Fatalf("picks %v: the ninth peer in failover order got traffic while the eighth is healthy", got)
	}
}

// With the default failover policy every exporting peer is in one tier,
// each peer's endpoint weighted by its healthy instances (the discovery
// API's Endpoint.weight). When the local cluster fails, a peer running
// nine healthy instances must take about nine tenths of the traffic, not
// half of it with the other half on a peer that runs one.
func TestPeerEndpointsWeightedByHealthyInstances(t *testing.T) {
	for _, lb := range []controlplanev1.LoadBalancer{controlplanev1.LoadBalancer_LOAD_BALANCER_UNSPECIFIED, controlplanev1.LoadBalancer_LOAD_BALANCER_ROUND_ROBIN, controlplanev1.LoadBalancer_LOAD_BALANCER_LEAST_REQUEST} {
		t.Run(lb.String(), func(t *testing.T) {
			o, u := newBackendOutbound(t)
			const td = "strait.example"
			id := "spiffe://" + td + "/ns/default/sa/backend"
			var eps []*controlplanev1.Endpoint
			for peer, w := range map[string]uint32{"west": 9, "south": 1} {
				eps = append(eps, &controlplanev1.Endpoint{Instance: peer + "/backend", Address: "127.0.0.1:2", SpiffeId: id, Health: controlplanev1.Health_HEALTH_HEALTHY,
					Cluster: peer, Priority: 1, Weight: w,
					Tunnel: &controlplanev1.Tunnel{GatewayAddress: "127.0.0.1:2", GatewaySpiffeId: "spiffe://" + td + "/gateway/east", Cluster: peer, Port: 443}})
			}
			eps = append(eps, &controlplanev1.Endpoint{Instance: "backend-0", Address: "127.0.0.1:3", SpiffeId: id, Health: controlplanev1.Health_HEALTH_UNHEALTHY})
			o.apply([]*controlplanev1.Service{{Name: "backend", Namespace: "default", Policy: &controlplanev1.TrafficPolicy{LoadBalancer: lb}, Endpoints: eps}})
			got := map[string]int{}
			const n = 2000
			for range n {
				p, err := u.lb.Pick()
				if err != nil {
					t.Fatal(err)
				}
				got[p.Endpoint.Key]++
				p.Done(0, 2)
			}
			if share := float64(got["west/backend"]) / n; share < 0.8 {
				t.Fatalf("picks %v: west, with 9 of the 10 healthy instances, got %.2f of the traffic", got, share)
			}
		})
	}
}

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
