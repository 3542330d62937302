// Package balance chooses an upstream endpoint for each outbound request of
// the sidecar, and holds the two guards that sit next to that choice: the
// retry budget and the connection/request limiter (circuit breaking).
//
// Three policies are offered: power of two choices over peak-EWMA latency
// (the default, as in Finagle and Linkerd), least request (power of two
// choices over outstanding requests) and round robin. On top of any policy,
// outlier ejection takes an endpoint out of rotation after consecutive
// failures, and panic mode (as in Envoy) keeps traffic flowing when health
// information says nothing is usable.
//
// The package is pure logic: no network I/O, no goroutines, time and
// randomness are injected through [Config]. It must not know about TLS,
// HTTP, QUIC or control-plane types: the proxy converts discovery results
// into []Endpoint and classifies each response as an [Outcome].
package balance

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Errors returned by [Balancer.Pick].
var (
	// ErrNoEndpoints means the endpoint set is empty.
	ErrNoEndpoints = errors.New("balance: no endpoints")
	// ErrNoHealthyEndpoints means no endpoint is healthy and panic mode is
	// disabled ([Config.DisablePanicMode]). With panic mode on (the
	// default) Pick never returns it.
	ErrNoHealthyEndpoints = errors.New("balance: no healthy endpoints")
)

// Defaults applied to zero fields of [Config] and [OutlierConfig].
const (
	DefaultDecayTime          = 10 * time.Second
	DefaultBaseEjectionTime   = 30 * time.Second
	DefaultMaxEjectionPercent = 10
	// MaxEjectionTime caps a single ejection (unless BaseEjectionTime is
	// longer, in which case BaseEjectionTime is the cap).
	MaxEjectionTime = 5 * time.Minute
)

// Policy is the endpoint selection algorithm. The zero value is P2CEWMA.
type Policy int

const (
	// P2CEWMA picks two distinct random candidates and keeps the one with
	// the lower cost, cost = peak-EWMA latency × (outstanding + 1).
	P2CEWMA Policy = iota
	// LeastRequest picks two distinct random candidates and keeps the one
	// with fewer outstanding requests.
	LeastRequest
	// RoundRobin rotates over the candidates.
	RoundRobin
)

// String returns the policy's name, as used in config dumps.
func (p Policy) String() string {
	switch p {
	case P2CEWMA:
		return "p2c-ewma"
	case LeastRequest:
		return "least-request"
	case RoundRobin:
		return "round-robin"
	default:
		return fmt.Sprintf("Policy(%d)", int(p))
	}
}

// Endpoint is one instance of the upstream service.
type Endpoint struct {
	// Key is the stable identity of the endpoint (its instance name). Stats
	// survive [Balancer.Update] while the Key persists. Empty means Address.
	Key string
	// Address is host:port.
	Address string
	// SPIFFEID is the identity the endpoint must present. Not used here;
	// carried for the caller.
	SPIFFEID string
	// Cluster is the cluster the endpoint runs in. Not used here; carried
	// for the caller.
	Cluster string
	// Route is how the caller reaches the endpoint (nil: at Address).
	// Not used here; carried for the caller, so that a pick holds its
	// route even when the set changed since the caller read its own state.
	Route any
	// Healthy is the control plane's view; false means unhealthy or unknown.
	Healthy bool
	// Priority orders endpoints into failover tiers: a pick is made among
	// the lowest priority that has a candidate at the best health level
	// (0 = the local cluster, then peers). Values above MaxPriority count
	// as MaxPriority.
	Priority int
	// Weight is the endpoint's share among the candidates of its
	// priority, relative to the others'; zero or less counts as 1. An
	// endpoint that stands for several instances (a peer cluster's,
	// through its gateway) weighs their count.
	Weight int
}

// weight is e's weight, at least 1.
func (e *Endpoint) weight() int { return max(e.Weight, 1) }

// MaxPriority is the highest distinct Endpoint.Priority.
const MaxPriority = 7

