package agent

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/gateway"
)

func svc(name string, healthy uint32) *federationv1.ExportedService {
	return &federationv1.ExportedService{Namespace: "default", Name: name, Protocol: "http", Ports: []uint32{443},
		SpiffeIds: []string{"spiffe://strait.example/ns/default/sa/" + name}, Healthy: healthy, Total: healthy}
}

func TestCatalogAnswers(t *testing.T) {
	c := newCatalog()
	changed := c.resubscribe()
	linksChanged, exportsChanged := c.setSnapshot(&controlplanev1.GatewaySnapshot{
		Links: []*controlplanev1.Link{{Peer: "west", PeerGatewayAddresses: []string{"127.0.0.1:1"}}, {Peer: "south"}},
		Exports: []*controlplanev1.GatewayExport{
			{Service: svc("backend", 2), Endpoints: []string{"127.0.0.1:7000", "127.0.0.1:7001"}},
			{Service: svc("payments", 0), ToClusters: []string{"west"}},
		},
	})
	if !linksChanged || !exportsChanged {
		t.Fatalf("first snapshot: links changed %v, exports changed %v; want both", linksChanged, exportsChanged)
	}
	select {
	case <-changed:
	default:
		t.Fatal("exports changed without notice")
	}
	if p, ok := c.Peer("west"); !ok || p.Addrs[0] != "127.0.0.1:1" {
		t.Fatalf("west: %v %v", p, ok)
	}
	// south joined without addresses: it is linked, reachable once it
	// announced them.
	if p, ok := c.Peer("south"); !ok || len(p.Addrs) != 0 {
		t.Fatalf("south before its hello: %v %v", p, ok)
	}
	c.learnAddrs("south", []string{"127.0.0.1:2"})
	if p, _ := c.Peer("south"); len(p.Addrs) != 1 {
		t.Fatalf("south after its hello: %v", p)
	}
	if _, ok := c.Peer("north"); ok {
		t.Fatal("unlinked north is a peer")
	}
	if eps, err := c.LocalEndpoints("south", "default", "backend", 443); err != nil || len(eps) != 2 {
		t.Fatalf("backend for south: %v %v", eps, err)
	}
	for _, tc := range []struct {
		peer, name string
		port       uint16
		want       error
	}{
		{"south", "payments", 443, gateway.ErrNotExported}, // exported to west only
		{"west", "payments", 443, gateway.ErrNoEndpoints},
		{"west", "backend", 80, gateway.ErrNotExported},
		{"north", "backend", 443, gateway.ErrNotExported},
		{"west", "missing", 443, gateway.ErrNotExported},
	} {
		if _, err := c.LocalEndpoints(tc.peer, "default", tc.name, tc.port); !errors.Is(err, tc.want) {
			t.Errorf("%s asks %s:%d: %v, want %v", tc.peer, tc.name, tc.port, err, tc.want)
		}
	}
	if got := c.exportsFor("south"); len(got) != 1 {
		t.Fatalf("exports for south: %v", got)
	}
	if got := c.exportsFor("west"); len(got) != 2 {
		t.Fatalf("exports for west: %v", got)
	}
	// The same snapshot again changes nothing.
	if l, e := c.setSnapshot(&controlplanev1.GatewaySnapshot{
		Links: []*controlplanev1.Link{{Peer: "west", PeerGatewayAddresses: []string{"127.0.0.1:1"}}, {Peer: "south"}},
		Exports: []*controlplanev1.GatewayExport{
			{Service: svc("backend", 2), Endpoints: []string{"127.0.0.1:7000", "127.0.0.1:7001"}},
			{Service: svc("payments", 0), ToClusters: []string{"west"}},
		},
	}); l || e {
		t.Fatalf("an identical snapshot reported links changed %v, exports changed %v", l, e)
	}
	// Another endpoint changes the exports only.
	if l, e := c.setSnapshot(&controlplanev1.GatewaySnapshot{
		Links: []*controlplanev1.Link{{Peer: "west", PeerGatewayAddresses: []string{"127.0.0.1:1"}}, {Peer: "south"}},
		Exports: []*controlplanev1.GatewayExport{
			{Service: svc("backend", 2), Endpoints: []string{"127.0.0.1:7000"}},
			{Service: svc("payments", 0), ToClusters: []string{"west"}},
		},
	}); l || !e {
		t.Fatalf("an endpoint fewer: links changed %v, exports changed %v; want exports only", l, e)
	}
}

