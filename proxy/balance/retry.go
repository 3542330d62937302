package balance

import (
	"sync"
	"time"
)

// DefaultRetryWindow is the retry budget window used when
// RetryBudgetConfig.Window is zero.
const DefaultRetryWindow = 10 * time.Second

// minRetryWindow is the shortest window a budget accepts; shorter ones are
// raised to it.
const minRetryWindow = 10 * time.Millisecond

// retryBuckets is the number of buckets the window is divided into.
const retryBuckets = 10

// RetryBudgetConfig configures a [RetryBudget]. The zero value allows no
// retries at all.
type RetryBudgetConfig struct {
	// Percent is the share of original requests in the window that may be
	// retried, in percent (20 allows one retry per five requests). Zero
	// (or negative) allows none beyond MinPerSecond.
	Percent int
	// MinPerSecond is a floor that allows retries even with little
	// traffic: MinPerSecond × Window (in seconds) retries per window on
	// top of Percent. Zero (or negative) means no floor.
	MinPerSecond int
	// Window is how far back requests and retries are counted. Zero (or
	// negative) means DefaultRetryWindow; it is raised to 10ms if shorter.
	Window time.Duration
	// Clock returns the current time. Nil means time.Now.
	Clock func() time.Time
}

// RetryBudget bounds retries to a share of the traffic, so that retries
// cannot multiply the load on a struggling service (Linkerd's and Finagle's
// retry budgets). Requests and retries are counted in a sliding window of
// ten buckets, each Window/10 long; the window covers the current bucket and
// the nine before it. It is safe for concurrent use.
type RetryBudget struct {
	now     func() time.Time
	percent int64
	floor   float64 // MinPerSecond × window seconds × 100
	width   int64   // bucket width in nanoseconds

	mu      sync.Mutex
	buckets [retryBuckets]retryBucket
}

type retryBucket struct {
	epoch    int64 // bucket number: unix nanoseconds / width
	requests int64
	retries  int64
}

// NewRetryBudget returns a budget with empty counts. Invalid values are
// clamped as documented on [RetryBudgetConfig].
func NewRetryBudget(cfg RetryBudgetConfig) *RetryBudget {
	window := cfg.Window
	if window <= 0 {
		window = DefaultRetryWindow
	}
	window = max(window, minRetryWindow)
	r := &RetryBudget{
		now:     cfg.Clock,
		percent: int64(max(cfg.Percent, 0)),
		floor:   float64(max(cfg.MinPerSecond, 0)) * window.Seconds() * 100,
		width:   int64(window / retryBuckets),
	}
	if r.now == nil {
		r.now = time.Now
	}
	return r
}

// bucket returns the current bucket, reset if it held an older epoch, and
// the current epoch. r.mu must be held.
func (r *RetryBudget) bucket() (*retryBucket, int64) {
	ns := r.now().UnixNano()
	epoch := ns / r.width
	if ns < 0 && ns%r.width != 0 {
		epoch-- // floor division
	}
	i := epoch % retryBuckets
	if i < 0 {
		i += retryBuckets
	}
	b := &r.buckets[i]
	if b.epoch != epoch {
		*b = retryBucket{epoch: epoch}
	}
	return b, epoch
}

// Request records one original request (not a retry).
func (r *RetryBudget) Request() {
	r.mu.Lock()
	b, _ := r.bucket()
	b.requests++
	r.mu.Unlock()
}

// TryRetry reports whether one more retry fits the budget: retries in the
// window, this one included, must not exceed Percent% of the requests in
// the window plus MinPerSecond × Window. An allowed retry is recorded; a
// refused one is not.
func (r *RetryBudget) TryRetry() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	cur, epoch := r.bucket()
	var requests, retries int64
	for i := range r.buckets {
		if b := &r.buckets[i]; b.epoch <= epoch && epoch-b.epoch < retryBuckets {
			requests += b.requests
			retries += b.retries
		}
	}
	if float64((retries+1)*100) > float64(requests*r.percent)+r.floor {
		return false
	}
	cur.retries++
	return true
}