// OutlierConfig configures outlier ejection. The zero value disables it.
type OutlierConfig struct {
	// ConsecutiveErrors is the number of Failure outcomes in a row that
	// eject an endpoint. Zero disables ejection (the caller applies the
	// mesh default).
	ConsecutiveErrors int
	// BaseEjectionTime is the length of a first ejection; the n-th ejection
	// lasts n × BaseEjectionTime, capped at MaxEjectionTime (or at
	// BaseEjectionTime if that is longer). Zero means
	// DefaultBaseEjectionTime.
	BaseEjectionTime time.Duration
	// MaxEjectionPercent bounds the share of the endpoint set ejected at
	// once, in 1..100. One endpoint may always be ejected, whatever the
	// percentage (as in Envoy). Zero means DefaultMaxEjectionPercent.
	MaxEjectionPercent int
}

// Config configures a [Balancer]. The zero value is usable: P2CEWMA, no
// ejection, 10s decay, panic mode on, real clock and randomness.
type Config struct {
	// Policy is the selection algorithm; zero is P2CEWMA.
	Policy Policy
	// Outlier configures ejection; zero disables it.
	Outlier OutlierConfig
	// DecayTime is the time constant of the peak-EWMA latency: a sample
	// below the current estimate moves it with weight 1-exp(-elapsed/DecayTime),
	// and an idle estimate decays toward zero at the same rate. Zero means
	// DefaultDecayTime.
	DecayTime time.Duration
	// DisablePanicMode makes Pick refuse unhealthy endpoints: with no
	// healthy endpoint it returns ErrNoHealthyEndpoints. False (the zero
	// value) keeps Envoy's panic mode, described at [Balancer.Pick].
	DisablePanicMode bool
	// Clock returns the current time. Nil means time.Now.
	Clock func() time.Time
	// Rand returns a uniformly distributed int in [0, n) for n > 0. It is
	// called from many goroutines at once and must be safe for that. Nil
	// means math/rand/v2's IntN.
	Rand func(n int) int
	// SpillThreshold, a percentage from 0 to 100, shares traffic between
	// priorities: a priority whose healthy share of endpoints h is below
	// it takes h/SpillThreshold of what reaches it, and the rest spills to
	// the next priority that has candidates. Zero sends everything to the
	// first priority with a healthy endpoint.
	SpillThreshold int
	// SlowStart ramps a priority that comes back (its healthy count goes
	// from zero to more) linearly from nothing to its full share over this
	// long, so failback does not move all traffic at once. Zero disables.
	SlowStart time.Duration
}

// config is a validated Config with defaults filled in.
type config struct {
	policy             Policy
	consecutiveErrors  int64
	baseEjection       time.Duration
	maxEjection        time.Duration
	maxEjectionPercent int
	decay              float64 // nanoseconds
	panicMode          bool
	now                func() time.Time
	rand               func(n int) int
	spill              float64 // threshold as a fraction; 0 means off
	slowStart          int64   // nanoseconds
}

// Validate reports whether SetConfig would take c.
func (c Config) Validate() error { return c.validate() }

func (c Config) validate() error {
	switch {
	case c.Policy < P2CEWMA || c.Policy > RoundRobin:
		return fmt.Errorf("balance: unknown policy %d", int(c.Policy))
	case c.DecayTime < 0:
		return fmt.Errorf("balance: negative decay time %s", c.DecayTime)
	case c.SpillThreshold < 0 || c.SpillThreshold > 100:
		return fmt.Errorf("balance: spill threshold %d%% out of 0..100", c.SpillThreshold)
	case c.SlowStart < 0:
		return fmt.Errorf("balance: negative slow start %s", c.SlowStart)
	case c.Outlier.ConsecutiveErrors < 0:
		return fmt.Errorf("balance: negative consecutive errors %d", c.Outlier.ConsecutiveErrors)
	case c.Outlier.BaseEjectionTime < 0:
		return fmt.Errorf("balance: negative base ejection time %s", c.Outlier.BaseEjectionTime)
	case c.Outlier.MaxEjectionPercent < 0 || c.Outlier.MaxEjectionPercent > 100:
		return fmt.Errorf("balance: max ejection percent %d not in 0..100", c.Outlier.MaxEjectionPercent)
	}
	return nil
}

