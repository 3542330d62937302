// Package clock holds the time helpers shared by long-running loops that
// take an injected clock (func() time.Time). Standard library only, so the
// lean sidecar may use it.
package clock

import (
	"context"
	"sync"
	"time"
)

// SleepUntil waits until now() reaches at, or ctx ends (then it returns
// false). It re-reads the clock at least every second, so an injected
// clock that jumps ahead is noticed.
func SleepUntil(ctx context.Context, now func() time.Time, at time.Time) bool {
	return SleepUntilOr(ctx, now, at, nil)
}

// SleepUntilOr is SleepUntil that also returns (true) as soon as wake
// receives.
func SleepUntilOr(ctx context.Context, now func() time.Time, at time.Time, wake <-chan struct{}) bool {
	for {
		d := at.Sub(now())
		if d <= 0 {
			return true
		}
		t := time.NewTimer(min(d, time.Second))
		select {
		case <-ctx.Done():
			t.Stop()
			return false
		case <-wake:
			t.Stop()
			return true
		case <-t.C:
		}
	}
}

// Manual is a clock that moves only when told (tests), safe for
// concurrent use. Its Now is the func() time.Time that loops take.
type Manual struct {
	mu  sync.Mutex
	now time.Time
}

// NewManual returns a Manual clock reading start.
func NewManual(start time.Time) *Manual { return &Manual{now: start} }

// Now returns the clock's time.
func (c *Manual) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Advance moves the clock on by d.
func (c *Manual) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}
