package proxy

import "testing"

// TestIdleReleasesOnceAfterStartupAndEachBurst: the free heap goes back
// after three quiet seconds following start-up or any burst; the binary's
// pages only the first time.
func TestIdleReleasesOnceAfterStartupAndEachBurst(t *testing.T) {
	r := idleReleases{pagesLeft: true}
	type want struct{ heap, pages bool }
	steps := []struct {
		activity uint64
		want     want
	}{
		{0, want{}}, {0, want{}}, {0, want{true, true}}, // start-up over
		{0, want{}}, {0, want{}}, // still quiet: nothing more
		{5, want{}}, {9, want{}}, // a burst
		{9, want{}}, {9, want{}}, {9, want{true, false}}, // quiet again: heap only
		{9, want{}},
	}
	for i, st := range steps {
		heap, pages := r.tick(st.activity)
		if (want{heap, pages}) != st.want {
			t.Fatalf("tick %d (activity %d) = heap %v, pages %v; want %+v", i, st.activity, heap, pages, st.want)
		}
	}
	off := idleReleases{}
	for i := range 3 {
		if heap, pages := off.tick(0); pages || heap != (i == 2) {
			t.Fatalf("without ReleaseBinaryPages, tick %d = heap %v, pages %v", i, heap, pages)
		}
	}
}