func (c Config) withDefaults() *config {
	r := &config{
		spill:              float64(c.SpillThreshold) / 100,
		slowStart:          int64(c.SlowStart),
		policy:             c.Policy,
		consecutiveErrors:  int64(c.Outlier.ConsecutiveErrors),
		baseEjection:       c.Outlier.BaseEjectionTime,
		maxEjectionPercent: c.Outlier.MaxEjectionPercent,
		decay:              float64(c.DecayTime),
		panicMode:          !c.DisablePanicMode,
		now:                c.Clock,
		rand:               c.Rand,
	}
	if r.baseEjection == 0 {
		r.baseEjection = DefaultBaseEjectionTime
	}
	r.maxEjection = max(MaxEjectionTime, r.baseEjection)
	if r.maxEjectionPercent == 0 {
		r.maxEjectionPercent = DefaultMaxEjectionPercent
	}
	if r.decay == 0 {
		r.decay = float64(DefaultDecayTime)
	}
	if r.now == nil {
		r.now = time.Now
	}
	if r.rand == nil {
		r.rand = rand.IntN
	}
	return r
}

// Balancer chooses endpoints. It is safe for concurrent use: Pick and Done
// take no balancer-wide lock (a snapshot is read atomically and each
// endpoint's latency estimate has its own short mutex); Update, SetConfig
// and ejection decisions are serialised among themselves.
type Balancer struct {
	cfg atomic.Pointer[config]
	set atomic.Pointer[endpointSet]
	rr  atomic.Uint64
	// up[p] is when priority p last came back (Unix ns): its healthy count
	// went from zero to more. 0 means it has none now; upLongAgo means it
	// was up from the start (no ramp).
	up [MaxPriority + 1]atomic.Int64

	mu sync.Mutex // serialises Update and ejection decisions
}

// endpointSet is an immutable snapshot of the endpoints.
type endpointSet struct {
	eps   []entry
	byKey map[string]*endpointState
}

type entry struct {
	ep Endpoint
	st *endpointState
}

// endpointState is what survives Update while a Key persists.
type endpointState struct {
	key          string
	outstanding  atomic.Int64
	consecErrs   atomic.Int64
	ejectedUntil atomic.Int64 // unix nanoseconds; 0 if never ejected
	timesEjected atomic.Int64 // written under Balancer.mu

	mu      sync.Mutex
	est     float64 // peak-EWMA latency in nanoseconds, as of stamp
	stamp   int64   // unix nanoseconds
	sampled bool
}

// New returns a Balancer with an empty endpoint set.
func New(cfg Config) (*Balancer, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	b := &Balancer{}
	b.cfg.Store(cfg.withDefaults())
	b.set.Store(&endpointSet{})
	for i := range b.up {
		b.up[i].Store(upFromStart)
	}
	return b, nil
}

// SetConfig replaces the configuration. Endpoint stats (latency,
// outstanding requests, error counts, current ejections) are kept; a new
// outlier config applies to the next ejection decision. On error the
// previous configuration stays.
func (b *Balancer) SetConfig(cfg Config) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	b.cfg.Store(cfg.withDefaults())
	return nil
}

// Update replaces the endpoint set. Stats are kept for endpoints whose Key
// was already present; the other fields (Address, Healthy...) are taken from
// eps. An endpoint that goes from unhealthy to healthy is no longer
// ejected. An empty Key is replaced by the Address; a Key seen twice keeps its
// first occurrence. eps is copied. Picks outstanding on a removed endpoint
// may still call Done; it has no effect on the new set.
func (b *Balancer) Update(eps []Endpoint) {
	b.mu.Lock()
	defer b.mu.Unlock()
	old := b.set.Load()
	wasDown := map[string]bool{}
	for i := range old.eps {
		if !old.eps[i].ep.Healthy {
			wasDown[old.eps[i].ep.Key] = true
		}
	}
	ns := &endpointSet{eps: make([]entry, 0, len(eps)), byKey: make(map[string]*endpointState, len(eps))}
	for _, ep := range eps {
		if ep.Key == "" {
			ep.Key = ep.Address
		}
		if _, dup := ns.byKey[ep.Key]; dup {
			continue
		}
		st := old.byKey[ep.Key]
		if st == nil {
			st = &endpointState{key: ep.Key}
		} else if ep.Healthy && wasDown[ep.Key] {
			// Health says it recovered (as Envoy's successful active
			// health check does): its ejection, about what failed before,
			// ends now. The multiplier stays, so one that keeps failing
			// is still ejected for longer each time.
			// It ends at now, not 0: the multiplier restarts once the
			// endpoint stays in rotation for a maximum ejection time
			// from the end of its last ejection (see eject).
			if now := b.cfg.Load().now().UnixNano(); st.ejectedUntil.Load() > now {
				st.ejectedUntil.Store(now)
			}
			st.consecErrs.Store(0)
		}
		ns.byKey[ep.Key] = st
		ns.eps = append(ns.eps, entry{ep: ep, st: st})
	}
	b.set.Store(ns)
}

