package balance

import (
	"sync"
	"sync/atomic"
	"testing"
)

func TestLimiter(t *testing.T) {
	for _, tc := range []struct {
		name     string
		limiter  *Limiter
		attempts int
		want     int
	}{
		{"limit 3", NewLimiter(3), 10, 3},
		{"limit 1", NewLimiter(1), 2, 1},
		{"zero is unlimited", NewLimiter(0), 100, 100},
		{"negative is unlimited", NewLimiter(-1), 100, 100},
		{"zero Limiter is unlimited", &Limiter{}, 100, 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := tc.limiter
			got := 0
			for range tc.attempts {
				if l.TryAcquire() {
					got++
				}
			}
			if got != tc.want {
				t.Fatalf("acquired: got %d, want %d", got, tc.want)
			}
			if l.InUse() != tc.want {
				t.Fatalf("InUse: got %d, want %d", l.InUse(), tc.want)
			}
			l.Release()
			if got, want := l.InUse(), tc.want-1; got != want {
				t.Fatalf("InUse after Release: got %d, want %d", got, want)
			}
			if !l.TryAcquire() {
				t.Fatalf("TryAcquire after Release: got false, want true")
			}
		})
	}
}

func TestLimiterSetMax(t *testing.T) {
	l := NewLimiter(4)
	for range 4 {
		l.TryAcquire()
	}
	l.SetMax(2)
	if l.TryAcquire() {
		t.Fatalf("TryAcquire above a lowered limit: got true, want false")
	}
	l.Release()
	l.Release()
	if l.TryAcquire() {
		t.Fatalf("TryAcquire at the lowered limit: got true, want false")
	}
	l.Release()
	if !l.TryAcquire() {
		t.Fatalf("TryAcquire below the lowered limit: got false, want true")
	}
	if got, want := l.Max(), 2; got != want {
		t.Fatalf("Max: got %d, want %d", got, want)
	}
}

func TestLimiterReleaseWithoutAcquirePanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatalf("Release without TryAcquire: got no panic, want one")
		}
	}()
	NewLimiter(1).Release()
}

func TestLimiterConcurrent(t *testing.T) {
	const limit = 5
	l := NewLimiter(limit)
	var holders, peak atomic.Int64
	var wg sync.WaitGroup
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 1000 {
				if !l.TryAcquire() {
					continue
				}
				n := holders.Add(1)
				for {
					p := peak.Load()
					if n <= p || peak.CompareAndSwap(p, n) {
						break
					}
				}
				holders.Add(-1)
				l.Release()
			}
		}()
	}
	wg.Wait()
	if got := peak.Load(); got > limit {
		t.Fatalf("peak holders: got %d, want at most %d", got, limit)
	}
	if got := l.InUse(); got != 0 {
		t.Fatalf("InUse at the end: got %d, want 0", got)
	}
}
