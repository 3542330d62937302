package agent

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/straitmesh/strait/controlplane/client"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// The RTT in a link's report is a current measurement of the data path: a
// link whose control stream went down reports none (federation status
// shows "-"), not the last value measured before it went down, which
// looks like a healthy, live link.
func TestRTTNotReportedForDownLink(t *testing.T) {
	a, _ := testAgent(t)
	a.cfg.Heartbeat = 20 * time.Millisecond
	ours, theirs := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- a.runControl(ctx, "west", ours, client.NewBackoff(time.Second, time.Second)) }()
	// The peer acks heartbeats.
	acked := 0
	for acked < 3 {
		var m federationv1.ControlMessage
		theirs.SetDeadline(time.Now().Add(5 * time.Second))
		if err := readControl(theirs, &m); err != nil {
			t.Fatal(err)
		}
		if hb := m.GetHeartbeat(); hb != nil {
			if err := writeControl(theirs, &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_HeartbeatAck{HeartbeatAck: &federationv1.HeartbeatAck{Seq: hb.GetSeq()}}}); err != nil {
				t.Fatal(err)
			}
			acked++
		}
	}
	for deadline := time.Now().Add(5 * time.Second); peerReport(t, a, "west").GetRtt() == nil; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no RTT measured while the stream was up")
		}
	}
	// The peer goes away: the stream ends, and no heartbeat is acked for
	// more than three periods.
	theirs.Close()
	<-done
	time.Sleep(5 * a.cfg.Heartbeat)
	r := peerReport(t, a, "west")
	if r.GetState() != "down" || r.GetControlStreamUp() {
		t.Fatalf("state %q, control up %v after the stream ended, want down", r.GetState(), r.GetControlStreamUp())
	}
	if r.GetRtt() != nil {
		t.Errorf("a down link reports an RTT of %v, want none", r.GetRtt().AsDuration())
	}
}