// Outcome classifies the result of a request for the balancer.
type Outcome int

const (
	// Success is a response from the endpoint that is not a server error.
	// It feeds the latency estimate and resets the consecutive error count.
	// It is the zero value.
	Success Outcome = iota
	// Failure is a server error (5xx), a connect failure, a reset or a
	// timeout: it counts toward ejection, and its latency can only raise
	// the estimate (a fast failure must not make an endpoint attractive).
	Failure
	// LocalError is a failure that says nothing about the endpoint (the
	// client cancelled, a local resource ran out). It only ends the
	// request: no latency sample, no error count. Unknown Outcome values
	// are treated as LocalError.
	LocalError
)

// String returns the outcome's name.
func (o Outcome) String() string {
	switch o {
	case Success:
		return "success"
	case Failure:
		return "failure"
	case LocalError:
		return "local-error"
	default:
		return fmt.Sprintf("Outcome(%d)", int(o))
	}
}

// Pick is one chosen endpoint for one attempt. The caller must call Done
// exactly once when the attempt ends.
type Pick struct {
	// Endpoint is the chosen endpoint, a copy.
	Endpoint Endpoint
	// Panic reports that no healthy, non-ejected endpoint was available, so
	// the choice ignored health or ejection (see [Balancer.Pick]).
	Panic bool

	b    *Balancer
	st   *endpointState
	done atomic.Bool
}

// Candidate tiers, tried in order; the first non-empty one is chosen from.
const (
	tierHealthy         = iota // healthy, not ejected, not excluded
	tierHealthyExcluded        // healthy, not ejected
	tierPanic                  // not ejected, not excluded (any health)
	tierPanicExcluded          // not ejected
	tierEjected                // not excluded (everything ejected)
	tierEjectedExcluded        // anything
	numTiers
)

var masksPool = sync.Pool{New: func() any { return new([]uint8) }}

