package clock

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

func TestSleepUntil(t *testing.T) {
	var fake atomic.Int64
	fake.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	now := func() time.Time { return time.Unix(0, fake.Load()) }
	at := now().Add(time.Hour)
	go func() { time.Sleep(50 * time.Millisecond); fake.Add(int64(time.Hour)) }()
	start := time.Now()
	if !SleepUntil(context.Background(), now, at) {
		t.Fatal("SleepUntil returned false without a cancelled context")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("noticed the clock jump after %s, want within about a second", d)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if SleepUntil(ctx, now, now().Add(time.Hour)) {
		t.Error("SleepUntil returned true with a cancelled context")
	}
}
