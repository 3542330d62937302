package gateway

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/catest"
)

// hookCatalog is a fakeCatalog whose Peer calls hook first, if set.
type hookCatalog struct {
	*fakeCatalog
	hook atomic.Pointer[func()]
}

func (c *hookCatalog) Peer(cluster string) (Peer, bool) {
	if h := c.hook.Load(); h != nil {
		(*h)()
	}
	return c.fakeCatalog.Peer(cluster)
}

// startHookedGateway is startGateway with cat as the catalog.
func startHookedGateway(t *testing.T, cluster string, ca *catest.CA, cat *hookCatalog) *testGateway {
	t.Helper()
	return startGateway(t, cluster, gwOptions{ca: ca, cat: cat.fakeCatalog, catalog: cat})
}

type connResult struct {
	pc    *peerConn
	fresh bool
	err   error
}

// A caller waiting on a shared dial holds a stream on the connection it
// gets: a caller that comes in between the dial's end and the waiter's
// wake-up and finds the connection superseded must not close it as idle.
//
// The interleaving is forced through g.mu: the dial is held (in judgePeer)
// until the test holds g.mu, then queued on g.mu ahead of a second caller,
// with the mutex in starvation mode, so that the lock goes straight from
// the dial's publication to the second caller, ahead of the waiter that
// the dial's end wakes.
func TestWaiterStreamCountedBeforeSupersededConnJudgedIdle(t *testing.T) {
	ca := catest.New(t, testTD)
	west := startGateway(t, "west", gwOptions{ca: ca})
	cat := &hookCatalog{fakeCatalog: newCatalog()}
	east := startHookedGateway(t, "east", ca, cat)
	cat.link("west", west.peerAddr)
	west.cat.link("east", east.peerAddr)

	// The dial's second Peer call is judgePeer's, after track: hold it there.
	paused, resume := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	hook := func() {
		if calls.Add(1) == 2 {
			close(paused)
			<-resume
		}
	}
	cat.hook.Store(&hook)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	waiter := make(chan connResult, 1)
	go func() {
		pc, fresh, err := east.peerConnFor(ctx, "west", nil)
		waiter <- connResult{pc, fresh, err}
	}()
	select {
	case <-paused:
	case <-time.After(30 * time.Second):
		t.Fatal("the dial did not reach judgePeer within 30s")
	}

	// The gateway moves to an SVID of a new intermediate: the connection
	// being dialed presented the old one, so it is superseded once it is
	// the slot's connection.
	if _, err := ca.Authority.CreateIntermediate(context.Background(), "east", 0, true); err != nil {
		t.Fatal(err)
	}
	iss, err := ca.Authority.Issuer("east")
	if err != nil {
		t.Fatal(err)
	}
	sv, err := iss.MintSVID(spiffeid.RequireFromString(gatewayID("east")), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := east.creds.SetSVID(sv); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // Recheck ran, off g.mu

	east.mu.Lock()
	close(resume)
	time.Sleep(50 * time.Millisecond) // the dial queued on g.mu to publish its connection
	other := make(chan connResult, 1)
	go func() {
		pc, fresh, err := east.peerConnFor(ctx, "west", nil)
		other <- connResult{pc, fresh, err}
	}()
	time.Sleep(50 * time.Millisecond) // the second caller queued behind it
	// Let the dial, woken, find g.mu taken again after waiting over 1ms:
	// the mutex enters starvation mode and is handed over in queue order.
	east.mu.Unlock()
	east.mu.Lock()
	time.Sleep(50 * time.Millisecond)
	east.mu.Unlock()

	w := <-waiter
	if w.err != nil {
		t.Fatalf("waiter: %v", w.err)
	}
	o := <-other
	if o.err == nil {
		defer east.releaseStream(o.pc)
	}
	east.mu.Lock()
	streams, draining := w.pc.streams, w.pc.draining
	east.mu.Unlock()
	if !draining {
		t.Fatalf("the waiter's connection was not superseded (dialed with the old SVID)")
	}
	// The second caller's closeSuperseded ran before it returned.
	if w.pc.dead() {
		t.Fatalf("the connection a waiter on the dial holds a stream on (streams=%d) was closed as idle when superseded: %v", streams, context.Cause(w.pc.conn.Context()))
	}
	if streams != 1 {
		t.Errorf("superseded connection carries %d streams, want 1 (the waiter's)", streams)
	}
	// Once the waiter's stream ends, the superseded connection closes.
	east.releaseStream(w.pc)
	select {
	case <-w.pc.conn.Context().Done():
	case <-time.After(10 * time.Second):
		t.Error("superseded connection still open 10s after its last stream ended")
	}
}

// A caller that stops waiting on a dial before it ends leaves no stream
// counted on the connection the dial makes: a superseded connection is
// then closed as soon as it is idle.
func TestWaiterGivingUpLeavesNoStreamCounted(t *testing.T) {
	ca := catest.New(t, testTD)
	west := startGateway(t, "west", gwOptions{ca: ca})
	cat := &hookCatalog{fakeCatalog: newCatalog()}
	east := startHookedGateway(t, "east", ca, cat)
	cat.link("west", west.peerAddr)
	west.cat.link("east", east.peerAddr)

	paused, resume := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	hook := func() {
		if calls.Add(1) == 2 {
			close(paused)
			<-resume
		}
	}
	cat.hook.Store(&hook)

	ctx, cancel := context.WithCancel(context.Background())
	waiter := make(chan connResult, 1)
	go func() {
		pc, fresh, err := east.peerConnFor(ctx, "west", nil)
		waiter <- connResult{pc, fresh, err}
	}()
	select {
	case <-paused:
	case <-time.After(30 * time.Second):
		t.Fatal("the dial did not reach judgePeer within 30s")
	}
	cancel()
	if w := <-waiter; w.err == nil {
		t.Fatalf("waiter: got a connection, want its context's error")
	}
	close(resume)
	var pc *peerConn
	eventually(t, "the dial's connection in its slot", func() error {
		east.mu.Lock()
		defer east.mu.Unlock()
		if s := east.slots["west"]; s != nil && s.conn != nil {
			pc = s.conn
			return nil
		}
		return context.DeadlineExceeded
	})
	east.mu.Lock()
	streams := pc.streams
	east.mu.Unlock()
	if streams != 0 {
		t.Errorf("connection carries %d streams, want 0: the waiter gave up before the dial ended", streams)
	}
}
