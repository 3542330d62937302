package gateway

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
)

// lent is how many buffers of each lent step are out.
func lent() [3]int64 {
	return [3]int64{lendSteps[0].lent.Load(), lendSteps[1].lent.Load(), lendSteps[2].lent.Load()}
}

// TestRelayBufferSteps: a direction steps up while reads fill its buffer,
// lends at most maxBulkBuffers bulk and maxJumboBuffers jumbo buffers at
// once, and steps back to the small buffer after a short read.
func TestRelayBufferSteps(t *testing.T) {
	if got := lent(); got != [3]int64{} {
		t.Fatalf("buffers lent before the test: %v", got)
	}
	b := newRelayBuffer()
	for _, want := range []int{smallBuffer, largeBuffer, bulkBuffer, jumboBuffer, jumboBuffer} {
		if len(b.get()) != want {
			t.Fatalf("buffer of %d bytes, want %d", len(b.buf), want)
		}
		b.adapt(len(b.buf))
	}
	if got := lent(); got != [3]int64{0, 0, 1} {
		t.Fatalf("buffers lent (large, bulk, jumbo): %v, want one jumbo", got)
	}
	b.adapt(smallBuffer - 1)
	if len(b.get()) != smallBuffer || b.lent != nil || lent() != [3]int64{} {
		t.Fatalf("after a short read: buffer of %d bytes, lent %v (%v); want the small buffer and nothing lent", len(b.buf), b.lent != nil, lent())
	}

	// Past a step's limit a direction keeps the step below.
	var all []*relayBuffer
	defer func() {
		for _, b := range all {
			b.release()
		}
		if got := lent(); got != [3]int64{} {
			t.Errorf("buffers lent after release: %v", got)
		}
	}()
	stepUp := func(times int) *relayBuffer {
		b := newRelayBuffer()
		all = append(all, b)
		for range times {
			b.adapt(len(b.get()))
		}
		return b
	}
	for i := 0; i <= maxJumboBuffers; i++ {
		want := jumboBuffer
		if i == maxJumboBuffers {
			want = bulkBuffer
		}
		if b := stepUp(3); len(b.buf) != want {
			t.Fatalf("direction %d: buffer of %d bytes, want %d", i, len(b.buf), want)
		}
	}
	for i := 1; i <= maxBulkBuffers; i++ { // one bulk buffer is out already
		want := bulkBuffer
		if i == maxBulkBuffers {
			want = largeBuffer
		}
		if b := stepUp(2); len(b.buf) != want {
			t.Fatalf("direction %d: buffer of %d bytes, want %d", i, len(b.buf), want)
		}
	}
	if got := lent(); got[1] != maxBulkBuffers || got[2] != maxJumboBuffers {
		t.Fatalf("buffers lent (large, bulk, jumbo): %v, want the limits %d and %d", got, maxBulkBuffers, maxJumboBuffers)
	}

	// A parked jumbo buffer is taken again when data comes; with the
	// jumbo step at its limit, the bulk one; with that at its limit too,
	// the large one.
	p := all[0]
	p.park()
	if got := lent(); got[2] != maxJumboBuffers-1 {
		t.Fatalf("jumbo buffers lent after a park: %d, want %d", got[2], maxJumboBuffers-1)
	}
	if len(p.get()) != jumboBuffer {
		t.Fatalf("after a park with a jumbo buffer free: buffer of %d bytes, want %d", len(p.buf), jumboBuffer)
	}
	p.park()
	other := lendSteps[2].take() // another direction takes the free jumbo
	defer lendSteps[2].give(other)
	bulk := all[len(all)-2] // a direction holding a bulk buffer
	bulk.release()
	if len(p.get()) != bulkBuffer {
		t.Fatalf("after a park with the jumbo step at its limit: buffer of %d bytes, want %d", len(p.buf), bulkBuffer)
	}
	p.park()
	bulkOther := lendSteps[1].take() // and another the free bulk one
	defer lendSteps[1].give(bulkOther)
	if len(p.get()) != largeBuffer {
		t.Fatalf("after a park with the jumbo and bulk steps at their limits: buffer of %d bytes, want %d", len(p.buf), largeBuffer)
	}
}

