package proxy

import "testing"

// TestIdleReleases: the free heap goes back after three quiet seconds
// following start-up or any burst; the binary's pages the first time, and
// then once in each quiet spell longer than longQuiet.
func TestIdleReleases(t *testing.T) {
	r := idleReleases{pages: true, longQuiet: 6}
	type want struct{ heap, pages bool }
	steps := []struct {
		activity uint64
		want     want
	}{
		{0, want{}}, {0, want{}}, {0, want{true, true}}, // start-up over
		{0, want{}}, {0, want{}}, // still quiet: nothing more
		{0, want{false, true}},                // a long quiet spell
		{0, want{}}, {0, want{}}, {0, want{}}, // and no more in it
		{5, want{}}, {9, want{}}, // a burst
		{9, want{}}, {9, want{}}, {9, want{true, false}}, // quiet again: heap only
		{9, want{}}, {9, want{}},
		{12, want{}}, // a short burst before the long release
		{12, want{}}, {12, want{}}, {12, want{true, false}},
		{12, want{}}, {12, want{}}, {12, want{false, true}}, // long quiet again
		{12, want{}},
	}
	for i, st := range steps {
		heap, pages := r.tick(st.activity)
		if (want{heap, pages}) != st.want {
			t.Fatalf("tick %d (activity %d) = heap %v, pages %v; want %+v", i, st.activity, heap, pages, st.want)
		}
	}
	off := idleReleases{longQuiet: 6}
	for i := range 8 {
		if heap, pages := off.tick(0); pages || heap != (i == 2) {
			t.Fatalf("without ReleaseBinaryPages, tick %d = heap %v, pages %v", i, heap, pages)
		}
	}
}