// Pick chooses an endpoint for one attempt of a request. exclude lists the
// Keys already tried by this request, so that retries go elsewhere when
// possible.
//
// Candidates are, in order of preference, taking the first non-empty group:
//
//  1. healthy, non-ejected, non-excluded endpoints;
//  2. healthy, non-ejected endpoints, excluded ones allowed (a retry reuses
//     an endpoint rather than fail);
//  3. panic mode, when no healthy non-ejected endpoint exists: non-ejected
//     endpoints whatever their health, first without then with the
//     excluded ones;
//  4. when every endpoint is ejected: all endpoints, first without then
//     with the excluded ones.
//
// With DisablePanicMode, unhealthy endpoints are never candidates (step 3
// is skipped and step 4 keeps only healthy ones) and ErrNoHealthyEndpoints
// is returned when none is healthy. Otherwise Pick fails only with
// ErrNoEndpoints, when the set is empty.
//
// Ejections end lazily: an endpoint whose ejection time has passed is a
// candidate again at the next Pick.
func (b *Balancer) Pick(exclude ...string) (*Pick, error) {
	s := b.set.Load()
	n := len(s.eps)
	if n == 0 {
		return nil, ErrNoEndpoints
	}
	c := b.cfg.Load()
	now := c.now().UnixNano()

	var buf [64]uint8
	var masks []uint8
	if n <= len(buf) {
		masks = buf[:n]
	} else {
		mp := masksPool.Get().(*[]uint8)
		if cap(*mp) < n {
			*mp = make([]uint8, n)
		}
		masks = (*mp)[:n]
		defer masksPool.Put(mp)
	}
	// counts[tier][priority]: health levels first, then failover
	// priority within a level (the local cluster before peers).
	var counts [numTiers][MaxPriority + 1]int
	var total [MaxPriority + 1]int
	for i := range s.eps {
		m := tiers(&s.eps[i], now, exclude, c.panicMode)
		masks[i] = m
		p := s.eps[i].prio()
		total[p]++
		for t := range counts {
			counts[t][p] += int(m >> t & 1)
		}
	}
	b.noteUp(&counts[tierHealthyExcluded], &total, now)
	tier, prio := -1, 0
find:
	for t := range counts {
		for p, k := range counts[t] {
			if k > 0 {
				tier, prio = t, p
				break find
			}
		}
	}
	if tier < 0 {
		return nil, ErrNoHealthyEndpoints
	}
	if tier == tierHealthy && (c.spill > 0 || c.slowStart > 0) {
		prio = b.spillPriority(c, &counts, &total, prio, now)
	}
	bit := uint8(1) << tier
	cnt := counts[tier][prio]
	// Candidates are drawn by weight: with every weight 1 this is the
	// k-th candidate.
	wsum := 0
	for i, m := range masks {
		if m&bit != 0 && s.eps[i].prio() == prio {
			wsum += s.eps[i].ep.weight()
		}
	}
	pick := func(r, skip int) int { return nth(s.eps, masks, bit, prio, r, skip) }

	var chosen int
	switch {
	case cnt == 1:
		chosen = pick(0, -1)
	case c.policy == RoundRobin:
		chosen = pick(int((b.rr.Add(1)-1)%uint64(wsum)), -1)
	default:
		chosen = pick(c.rand(wsum), -1)
		other := pick(c.rand(wsum-s.eps[chosen].ep.weight()), chosen)
		if better(&s.eps[other], &s.eps[chosen], c, now) {
			chosen = other
		}
	}
	e := &s.eps[chosen]
	e.st.outstanding.Add(1)
	return &Pick{Endpoint: e.ep, Panic: tier >= tierPanic, b: b, st: e.st}, nil
}

// tiers returns the set of candidate tiers e belongs to, as a bit mask.
func tiers(e *entry, now int64, exclude []string, panicMode bool) uint8 {
	healthy := e.ep.Healthy
	live := !e.st.ejected(now)
	in := true
	for _, k := range exclude {
		if k == e.ep.Key {
			in = false
			break
		}
	}
	var m uint8
	if healthy && live {
		m |= 1 << tierHealthyExcluded
		if in {
			m |= 1 << tierHealthy
		}
	}
	if panicMode && live {
		m |= 1 << tierPanicExcluded
		if in {
			m |= 1 << tierPanic
		}
	}
	if panicMode || healthy {
		m |= 1 << tierEjectedExcluded
		if in {
			m |= 1 << tierEjected
		}
	}
	return m
}

// upFromStart marks a priority that has been up since the balancer began
// (it is not ramped).
const upFromStart = 1

// noteUp records, per priority with endpoints, when its healthy count went
// from zero to more (for slow start).
func (b *Balancer) noteUp(healthy, total *[MaxPriority + 1]int, now int64) {
	for p := range total {
		// A priority with no endpoint at all is down too: endpoints that
		// register again after a full outage ramp up like healthy ones.
		cur := b.up[p].Load()
		switch {
		case healthy[p] == 0 && cur != 0:
			b.up[p].CompareAndSwap(cur, 0)
		case healthy[p] > 0 && cur == 0:
			b.up[p].CompareAndSwap(0, now)
		}
	}
}

