package gateway

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestUnlinkedByPeerSaysWhatToDo: a peer that removed its link refuses this
// gateway's handshake; as docs/federation.md says, the error this side
// reports (the link's last error in `strait federation status`) tells to
// run `strait federation unlink` here too, whether the refusal arrives as a
// handshake failure or as the connection closing under the first stream
// (TLS 1.3: the dialer's handshake completes before the peer judges it).
func TestUnlinkedByPeerSaysWhatToDo(t *testing.T) {
	p := newPair(t, gwOptions{}, gwOptions{})
	p.west.cat.unlink("east")
	for i := range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		s, err := p.east.OpenControl(ctx, "west")
		cancel()
		if err == nil {
			s.Close()
			t.Fatalf("attempt %d: control stream to a peer that unlinked this cluster opened", i)
		}
		if !strings.Contains(err.Error(), "run `strait federation unlink west` here too") {
			t.Errorf("attempt %d: got %q, want the advice to run `strait federation unlink west` here too", i, err)
		}
	}
}
