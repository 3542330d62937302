package balance

import "sync/atomic"

// Limiter caps concurrent use of a resource (connections or requests to
// one upstream service): circuit breaking in Envoy's sense. It is a pair of
// atomics, safe for concurrent use. The zero Limiter is unlimited.
type Limiter struct {
	max   atomic.Int64 // <= 0: unlimited
	inUse atomic.Int64
}

// NewLimiter returns a Limiter allowing limit concurrent holders; limit <= 0
// means unlimited (holders are still counted).
func NewLimiter(limit int) *Limiter {
	l := &Limiter{}
	l.max.Store(int64(limit))
	return l
}

// SetMax changes the limit; limit <= 0 means unlimited. Current holders keep
// their slot: lowering the limit below InUse only refuses new acquisitions
// until enough are released.
func (l *Limiter) SetMax(limit int) { l.max.Store(int64(limit)) }

// Max returns the limit; 0 or less means unlimited.
func (l *Limiter) Max() int { return int(l.max.Load()) }

// TryAcquire takes a slot if one is free and reports whether it did. Each
// successful TryAcquire must be paired with one Release.
func (l *Limiter) TryAcquire() bool {
	for {
		n, limit := l.inUse.Load(), l.max.Load()
		if limit > 0 && n >= limit {
			return false
		}
		if l.inUse.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// Release gives back a slot taken by TryAcquire. Releasing more than was
// acquired is a bug in the caller, and panics (as sync.WaitGroup does).
func (l *Limiter) Release() {
	if l.inUse.Add(-1) < 0 {
		panic("balance: Limiter.Release without TryAcquire")
	}
}

// InUse returns the number of slots held.
func (l *Limiter) InUse() int { return int(l.inUse.Load()) }
