package gateway

import (
	"bytes"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestRelayBufferSteps: a direction steps up while reads fill its buffer,
// lends at most maxBulkBuffers bulk buffers at once, and steps back to
// the small buffer after a short read.
func TestRelayBufferSteps(t *testing.T) {
	if got := bulkLent.Load(); got != 0 {
		t.Fatalf("bulk buffers lent before the test: %d", got)
	}
	b := newRelayBuffer()
	for _, want := range []int{smallBuffer, largeBuffer, bulkBuffer, bulkBuffer} {
		if len(b.get()) != want {
			t.Fatalf("buffer of %d bytes, want %d", len(b.buf), want)
		}
		b.adapt(len(b.buf))
	}
	if got := bulkLent.Load(); got != 1 {
		t.Fatalf("bulk buffers lent: %d, want 1", got)
	}
	b.adapt(smallBuffer - 1)
	if len(b.get()) != smallBuffer || b.lent != nil || bulkLent.Load() != 0 {
		t.Fatalf("after a short read: buffer of %d bytes, lent %v, bulk lent %d; want the small buffer and nothing lent", len(b.buf), b.lent != nil, bulkLent.Load())
	}

	// Past the limit a direction keeps its large buffer.
	var all []*relayBuffer
	defer func() {
		for _, b := range all {
			b.release()
		}
		if got := bulkLent.Load(); got != 0 {
			t.Errorf("bulk buffers lent after release: %d", got)
		}
	}()
	for i := 0; i <= maxBulkBuffers; i++ {
		b := newRelayBuffer()
		all = append(all, b)
		b.adapt(len(b.get()))
		b.adapt(len(b.get()))
		want := bulkBuffer
		if i == maxBulkBuffers {
			want = largeBuffer
		}
		if len(b.buf) != want {
			t.Fatalf("direction %d: buffer of %d bytes, want %d", i, len(b.buf), want)
		}
	}
	if got := bulkLent.Load(); got != maxBulkBuffers {
		t.Fatalf("bulk buffers lent: %d, want the limit %d", got, maxBulkBuffers)
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
	base := bulkLent.Load()
	var dst lockedBuffer
	go pump(&dst, server, prometheus.NewCounter(prometheus.CounterOpts{Name: "t"}))
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
		if got := bulkLent.Load() - base; got != 0 {
			return fmt.Errorf("%d bulk buffer(s) held", got)
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
