// Package clock holds the time helpers shared by long-running loops that
// take an injected clock (func() time.Time). Standard library only, so the
// lean sidecar may use it.
package clock

import (
	"context"
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
