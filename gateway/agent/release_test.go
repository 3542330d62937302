package agent

import "testing"

func TestReleaser(t *testing.T) {
	const mb = 1 << 20
	r := releaser{limit: 32 * mb}
	tick := func(h heapState) bool { return r.due(h) }

	// Small heap: never.
	if tick(heapState{objects: 10 * mb, cycles: 1}) {
		t.Fatal("forced with a small heap")
	}
	// Free heap over the limit: at once, collections or not.
	if !tick(heapState{free: 40 * mb, objects: 10 * mb, cycles: 2}) {
		t.Fatal("free heap over the limit not released")
	}
	r.freed(heapState{free: 40 * mb, objects: 10 * mb, cycles: 2}, heapState{objects: 10 * mb, cycles: 3})

	// A burst: objects grow while collections run; not forced while they do.
	if tick(heapState{objects: 400 * mb, cycles: 7}) {
		t.Fatal("forced while the runtime collects by itself")
	}
	// The burst closed: a whole tick without a collection, objects still
	// counted: forced; it finds them dead.
	if !tick(heapState{objects: 400 * mb, cycles: 7}) {
		t.Fatal("a stale heap was not collected")
	}
	r.freed(heapState{objects: 400 * mb, cycles: 7}, heapState{objects: 20 * mb, cycles: 8})
	if tick(heapState{objects: 20 * mb, cycles: 8}) {
		t.Fatal("forced again after the heap shrank under the limit")
	}

	// Held streams: a large heap that stays live. Forced collections back
	// off: 1, 2, 4 ... ticks between them, at most 32.
	live := heapState{objects: 300 * mb, cycles: 8, goroutines: 20_000}
	var forcedAt []int
	for i := range 200 {
		if tick(live) {
			forcedAt = append(forcedAt, i)
			live.cycles++
			r.freed(heapState{objects: 300 * mb, goroutines: 20_000}, live)
		}
	}
	want := []int{0, 2, 5, 10, 19, 36, 69, 102, 135, 168}
	if len(forcedAt) != len(want) {
		t.Fatalf("forced at ticks %v, want %v", forcedAt, want)
	}
	for i := range want {
		if forcedAt[i] != want[i] {
			t.Fatalf("forced at ticks %v, want %v", forcedAt, want)
		}
	}

	// The streams close: the goroutines fall, and the next tick forces a
	// collection despite the backoff; it frees, and the backoff resets.
	if r.skip == 0 {
		t.Fatal("no backoff under way to test against")
	}
	closed := heapState{objects: 300 * mb, cycles: live.cycles, goroutines: 40}
	if !tick(closed) {
		t.Fatal("streams closed, but no collection forced")
	}
	r.freed(closed, heapState{objects: 20 * mb, cycles: live.cycles + 1, goroutines: 40})
	if r.backoff != 0 || r.skip != 0 {
		t.Fatalf("backoff %d skip %d after a fruitful collection, want 0 0", r.backoff, r.skip)
	}
}
