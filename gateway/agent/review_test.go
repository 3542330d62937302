package agent

import (
	"strings"
	"testing"
	"time"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// A linked peer's Hello announces its gateway addresses; they are passed on
// to the control plane in ReportPeers, which refuses the whole report if
// one is not host:port. A peer announcing garbage must not be able to stop
// this gateway from reporting on every other link.
func TestLearnAddrsRefusesMalformed(t *testing.T) {
	c := newCatalog()
	c.setSnapshot(&controlplanev1.GatewaySnapshot{Links: []*controlplanev1.Link{{Peer: "south"}}})
	c.learnAddrs("south", []string{"127.0.0.1:2"})
	for _, bad := range [][]string{
		{"not-an-address"},
		{"127.0.0.1:2", ""},
		{":443"},
		{"host:"},
		{strings.Repeat("a", 300) + ":443"},
	} {
		c.learnAddrs("south", bad)
		if got := c.learned("south"); len(got) != 1 || got[0] != "127.0.0.1:2" {
			t.Fatalf("after announcing %q: learned %q, want the earlier valid addresses", bad, got)
		}
	}
}

// The RTT of a link is measured with this gateway's clock only: an ack
// for a heartbeat never sent, or a second ack of one, measures nothing,
// whatever send time the peer echoes.
func TestPingsOwnClockOnly(t *testing.T) {
	var p pings
	t0 := time.Unix(1000, 0)
	p.sent(1, t0)
	if at, ok := p.acked(1); !ok || !at.Equal(t0) {
		t.Fatalf("ack of 1: %v %v", at, ok)
	}
	if _, ok := p.acked(1); ok {
		t.Fatal("second ack of 1 measured")
	}
	if _, ok := p.acked(7); ok {
		t.Fatal("ack of a heartbeat never sent measured")
	}
	for i := uint64(2); i < 2+10*maxPings; i++ {
		p.sent(i, t0)
	}
	if len(p.at) > maxPings {
		t.Fatalf("%d heartbeats remembered, more than %d", len(p.at), maxPings)
	}
}