// spillPriority chooses the priority for a pick among healthy candidates:
// each priority, from first, takes its share (its healthy fraction over
// the spill threshold, times its slow-start ramp) of what reaches it; the
// rest goes on to the next priority with candidates. first is the lowest
// priority with a candidate.
func (b *Balancer) spillPriority(c *config, counts *[numTiers][MaxPriority + 1]int, total *[MaxPriority + 1]int, first int, now int64) int {
	cand := &counts[tierHealthy]
	healthy := &counts[tierHealthyExcluded]
	last := first
	for p := first; p <= MaxPriority; p++ {
		if cand[p] > 0 {
			last = p
		}
	}
	for p := first; p < last; p++ {
		if cand[p] == 0 {
			continue
		}
		share := 1.0
		if c.spill > 0 {
			share = min(1, float64(healthy[p])/float64(total[p])/c.spill)
		}
		if c.slowStart > 0 {
			if up := b.up[p].Load(); up > upFromStart && now-up < c.slowStart {
				share *= float64(now-up) / float64(c.slowStart)
			}
		}
		if share >= 1 || float64(c.rand(1<<20))/(1<<20) < share {
			return p
		}
	}
	return last
}

// prio is the endpoint's failover priority, clamped.
func (e *entry) prio() int { return min(max(e.ep.Priority, 0), MaxPriority) }

// nth returns the index of the endpoint of priority prio whose mask has
// bit set where r, a point in the candidates' weights laid end to end
// (skip's left out), falls.
func nth(eps []entry, masks []uint8, bit uint8, prio, r, skip int) int {
	for i, m := range masks {
		if m&bit != 0 && eps[i].prio() == prio && i != skip {
			w := eps[i].ep.weight()
			if r < w {
				return i
			}
			r -= w
		}
	}
	panic("balance: candidate index out of range")
}

// better reports whether a is strictly cheaper than b under c's policy;
// outstanding requests count per unit of weight.
func better(ea, eb *entry, c *config, now int64) bool {
	a, b := ea.st, eb.st
	oa, ob := float64(a.outstanding.Load()+1)/float64(ea.ep.weight()), float64(b.outstanding.Load()+1)/float64(eb.ep.weight())
	if c.policy == LeastRequest {
		return oa < ob
	}
	la, okA := a.latency(now, c.decay)
	lb, okB := b.latency(now, c.decay)
	// An endpoint without samples borrows the other's latency, so that
	// the comparison falls back to outstanding requests: new endpoints get
	// traffic without being flooded before their first response.
	switch {
	case !okA && !okB:
		la, lb = 1, 1
	case !okA:
		la = lb
	case !okB:
		lb = la
	}
	return la*oa < lb*ob
}

func (s *endpointState) ejected(now int64) bool {
	return now < s.ejectedUntil.Load()
}

func decayWeight(elapsed int64, decay float64) float64 {
	if elapsed <= 0 {
		return 1
	}
	return math.Exp(-float64(elapsed) / decay)
}

// latency returns the peak-EWMA estimate at now, in nanoseconds, and
// whether there has been any sample.
func (s *endpointState) latency(now int64, decay float64) (float64, bool) {
	s.mu.Lock()
	est, stamp, ok := s.est, s.stamp, s.sampled
	s.mu.Unlock()
	if !ok {
		return 0, false
	}
	return est * decayWeight(now-stamp, decay), true
}

// observe feeds one latency sample. The estimate decays toward zero with
// weight w = exp(-elapsed/decay); a sample at or above the decayed value
// replaces it (the peak), one below it is blended in as est·w + rtt·(1-w).
// With peakOnly, samples below the decayed value are ignored.
func (s *endpointState) observe(rtt time.Duration, now int64, decay float64, peakOnly bool) {
	v := float64(max(rtt, 0))
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.sampled {
		if !peakOnly {
			s.est, s.stamp, s.sampled = v, now, true
		}
		return
	}
	w := decayWeight(now-s.stamp, decay)
	switch cur := s.est * w; {
	case v >= cur:
		s.est = v
	case peakOnly:
		return
	default:
		s.est = cur + v*(1-w)
	}
	s.stamp = max(s.stamp, now)
}

