package agent

import (
	"net"
	"testing"
	"time"
)

// A peer's gateway restarted: its new control stream is up before the end
// of its old connection is noticed. That end no longer marks the link's
// incoming control stream down while the new one carries heartbeats (the
// control plane would have taken every endpoint imported from the peer for
// unhealthy, and `federation status` shown the link down, until our own
// stream to it happened to restart).
func TestOldControlStreamEndKeepsLiveOneUp(t *testing.T) {
	a, _ := testAgent(t)
	old := serve(t, a, "west")
	old.sync()
	cur := serve(t, a, "west") // the restarted peer's stream
	cur.sync()
	old.c.Close() // the old connection found dead later
	<-old.done
	for range 3 {
		cur.sync() // heartbeats on the live stream
		time.Sleep(10 * time.Millisecond)
	}
	a.mu.Lock()
	in := a.peers["west"].inUp
	a.mu.Unlock()
	if !in {
		t.Fatalf("the incoming control stream is reported down while a live one carries heartbeats (state %q)", peerReport(t, a, "west").GetState())
	}
}

// A control stream that never says hello ends after helloTimeout: a
// linked peer cannot hold a goroutine per silent stream.
func TestControlStreamWithoutHelloEnds(t *testing.T) {
	defer func(d time.Duration) { helloTimeout = d }(helloTimeout)
	helloTimeout = 100 * time.Millisecond
	a, _ := testAgent(t)
	ours, theirs := net.Pipe()
	defer theirs.Close()
	done := make(chan struct{})
	go func() { a.serveControl(t.Context(), "west", ours); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a control stream with no hello is still served")
	}
}
