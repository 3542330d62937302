package gateway

import (
	"testing"
)

// TestRecheckKeepsSlotWithDrainingConns: a peer's slot with no current
// connection and no dial, but superseded connections still carrying
// streams (a replacement dial failed), outlives Recheck: dropping it would
// lift the bound on superseded connections and the pace of replacements.
func TestRecheckKeepsSlotWithDrainingConns(t *testing.T) {
	p := newPair(t, gwOptions{}, gwOptions{})
	c := mustTunnel(t, p.east, p.sidecar, echoHeader())
	defer c.Close()
	p.east.mu.Lock()
	s := p.east.slots["west"]
	if s == nil || s.conn == nil {
		p.east.mu.Unlock()
		t.Fatal("no connection to west after a tunnel")
	}
	pc := s.conn // as retireLocked leaves a superseded connection with a stream
	s.conn, pc.draining, s.draining = nil, true, append(s.draining, pc)
	p.east.mu.Unlock()

	p.east.Recheck()
	p.east.mu.Lock()
	kept := p.east.slots["west"] == s
	p.east.mu.Unlock()
	if !kept {
		t.Error("Recheck dropped the slot of west while a superseded connection still carried a stream")
	}
}

// TestStreamJudgedAgainstCurrentBundle: the verdict a stream is judged by
// follows the bundle at once, before Recheck has closed the connection: a
// peer whose root was removed cannot open a stream in between.
func TestStreamJudgedAgainstCurrentBundle(t *testing.T) {
	r := newTwoRootPair(t)
	p := r.pair
	c := mustTunnel(t, p.east, newCreds(t, r.caA, workloadID("default", "a"), r.both), echoHeader())
	defer c.Close()
	p.east.mu.Lock()
	pc := p.east.slots["west"].conn
	p.east.mu.Unlock()
	if _, _, err := p.east.judgePeer(pc); err != nil {
		t.Fatalf("west's connection judged untrusted under both roots: %v", err)
	}
	if _, err := p.east.creds.SetBundle(r.onlyA); err != nil {
		t.Fatal(err)
	}
	if _, reason, err := p.east.judgePeer(pc); err == nil || reason != "untrusted" {
		t.Errorf("after west's root was removed: judgePeer = %q, %v; want it untrusted", reason, err)
	}
}
