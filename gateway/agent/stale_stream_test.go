package agent

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/straitmesh/strait/controlplane/client"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// A peer unlinked and linked again gets a new outgoing control stream. The
// old stream's loop and its last acks must leave the new one's state alone:
// its end used to mark the new stream down (and record its error), and a
// late ack brought an unlinked peer back into the status.
func TestStaleControlStreamLeavesTheNewOneAlone(t *testing.T) {
	a, _ := testAgent(t)
	newCtx, cancelNew := context.WithCancel(context.Background())
	defer cancelNew()
	oldCtx, cancelOld := context.WithCancel(context.Background())
	a.mu.Lock()
	ps := a.peer("west")
	ps.outCtx, ps.outUp, ps.outgoingActive = newCtx, true, true
	a.mu.Unlock()

	// The old loop fails at once (no address known for west) and waits to
	// retry; then it is cancelled, as an unlink does.
	done := make(chan struct{})
	go func() { a.controlLoop(oldCtx, "west"); close(done) }()
	time.Sleep(50 * time.Millisecond)
	cancelOld()
	<-done
	a.mu.Lock()
	up, lastErr := ps.outUp, ps.lastErr
	a.mu.Unlock()
	if !up || lastErr != "" {
		t.Errorf("after the old loop ran: outUp %v, lastErr %q; want the new stream's state untouched", up, lastErr)
	}

	// An ack on a stream of a peer since unlinked does not bring it back.
	ours, theirs := net.Pipe()
	staleCtx, cancelStale := context.WithCancel(context.Background())
	ended := make(chan error, 1)
	go func() { ended <- a.runControl(staleCtx, "west", ours, client.NewBackoff(time.Second, time.Second)) }()
	var hello, delta, hb federationv1.ControlMessage
	for _, m := range []*federationv1.ControlMessage{&hello, &delta, &hb} {
		if err := readControl(theirs, m); err != nil {
			t.Fatal(err)
		}
	}
	if hb.GetHeartbeat() == nil {
		t.Fatalf("third message %v, want a heartbeat", &hb)
	}
	a.mu.Lock() // the unlink, as Recheck does it
	delete(a.peers, "west")
	cancelStale()
	a.mu.Unlock()
	ack := &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_HeartbeatAck{HeartbeatAck: &federationv1.HeartbeatAck{Seq: hb.GetHeartbeat().GetSeq()}}}
	_ = writeControl(theirs, ack) // may fail: the stream is closing
	theirs.Close()
	<-ended
	a.mu.Lock()
	_, back := a.peers["west"]
	a.mu.Unlock()
	if back {
		t.Error("an ack on the stream of an unlinked peer brought the peer back")
	}
}
