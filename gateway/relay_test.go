package gateway

import "testing"

// TestRelayBufferSteps: a direction steps up while reads fill its buffer,
// lends at most maxBulkBuffers bulk buffers at once, and steps back to
// the small buffer after a short read.
func TestRelayBufferSteps(t *testing.T) {
	if got := bulkLent.Load(); got != 0 {
		t.Fatalf("bulk buffers lent before the test: %d", got)
	}
	b := newRelayBuffer()
	for _, want := range []int{smallBuffer, largeBuffer, bulkBuffer, bulkBuffer} {
		if len(b.buf) != want {
			t.Fatalf("buffer of %d bytes, want %d", len(b.buf), want)
		}
		b.adapt(len(b.buf))
	}
	if got := bulkLent.Load(); got != 1 {
		t.Fatalf("bulk buffers lent: %d, want 1", got)
	}
	b.adapt(smallBuffer - 1)
	if len(b.buf) != smallBuffer || b.lent != nil || bulkLent.Load() != 0 {
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
		b.adapt(len(b.buf))
		b.adapt(len(b.buf))
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
