package store

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// A peer's announced gateway addresses: the same ones (in any order) are
// not audited; changes within linkAddrsWindow of the peer's last audited
// one update that entry; after the window, or once other entries came
// between, a change is a new entry. An unknown peer stores nothing.
func TestUpdateLinkGatewaysAudit(t *testing.T) {
	s, clk := openTest(t)
	if err := s.PutLink(Link{ID: "l1", Peer: "west", PeerGateways: []string{"a:1", "b:1"}, Role: "issuer", Created: clk.Now()}); err != nil {
		t.Fatal(err)
	}
	count := func() int {
		t.Helper()
		events, err := s.AuditLog(maxAudit)
		if err != nil {
			t.Fatal(err)
		}
		return len(events)
	}
	n0 := count()
	update := func(addrs ...string) bool {
		t.Helper()
		changed, err := s.UpdateLinkGateways("west", addrs)
		if err != nil {
			t.Fatal(err)
		}
		return changed
	}
	if update("a:1", "b:1") {
		t.Error("the stored addresses reported as a change")
	}
	if !update("b:1", "a:1") || count() != n0 {
		t.Errorf("reordered addresses: %d entries added, want the order stored and no entry", count()-n0)
	}
	for i := range 50 {
		clk.Advance(time.Second)
		update(fmt.Sprintf("c:%d", i))
	}
	if count() != n0+1 {
		t.Fatalf("50 changes within the window: %d entries, want 1", count()-n0)
	}
	events, _ := s.AuditLog(1)
	if e := events[0]; e.Event != linkAddrsEvent || e.Peer != "west" || !strings.HasPrefix(e.Detail, "50 changes since ") || !strings.HasSuffix(e.Detail, ": c:49") {
		t.Errorf("coalesced entry %+v, want the count and the latest addresses", e)
	}
	clk.Advance(linkAddrsWindow)
	update("d:1")
	if count() != n0+2 {
		t.Errorf("a change after the window: %d entries, want 2", count()-n0)
	}
	if err := s.DeleteLink("west"); err != nil {
		t.Fatal(err)
	}
	if changed, err := s.UpdateLinkGateways("west", []string{"e:1"}); changed || err != nil {
		t.Errorf("update of a removed link: %v, %v", changed, err)
	}
	if links, _ := s.Links(); len(links) != 0 {
		t.Errorf("links: %v", links)
	}
}
