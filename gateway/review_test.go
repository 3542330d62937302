package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/gateway/tunnel"
)

// Found by a review of the gateway (2026-11-24), each test failing before
// its fix.

// slotIdle reports whether g has neither a connection to peer nor a dial
// to it under way.
func slotIdle(g *testGateway, peer string) func() error {
	return func() error {
		g.mu.Lock()
		defer g.mu.Unlock()
		if s := g.slots[peer]; s != nil && (s.conn != nil || s.call != nil) {
			return errors.New("still connected or dialing")
		}
		return nil
	}
}

// A peer known to be down is answered within downWait, also after a
// Recheck (every SVID renewal, bundle or link change): Recheck dropped the
// slots of linked peers, and with them what they knew, so the next sidecar
// waited out the whole dial.
func TestRecheckRemembersPeerDown(t *testing.T) {
	p := newPair(t, gwOptions{limits: Limits{DialTimeout: 2 * time.Second, HandshakeTimeout: 4 * time.Second}}, gwOptions{})
	c := mustTunnel(t, p.east, p.sidecar, echoHeader())
	c.Close()
	p.west.stop()
	eventually(t, "east drops its connection to west", slotIdle(p.east, "west"))
	attempt := func() time.Duration {
		start := time.Now()
		if conn, _, err := dialEntry(t, p.east, p.sidecar, echoHeader()); err == nil {
			conn.Close()
		}
		return time.Since(start)
	}
	if d := attempt(); d > time.Second {
		t.Fatalf("precondition: a peer that went away answered after %s", d)
	}
	eventually(t, "the background dial ends", slotIdle(p.east, "west"))
	p.east.Recheck() // as after an SVID renewal
	if d := attempt(); d > time.Second {
		t.Fatalf("after a Recheck, a peer known down was answered after %s (the whole dial), want about %s", d, downWait)
	}
}

// A peer known down, with no dial under way, that connects to us is
// dialed at once: the next caller finds it up instead of being answered
// "down" and starting the dial itself.
func TestPeerBackDialsAPeerKnownDown(t *testing.T) {
	p := newPair(t, gwOptions{limits: Limits{DialTimeout: 500 * time.Millisecond, HandshakeTimeout: time.Second}}, gwOptions{})
	c := mustTunnel(t, p.east, p.sidecar, echoHeader())
	c.Close()
	p.west.stop()
	eventually(t, "east drops its connection to west", slotIdle(p.east, "west"))
	if conn, _, err := dialEntry(t, p.east, p.sidecar, echoHeader()); err == nil {
		conn.Close() // refused in the reply: west is gone
	}
	eventually(t, "the background dial ends", slotIdle(p.east, "west"))
	p.east.mu.Lock()
	down := p.east.slots["west"] != nil && p.east.slots["west"].down
	p.east.mu.Unlock()
	if !down {
		t.Fatal("precondition: east does not know west is down")
	}
	startGateway(t, "west", gwOptions{ca: p.ca, cat: p.west.cat, peerListen: p.west.peerAddr})
	p.east.peerBack("west") // as when west connects to east
	eventually(t, "east connects to west, with no caller", func() error {
		p.east.mu.Lock()
		defer p.east.mu.Unlock()
		if s := p.east.slots["west"]; s == nil || s.conn == nil || s.down {
			return errors.New("not connected")
		}
		return nil
	})
}

// An open join connection (idle, or not even authenticated) does not hold
// up a gateway's shutdown: it was not closed, and Run waited out its whole
// grace for the handler.
func TestShutdownClosesJoinConnections(t *testing.T) {
	ca := catest.New(t, testTD)
	join := func(ctx context.Context, s io.ReadWriteCloser, cs tls.ConnectionState) {}
	gw := startGateway(t, "west", gwOptions{ca: ca, join: join})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := quic.DialAddr(ctx, gw.peerAddr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{tunnel.ALPNJoin}}, &quic.Config{EnableStreamResetPartialDelivery: true})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseWithError(0, "")
	time.Sleep(200 * time.Millisecond) // the gateway accepts it and waits for its stream
	start := time.Now()
	gw.stop()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("the gateway took %s to stop with one join connection open", d)
	}
}

// A peer's control stream reaches the agent as a *stream, whose read
// deadline bounds the wait for its hello: without the method the agent
// found nothing to set, and a silent stream held its goroutine.
func TestControlStreamTakesAReadDeadline(t *testing.T) {
	if _, ok := any(&stream{}).(interface{ SetReadDeadline(time.Time) error }); !ok {
		t.Fatal("a stream handed to the agent has no read deadline to set")
	}
}