// lockedBuffer is a bytes.Buffer safe for a pump and the test.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *lockedBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *lockedBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// TestQuietTCPDirectionHoldsNoBuffer: a direction reading a TCP
// connection hands its buffer back while it waits for data, relays what
// comes, and ends at the connection's end.
func TestQuietTCPDirectionHoldsNoBuffer(t *testing.T) {
	client, server := tcpPair(t)

	base := smallHeld.Load()
	var dst lockedBuffer
	done := make(chan [2]error, 1)
	go func() {
		rerr, werr := pump(&dst, server, prometheus.NewCounter(prometheus.CounterOpts{Name: "t"}))
		done <- [2]error{rerr, werr}
	}()
	for i, msg := range []string{"hello", " quiet", " world"} {
		if _, err := client.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		want := []string{"hello", "hello quiet", "hello quiet world"}[i]
		eventually(t, "relay "+want, func() error {
			if got := dst.String(); got != want {
				return fmt.Errorf("relayed %q", got)
			}
			return nil
		})
		eventually(t, "hand the small buffer back while waiting", func() error {
			if got := smallHeld.Load(); got != base {
				return fmt.Errorf("%d small buffers held, want %d", got, base)
			}
			return nil
		})
	}
	client.Close()
	select {
	case errs := <-done:
		if errs[0] != nil || errs[1] != nil {
			t.Fatalf("pump ended with %v, %v; want an orderly end", errs[0], errs[1])
		}
	case <-time.After(5 * time.Second):
		t.Fatal("pump did not end at the connection's end")
	}
	if got := smallHeld.Load(); got != base {
		t.Fatalf("small buffers held after the end: %d, want %d", got, base)
	}
}

// A TCP direction that stepped up to the bulk buffer and then went quiet
// after a medium read hands it back while it waits: it kept it (and one of
// the maxBulkBuffers slots) for as long as the connection idled, so idle
// keep-alive streams could use up the bulk path for every other.
func TestQuietTCPDirectionParksItsBulkBuffer(t *testing.T) {
	client, server := tcpPair(t)
	base := lent()
	var dst lockedBuffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		pump(&dst, server, prometheus.NewCounter(prometheus.CounterOpts{Name: "t"}))
	}()
	defer func() { // the pump ends, handing back what it holds, before the next test counts
		client.Close()
		<-done
	}()
	total := 0
	send := func(n int) {
		client.Write(make([]byte, n))
		total += n
		eventually(t, "relay", func() error {
			if got := len(dst.String()); got != total {
				return fmt.Errorf("relayed %d of %d", got, total)
			}
			return nil
		})
	}
	for _, n := range []int{smallBuffer, largeBuffer, 4096} { // up to bulk, then a medium read
		send(n)
	}
	eventually(t, "the quiet direction hands back its bulk buffer", func() error {
		if got := lent(); got != base {
			return fmt.Errorf("buffers lent (large, bulk, jumbo): %v, want %v", got, base)
		}
		return nil
	})
	send(bulkBuffer) // and relays again when data comes
}

// tcpPair returns the two ends of a loopback TCP connection, closed when
// the test ends.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	return client, server
}

// A direction reading a tunnel stream that goes quiet holding a lent
// buffer hands it back after quietAfter and waits in a small one (a
// stream cannot wait without a buffer); the next data is read as before.
func TestQuietStreamDirectionHandsBackItsBuffer(t *testing.T) {
	dialed, accepted := quicPair(t, &quic.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := dialed.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := out.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	in, err := accepted.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(in, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}

	base := lent()
	b := newRelayBuffer()
	defer b.release()
	for range 3 {
		b.adapt(len(b.get()))
	}
	if len(b.buf) != jumboBuffer {
		t.Skipf("could not take a jumbo buffer (lent: %v)", lent())
	}
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	start := time.Now()
	go func() {
		n, err := readStream(in, b)
		done <- result{n, err}
	}()
	eventually(t, "the quiet direction hands back its jumbo buffer", func() error {
		if got := lent(); got != base {
			return fmt.Errorf("buffers lent (large, bulk, jumbo): %v, want %v", got, base)
		}
		return nil
	})
	if took := time.Since(start); took < quietAfter*9/10 {
		t.Fatalf("handed back after %s, before quietAfter (%s)", took, quietAfter)
	}
	if _, err := out.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if r.err != nil || string(b.buf[:r.n]) != "hello" {
			t.Fatalf("read %q, %v after the quiet spell; want hello", b.buf[:r.n], r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the quiet direction did not read the next data")
	}
}

// After a quiet spell, data that fills the small buffer takes the
// remembered step back at once; a shorter read forgets it.
func TestQuietDirectionResumesItsStep(t *testing.T) {
	for _, c := range []struct {
		n    int
		want int
	}{{smallBuffer, jumboBuffer}, {smallBuffer - 1, smallBuffer}} {
		base := lent()
		b := newRelayBuffer()
		for range 3 {
			b.adapt(len(b.get()))
		}
		if len(b.buf) != jumboBuffer {
			b.release()
			t.Skipf("could not take a jumbo buffer (lent: %v)", lent())
		}
		b.quiet()
		if len(b.get()) != smallBuffer || b.lent != nil {
			t.Fatalf("quiet: buffer of %d bytes, lent %v; want the small one", len(b.buf), b.lent != nil)
		}
		b.adapt(c.n)
		if got := len(b.get()); got != c.want {
			t.Errorf("after a read of %d bytes: buffer of %d, want %d", c.n, got, c.want)
		}
		b.release()
		if got := lent(); got != base {
			t.Errorf("buffers lent after release: %v, want %v", got, base)
		}
	}
}
