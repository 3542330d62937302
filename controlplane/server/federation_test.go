package server

import (
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/registry"
	"github.com/straitmesh/strait/controlplane/store"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// report simulates a live gateway of this cluster reporting what peers
// export, as WatchGateway and ReportPeers record it.
func report(s *Server, entry string, reports ...*controlplanev1.PeerReport) {
	s.mu.Lock()
	g := s.gateways["gw-0"]
	if g == nil {
		g = &gatewayNode{name: "gw-0", streams: 1}
		s.gateways["gw-0"] = g
	}
	g.entry = entry
	g.reports = map[string]*controlplanev1.PeerReport{}
	for _, r := range reports {
		g.reports[r.GetPeer()] = r
	}
	g.reported = time.Now()
	s.mu.Unlock()
}

func exported(name, protocol string, healthy uint32) *federationv1.ExportedService {
	return &federationv1.ExportedService{Namespace: "default", Name: name, Protocol: protocol, Ports: []uint32{MeshPort},
		SpiffeIds: []string{"spiffe://" + testTD + "/ns/default/sa/" + name}, Healthy: healthy, Total: healthy}
}

func TestFederationWorld(t *testing.T) {
	e := newTestEnv(t)
	s := e.srv
	ctx := t.Context()
	now := time.Now()
	for i, peer := range []string{"west", "south"} {
		if err := e.store.PutLink(store.Link{ID: "l-" + peer, Peer: peer, PeerGateways: []string{"127.0.0.1:1"}, Role: "issuer", Created: now.Add(time.Duration(i) * time.Second)}); err != nil {
			t.Fatal(err)
		}
	}
	applyYAML(t, e.store, "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: backend}\nspec: {toClusters: [west]}\n")
	id := spiffeid.RequireFromString("spiffe://" + testTD + "/ns/default/sa/backend")
	if err := e.reg.Register(ctx, registry.Instance{Name: "backend-0", Service: "backend", Namespace: "default", Address: "127.0.0.1:7000"}, id); err != nil {
		t.Fatal(err)
	}
	if err := e.reg.ReportHealth(ctx, "backend-0", controlplanev1.Health_HEALTH_HEALTHY, id); err != nil {
		t.Fatal(err)
	}
	// west exports payments (http); south exports payments as tcp: a
	// conflict, the older link (west) wins.
	report(s, "127.0.0.1:15443",
		&controlplanev1.PeerReport{Peer: "west", Imports: []*federationv1.ExportedService{exported("payments", "http", 2)}},
		&controlplanev1.PeerReport{Peer: "south", Imports: []*federationv1.ExportedService{exported("payments", "tcp", 1)}},
		&controlplanev1.PeerReport{Peer: "north", Imports: []*federationv1.ExportedService{exported("payments", "http", 9)}}, // not linked
	)
	if err := s.rebuild(ctx); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	w := s.world
	s.mu.Unlock()

	snap := snapshotFor(w, testCluster, "default", &controlplanev1.WatchRequest{Node: "fe", Upstreams: []string{"payments"}})
	eps := snap.GetServices()[0].GetEndpoints()
	if len(eps) != 1 || eps[0].GetCluster() != "west" || eps[0].GetTunnel().GetGatewayAddress() != "127.0.0.1:15443" || eps[0].GetWeight() != 2 ||
		eps[0].GetTunnel().GetGatewaySpiffeId() != "spiffe://"+testTD+"/cluster/"+testCluster+"/gateway" {
		t.Fatalf("remote endpoints of payments: %v", eps)
	}
	if c := w.fed.conflicts["south"]; len(c) != 1 || !strings.Contains(c[0], "default/payments") {
		t.Fatalf("conflicts: %v", w.fed.conflicts)
	}

	gs := gatewaySnapshot(w, testCluster)
	if len(gs.GetLinks()) != 2 || len(gs.GetExports()) != 1 {
		t.Fatalf("gateway snapshot: %v", gs)
	}
	ex := gs.GetExports()[0]
	if ex.GetService().GetName() != "backend" || ex.GetService().GetHealthy() != 1 || len(ex.GetEndpoints()) != 1 || ex.GetToClusters()[0] != "west" {
		t.Fatalf("export: %v", ex)
	}

	// Removing the link removes west's endpoints; south's export no
	// longer conflicts and is used.
	if err := e.store.DeleteLink("west"); err != nil {
		t.Fatal(err)
	}
	if err := s.rebuild(ctx); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	w = s.world
	s.mu.Unlock()
	snap = snapshotFor(w, testCluster, "default", &controlplanev1.WatchRequest{Node: "fe", Upstreams: []string{"payments"}})
	svc := snap.GetServices()[0]
	if len(svc.GetEndpoints()) != 1 || svc.GetEndpoints()[0].GetCluster() != "south" || svc.GetProtocol() != controlplanev1.Protocol_PROTOCOL_TCP {
		t.Fatalf("after removing west: %v", svc)
	}

	// No live gateway: no remote endpoints at all.
	s.mu.Lock()
	s.gateways["gw-0"].streams = 0
	s.mu.Unlock()
	if err := s.rebuild(ctx); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	w = s.world
	s.mu.Unlock()
	if eps := snapshotFor(w, testCluster, "default", &controlplanev1.WatchRequest{Node: "fe", Upstreams: []string{"payments"}}).GetServices()[0].GetEndpoints(); len(eps) != 0 {
		t.Fatalf("without a gateway: %v", eps)
	}
}

func TestAuthorizeFederation(t *testing.T) {
	e := newTestEnv(t)
	gw := "spiffe://" + testTD + "/cluster/" + testCluster + "/gateway"
	other := "spiffe://" + testTD + "/cluster/elsewhere/gateway"
	wl := "spiffe://" + testTD + "/ns/default/sa/backend"
	for _, tc := range []struct {
		method, caller string
		ok             bool
	}{
		{controlplanev1.FederationService_WatchGateway_FullMethodName, gw, true},
		{controlplanev1.FederationService_WatchGateway_FullMethodName, other, false},
		{controlplanev1.FederationService_WatchGateway_FullMethodName, wl, false},
		{controlplanev1.FederationService_ReportPeers_FullMethodName, "", false},
		{controlplanev1.FederationService_CreateJoinToken_FullMethodName, gw, false},
		{controlplanev1.FederationService_CreateJoinToken_FullMethodName, "spiffe://" + testTD + "/cluster/" + testCluster + "/admin", true},
	} {
		err := e.srv.authorize(withCaller(t.Context(), tc.caller), tc.method)
		if (err == nil) != tc.ok {
			t.Errorf("%s by %q: %v, want ok=%v", tc.method, tc.caller, err, tc.ok)
		}
	}
}

func TestFailoverTiers(t *testing.T) {
	f := &fedWorld{links: []store.Link{{Peer: "west"}, {Peer: "south"}, {Peer: "north"}}, rtt: map[string]time.Duration{"west": 9 * time.Millisecond, "south": 2 * time.Millisecond}}
	for _, tc := range []struct {
		name string
		p    *controlplanev1.Failover
		want map[string]uint32
	}{
		{"default: every peer in one tier", nil, map[string]uint32{"west": 1, "south": 1, "north": 1}},
		{"listed", &controlplanev1.Failover{Peers: []string{"south", "west"}}, map[string]uint32{"south": 1, "west": 2}},
		{"by rtt, unmeasured last", &controlplanev1.Failover{ByRtt: true}, map[string]uint32{"south": 1, "west": 2, "north": 3}},
	} {
		got := failoverTiers(tc.p, f)
		if len(got) != len(tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
			continue
		}
		for k, v := range tc.want {
			if got[k] != v {
				t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
			}
		}
	}
}