// Done reports the end of the attempt: its latency (time to response
// headers or to failure) and its outcome. Only the first call counts; later
// calls are no-ops. Done on a nil Pick is a no-op.
func (p *Pick) Done(latency time.Duration, o Outcome) {
	if p == nil || !p.done.CompareAndSwap(false, true) {
		return
	}
	p.st.outstanding.Add(-1)
	if o != Success && o != Failure {
		return
	}
	c := p.b.cfg.Load()
	now := c.now().UnixNano()
	if o == Success {
		p.st.consecErrs.Store(0)
		p.st.observe(latency, now, c.decay, false)
		return
	}
	p.st.observe(latency, now, c.decay, true)
	// Failures of requests still in flight when the endpoint was ejected
	// do not count toward the next ejection.
	if c.consecutiveErrors == 0 || p.st.ejected(now) {
		return
	}
	if p.st.consecErrs.Add(1) >= c.consecutiveErrors {
		p.b.eject(p.st, c, now)
	}
}

// eject ejects st if it still qualifies and MaxEjectionPercent allows it.
// When it does not, the error count is kept, so the next failure tries
// again.
func (b *Balancer) eject(st *endpointState, c *config, now int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.set.Load()
	if s.byKey[st.key] != st || st.ejected(now) || st.consecErrs.Load() < c.consecutiveErrors {
		return
	}
	// MaxEjectionPercent applies within the endpoint's failover priority.
	// When another priority has a healthy endpoint in rotation, the whole
	// priority may go: its traffic then fails over rather than being sent
	// to endpoints known to fail.
	prio := -1
	for i := range s.eps {
		if s.eps[i].st == st {
			prio = s.eps[i].prio()
		}
	}
	ejected, total, elsewhere := 0, 0, false
	for i := range s.eps {
		e := &s.eps[i]
		switch {
		case e.prio() == prio:
			total++
			if e.st.ejected(now) {
				ejected++
			}
		case e.ep.Healthy && !e.st.ejected(now):
			elsewhere = true
		}
	}
	if !elsewhere && ejected > 0 && (ejected+1)*100 > c.maxEjectionPercent*total {
		return
	}
	times := st.timesEjected.Load()
	// The multiplier restarts once the endpoint has stayed in rotation for
	// a full maximum ejection time since its last ejection ended.
	if prev := st.ejectedUntil.Load(); prev != 0 && now-prev >= int64(c.maxEjection) {
		times = 0
	}
	times++
	st.timesEjected.Store(times)
	st.ejectedUntil.Store(now + int64(ejectionTime(c.baseEjection, c.maxEjection, times)))
	st.consecErrs.Store(0)
}

// ejectionTime is base × times, capped at limit.
func ejectionTime(base, limit time.Duration, times int64) time.Duration {
	if times > int64(limit/base) {
		return limit
	}
	return min(base*time.Duration(times), limit)
}

// EndpointStats is a point-in-time view of one endpoint, for config dumps
// and metrics.
type EndpointStats struct {
	Endpoint
	// Outstanding is the number of picks not yet Done.
	Outstanding int
	// EWMALatency is the current peak-EWMA latency estimate, decayed to
	// now; zero if the endpoint has no sample yet.
	EWMALatency time.Duration
	// ConsecutiveErrors is the number of Failure outcomes since the last
	// Success or ejection.
	ConsecutiveErrors int
	// Ejected reports whether the endpoint is ejected now.
	Ejected bool
	// EjectedUntil is when the current ejection ends; zero if not ejected.
	EjectedUntil time.Time
	// TimesEjected is the ejection multiplier: ejections since the count
	// last restarted (after MaxEjectionTime in rotation).
	TimesEjected int
}

// Stats returns the stats of every endpoint in the set, in Update order.
func (b *Balancer) Stats() []EndpointStats {
	s := b.set.Load()
	c := b.cfg.Load()
	now := c.now().UnixNano()
	out := make([]EndpointStats, 0, len(s.eps))
	for _, e := range s.eps {
		es := EndpointStats{
			Endpoint:          e.ep,
			Outstanding:       int(e.st.outstanding.Load()),
			ConsecutiveErrors: int(e.st.consecErrs.Load()),
			TimesEjected:      int(e.st.timesEjected.Load()),
		}
		if l, ok := e.st.latency(now, c.decay); ok {
			es.EWMALatency = time.Duration(l)
		}
		if until := e.st.ejectedUntil.Load(); now < until {
			es.Ejected = true
			es.EjectedUntil = time.Unix(0, until)
		}
		out = append(out, es)
	}
	return out
}
