package balance

import (
	"sync"
	"testing"
	"time"
)

// allowed counts how many of n TryRetry calls succeed.
func allowed(r *RetryBudget, n int) int {
	k := 0
	for range n {
		if r.TryRetry() {
			k++
		}
	}
	return k
}

func TestRetryBudget(t *testing.T) {
	for _, tc := range []struct {
		name     string
		cfg      RetryBudgetConfig
		requests int
		want     int
	}{
		{"zero config allows none", RetryBudgetConfig{}, 100, 0},
		{"20% of 100", RetryBudgetConfig{Percent: 20}, 100, 20},
		{"20% of 9 rounds down", RetryBudgetConfig{Percent: 20}, 9, 1},
		{"min per second, no traffic", RetryBudgetConfig{MinPerSecond: 2}, 0, 20},
		{"min per second on a 1s window", RetryBudgetConfig{MinPerSecond: 3, Window: time.Second}, 0, 3},
		{"percent plus floor", RetryBudgetConfig{Percent: 10, MinPerSecond: 1}, 50, 15},
		{"negative values clamp to zero", RetryBudgetConfig{Percent: -5, MinPerSecond: -1}, 100, 0},
		{"over 100%", RetryBudgetConfig{Percent: 200}, 10, 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := newFakeClock()
			tc.cfg.Clock = clk.Now
			r := NewRetryBudget(tc.cfg)
			for range tc.requests {
				r.Request()
			}
			if got := allowed(r, 1000); got != tc.want {
				t.Fatalf("retries allowed: got %d, want %d", got, tc.want)
			}
		})
	}
}

// TestRetryBudgetSlides: requests and retries leave the window bucket by
// bucket as the clock moves.
func TestRetryBudgetSlides(t *testing.T) {
	clk := newFakeClock()
	r := NewRetryBudget(RetryBudgetConfig{Percent: 50, Window: 10 * time.Second, Clock: clk.Now})
	for range 20 {
		r.Request()
	}
	if got, want := allowed(r, 100), 10; got != want {
		t.Fatalf("at t=0: got %d retries, want %d", got, want)
	}
	clk.Advance(5 * time.Second)
	for range 10 {
		r.Request()
	}
	// 30 requests and 10 retries in the window: 5 more.
	if got, want := allowed(r, 100), 5; got != want {
		t.Fatalf("at t=5s: got %d retries, want %d", got, want)
	}
	clk.Advance(5 * time.Second)
	// The t=0 bucket (20 requests, 10 retries) has left: 10 requests, 5
	// retries remain, so none is allowed.
	if got, want := allowed(r, 100), 0; got != want {
		t.Fatalf("at t=10s: got %d retries, want %d", got, want)
	}
	clk.Advance(5 * time.Second)
	// Everything has left; nothing recorded, nothing allowed.
	if got, want := allowed(r, 100), 0; got != want {
		t.Fatalf("at t=15s: got %d retries, want %d", got, want)
	}
	for range 4 {
		r.Request()
	}
	if got, want := allowed(r, 100), 2; got != want {
		t.Fatalf("at t=15s after 4 requests: got %d retries, want %d", got, want)
	}
	clk.Advance(time.Hour)
	for range 2 {
		r.Request()
	}
	if got, want := allowed(r, 100), 1; got != want {
		t.Fatalf("an hour later: got %d retries, want %d", got, want)
	}
}

func TestRetryBudgetDefaults(t *testing.T) {
	for _, tc := range []struct {
		window    time.Duration
		wantWidth time.Duration
	}{
		{0, time.Second},
		{-time.Second, time.Second},
		{time.Nanosecond, time.Millisecond},
		{time.Minute, 6 * time.Second},
	} {
		r := NewRetryBudget(RetryBudgetConfig{Window: tc.window})
		if got := time.Duration(r.width); got != tc.wantWidth {
			t.Errorf("Window %s: got bucket width %s, want %s", tc.window, got, tc.wantWidth)
		}
	}
}

func TestRetryBudgetConcurrent(t *testing.T) {
	clk := newFakeClock()
	r := NewRetryBudget(RetryBudgetConfig{Percent: 25, Clock: clk.Now})
	var wg sync.WaitGroup
	var mu sync.Mutex
	total := 0
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k := 0
			for range 1000 {
				r.Request()
				if r.TryRetry() {
					k++
				}
			}
			mu.Lock()
			total += k
			mu.Unlock()
		}()
	}
	wg.Wait()
	if total > 2000 {
		t.Fatalf("retries allowed: got %d of 8000 requests, want at most 2000", total)
	}
	if total < 1900 {
		t.Fatalf("retries allowed: got %d of 8000 requests, want close to 2000", total)
	}
}