func TestCatalogDeltas(t *testing.T) {
	c := newCatalog()
	c.setSnapshot(&controlplanev1.GatewaySnapshot{Links: []*controlplanev1.Link{{Peer: "west"}}})
	prev := map[string]*federationv1.ExportedService(nil)
	cur := map[string]*federationv1.ExportedService{"default/a": svc("a", 1), "default/b": svc("b", 1)}
	d1 := catalogDelta(prev, cur, 1)
	if !d1.GetFull() || len(d1.GetUpserts()) != 2 {
		t.Fatalf("first delta: %v", d1)
	}
	if err := c.applyDelta("west", d1); err != nil {
		t.Fatal(err)
	}
	next := map[string]*federationv1.ExportedService{"default/a": svc("a", 3), "default/c": svc("c", 1)}
	d2 := catalogDelta(cur, next, 2)
	if d2.GetFull() || len(d2.GetUpserts()) != 2 || len(d2.GetRemovals()) != 1 || d2.GetBaseVersion() != 1 {
		t.Fatalf("second delta: %v", d2)
	}
	if err := c.applyDelta("west", d2); err != nil {
		t.Fatal(err)
	}
	if err := c.Imported("west", "default", "b"); !errors.Is(err, gateway.ErrNotImported) {
		t.Fatalf("b after removal: %v", err)
	}
	if err := c.Imported("west", "default", "c"); err != nil {
		t.Fatalf("c: %v", err)
	}
	if got := c.importsOf("west"); len(got) != 2 || got[0].GetHealthy() != 3 {
		t.Fatalf("imports: %v", got)
	}
	// A delta on the wrong base is refused and changes nothing.
	if err := c.applyDelta("west", &federationv1.CatalogDelta{Version: 9, BaseVersion: 7, Upserts: []*federationv1.ExportedService{svc("z", 1)}}); err == nil {
		t.Fatal("out-of-order delta applied")
	}
	// A malformed export is refused.
	bad := svc("bad", 1)
	bad.Protocol = "smtp"
	if err := c.applyDelta("west", &federationv1.CatalogDelta{Version: 3, BaseVersion: 2, Upserts: []*federationv1.ExportedService{bad}}); err == nil {
		t.Fatal("malformed export applied")
	}
	if len(c.importsOf("west")) != 2 {
		t.Fatal("refused deltas changed the imports")
	}
	// Unlinking drops the peer's imports.
	c.setSnapshot(&controlplanev1.GatewaySnapshot{})
	if err := c.Imported("west", "default", "a"); !errors.Is(err, gateway.ErrNotImported) {
		t.Fatalf("after unlink: %v", err)
	}
	if err := c.applyDelta("west", d1); err == nil {
		t.Fatal("delta from an unlinked peer applied")
	}
}

// TestCatalogBoundsImports: a peer's catalog may not grow past
// maxImportedServices or maxImportBytes, delta by delta or in full; a
// refused delta leaves the imports as they were, and the report stays
// within the control plane's limit.
func TestCatalogBoundsImports(t *testing.T) {
	c := newCatalog()
	c.setSnapshot(&controlplanev1.GatewaySnapshot{Links: []*controlplanev1.Link{{Peer: "west"}}})
	big := func(round, n, ids int) []*federationv1.ExportedService {
		var out []*federationv1.ExportedService
		for i := range n {
			es := svc(fmt.Sprintf("s%d-%d", round, i), 1)
			for j := range ids {
				es.SpiffeIds = append(es.SpiffeIds, fmt.Sprintf("spiffe://strait.example/ns/default/sa/s%d-%d-%d", round, i, j))
			}
			out = append(out, es)
		}
		return out
	}
	if err := c.applyDelta("west", &federationv1.CatalogDelta{Version: 1, Full: true, Upserts: big(0, 100, 0)}); err != nil {
		t.Fatal(err)
	}
	// Each delta within the per-message bounds, together over the bytes.
	version := uint64(1)
	var refused error
	for round := 1; round < 40 && refused == nil; round++ {
		refused = c.applyDelta("west", &federationv1.CatalogDelta{Version: version + 1, BaseVersion: version, Upserts: big(round, 250, 60)})
		if refused == nil {
			version++
		}
	}
	if refused == nil || !strings.Contains(refused.Error(), "bytes") {
		t.Fatalf("deltas growing west's catalog without end: last refusal %v", refused)
	}
	before := len(c.importsOf("west"))
	size := 0
	for _, es := range c.importsOf("west") {
		size += proto.Size(es)
	}
	if size > maxImportBytes {
		t.Errorf("west's imports take %d bytes, over %d", size, maxImportBytes)
	}
	// Over the count.
	if err := c.applyDelta("west", &federationv1.CatalogDelta{Version: version + 1, Full: true, Upserts: big(100, 4000, 0)}); err != nil {
		t.Fatal(err)
	}
	err := c.applyDelta("west", &federationv1.CatalogDelta{Version: version + 2, BaseVersion: version + 1, Upserts: big(101, 97, 0)})
	if err == nil || !strings.Contains(err.Error(), "4097 services") {
		t.Fatalf("a catalog of 4097 services: %v", err)
	}
	if got := len(c.importsOf("west")); got != 4000 {
		t.Errorf("a refused delta changed the imports: %d services, had 4000 (and %d before)", got, before)
	}
}
