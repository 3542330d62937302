package balance

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/straitmesh/strait/internal/clock"
)

func newFakeClock() *clock.Manual { return clock.NewManual(time.Unix(1_700_000_000, 0)) }

// seededRand returns a deterministic Rand, safe for concurrent use.
func seededRand(seed uint64) func(int) int {
	var mu sync.Mutex
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	return func(n int) int {
		mu.Lock()
		defer mu.Unlock()
		return r.IntN(n)
	}
}

func healthy(keys ...string) []Endpoint {
	eps := make([]Endpoint, len(keys))
	for i, k := range keys {
		eps[i] = Endpoint{Key: k, Address: k + ":8443", Healthy: true}
	}
	return eps
}

func newTestBalancer(t testing.TB, cfg Config, eps []Endpoint) (*Balancer, *clock.Manual) {
	t.Helper()
	clk := newFakeClock()
	cfg.Clock = clk.Now
	if cfg.Rand == nil {
		cfg.Rand = seededRand(1)
	}
	b, err := New(cfg)
	if err != nil {
		t.Fatalf("New: got error %v, want none", err)
	}
	b.Update(eps)
	return b, clk
}

func mustPick(t testing.TB, b *Balancer, exclude ...string) *Pick {
	t.Helper()
	p, err := b.Pick(exclude...)
	if err != nil {
		t.Fatalf("Pick(%q): got error %v, want none", exclude, err)
	}
	return p
}

func statsByKey(b *Balancer) map[string]EndpointStats {
	m := map[string]EndpointStats{}
	for _, s := range b.Stats() {
		m[s.Key] = s
	}
	return m
}

func TestPolicyString(t *testing.T) {
	for _, tc := range []struct {
		p    Policy
		want string
	}{
		{P2CEWMA, "p2c-ewma"},
		{LeastRequest, "least-request"},
		{RoundRobin, "round-robin"},
		{Policy(9), "Policy(9)"},
	} {
		if got := tc.p.String(); got != tc.want {
			t.Errorf("Policy(%d).String(): got %q, want %q", int(tc.p), got, tc.want)
		}
	}
	var zero Config
	if zero.Policy != P2CEWMA {
		t.Errorf("zero Policy: got %v, want %v", zero.Policy, P2CEWMA)
	}
}

func TestNewValidates(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cfg     Config
		wantErr bool
	}{
		{"zero", Config{}, false},
		{"full", Config{Policy: RoundRobin, DecayTime: time.Second, Outlier: OutlierConfig{ConsecutiveErrors: 5, BaseEjectionTime: time.Second, MaxEjectionPercent: 100}}, false},
		{"unknown policy", Config{Policy: 3}, true},
		{"negative policy", Config{Policy: -1}, true},
		{"negative decay", Config{DecayTime: -time.Second}, true},
		{"negative errors", Config{Outlier: OutlierConfig{ConsecutiveErrors: -1}}, true},
		{"negative ejection time", Config{Outlier: OutlierConfig{BaseEjectionTime: -time.Second}}, true},
		{"percent over 100", Config{Outlier: OutlierConfig{MaxEjectionPercent: 101}}, true},
		{"negative percent", Config{Outlier: OutlierConfig{MaxEjectionPercent: -1}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			if got := err != nil; got != tc.wantErr {
				t.Fatalf("New: got error %v, want error %v", err, tc.wantErr)
			}
			b, _ := New(Config{})
			if err := b.SetConfig(tc.cfg); (err != nil) != tc.wantErr {
				t.Fatalf("SetConfig: got error %v, want error %v", err, tc.wantErr)
			}
		})
	}
}

func TestPickEmpty(t *testing.T) {
	b, _ := newTestBalancer(t, Config{}, nil)
	if _, err := b.Pick(); !errors.Is(err, ErrNoEndpoints) {
		t.Fatalf("Pick on empty set: got %v, want %v", err, ErrNoEndpoints)
	}
	b.Update(healthy("a"))
	b.Update(nil)
	if _, err := b.Pick(); !errors.Is(err, ErrNoEndpoints) {
		t.Fatalf("Pick after emptying: got %v, want %v", err, ErrNoEndpoints)
	}
}

// TestP2CEWMAPrefersFast: with one slow endpoint among three, peak EWMA
// sends it almost nothing.
func TestP2CEWMAPrefersFast(t *testing.T) {
	b, clk := newTestBalancer(t, Config{}, healthy("fast1", "fast2", "slow"))
	latency := map[string]time.Duration{"fast1": 10 * time.Millisecond, "fast2": 12 * time.Millisecond, "slow": 200 * time.Millisecond}
	counts := map[string]int{}
	const n = 5000
	for range n {
		clk.Advance(time.Millisecond)
		p := mustPick(t, b)
		counts[p.Endpoint.Key]++
		p.Done(latency[p.Endpoint.Key], Success)
	}
	if got, limit := counts["slow"], n/50; got > limit {
		t.Errorf("slow endpoint: got %d of %d picks, want at most %d (counts %v)", got, n, limit, counts)
	}
	for _, k := range []string{"fast1", "fast2"} {
		if got, want := counts[k], n/4; got < want {
			t.Errorf("%s: got %d of %d picks, want at least %d (counts %v)", k, got, n, want, counts)
		}
	}
	st := statsByKey(b)
	if got, want := st["slow"].EWMALatency, 100*time.Millisecond; got < want {
		t.Errorf("slow EWMA: got %s, want at least %s", got, want)
	}
}

// TestP2CEWMAPeakAndDecay checks the estimate itself: a higher sample
// replaces it at once, a lower one only moves it with time, and an idle
// estimate decays toward zero.
func TestP2CEWMAPeakAndDecay(t *testing.T) {
	b, clk := newTestBalancer(t, Config{DecayTime: 10 * time.Second}, healthy("a"))
	ewma := func() time.Duration { return b.Stats()[0].EWMALatency }
	if got := ewma(); got != 0 {
		t.Fatalf("EWMA before any sample: got %s, want 0", got)
	}
	mustPick(t, b).Done(100*time.Millisecond, Success)
	if got, want := ewma(), 100*time.Millisecond; got != want {
		t.Fatalf("EWMA after first sample: got %s, want %s", got, want)
	}
	mustPick(t, b).Done(10*time.Millisecond, Success) // no time elapsed: no weight
	if got, want := ewma(), 100*time.Millisecond; got != want {
		t.Fatalf("EWMA after a low sample at the same instant: got %s, want %s", got, want)
	}
	mustPick(t, b).Done(time.Second, Success)
	if got, want := ewma(), time.Second; got != want {
		t.Fatalf("EWMA after a peak: got %s, want %s", got, want)
	}
	clk.Advance(10 * time.Second) // one time constant: ×1/e
	if got, lo, hi := ewma(), 367*time.Millisecond, 368*time.Millisecond; got < lo || got > hi {
		t.Fatalf("EWMA after one decay time idle: got %s, want in [%s, %s]", got, lo, hi)
	}
	mustPick(t, b).Done(time.Millisecond, Failure) // fast failure: no effect
	if got, lo := ewma(), 367*time.Millisecond; got < lo {
		t.Fatalf("EWMA after a fast failure: got %s, want at least %s", got, lo)
	}
	mustPick(t, b).Done(2*time.Second, Failure) // slow failure: peak
	if got, want := ewma(), 2*time.Second; got != want {
		t.Fatalf("EWMA after a slow failure: got %s, want %s", got, want)
	}
	mustPick(t, b).Done(time.Hour, LocalError) // says nothing about the endpoint
	if got, want := ewma(), 2*time.Second; got != want {
		t.Fatalf("EWMA after a local error: got %s, want %s", got, want)
	}
}

// TestP2CEWMANewEndpointGetsTraffic: an endpoint without samples competes
// on outstanding requests, so it is used but not flooded.
func TestP2CEWMANewEndpointGetsTraffic(t *testing.T) {
	b, clk := newTestBalancer(t, Config{}, healthy("old"))
	for range 100 {
		clk.Advance(time.Millisecond)
		mustPick(t, b).Done(50*time.Millisecond, Success)
	}
	b.Update(healthy("old", "new"))
	// Hold picks without completing them: the new endpoint must not take
	// them all.
	counts := map[string]int{}
	var held []*Pick
	for range 10 {
		p := mustPick(t, b)
		counts[p.Endpoint.Key]++
		held = append(held, p)
	}
	if counts["new"] == 0 || counts["old"] == 0 {
		t.Errorf("held picks: got %v, want both endpoints used", counts)
	}
	for _, p := range held {
		p.Done(50*time.Millisecond, Success)
	}
}

// TestLeastRequestAvoidsBusy: an endpoint holding requests gets none while
// idle ones exist.
func TestLeastRequestAvoidsBusy(t *testing.T) {
	b, _ := newTestBalancer(t, Config{Policy: LeastRequest}, healthy("a", "busy", "c"))
	for range 5 {
		if p := mustPick(t, b, "a", "c"); p.Endpoint.Key != "busy" {
			t.Fatalf("Pick excluding a and c: got %q, want busy", p.Endpoint.Key)
		}
	}
	counts := map[string]int{}
	for range 1000 {
		p := mustPick(t, b)
		counts[p.Endpoint.Key]++
		p.Done(time.Millisecond, Success)
	}
	if got := counts["busy"]; got != 0 {
		t.Errorf("busy endpoint: got %d picks, want 0 (counts %v)", got, counts)
	}
	if counts["a"] < 400 || counts["c"] < 400 {
		t.Errorf("idle endpoints: got %v, want about 500 each", counts)
	}
	if got, want := statsByKey(b)["busy"].Outstanding, 5; got != want {
		t.Errorf("busy outstanding: got %d, want %d", got, want)
	}
}

func TestRoundRobin(t *testing.T) {
	b, _ := newTestBalancer(t, Config{Policy: RoundRobin}, healthy("a", "b", "c"))
	var got []string
	for range 6 {
		p := mustPick(t, b)
		got = append(got, p.Endpoint.Key)
		p.Done(time.Millisecond, Success)
	}
	if want := "[a b c a b c]"; fmt.Sprint(got) != want {
		t.Fatalf("round robin order: got %v, want %s", got, want)
	}
}

// TestStatsSurviveUpdate: stats follow the Key, not the address or the
// position in the set.
func TestStatsSurviveUpdate(t *testing.T) {
	b, _ := newTestBalancer(t, Config{Outlier: OutlierConfig{ConsecutiveErrors: 5}}, healthy("a", "b"))
	for range 20 {
		p := mustPick(t, b)
		p.Done(40*time.Millisecond, Success)
	}
	held := mustPick(t, b, "b")
	if held.Endpoint.Key != "a" {
		t.Fatalf("Pick excluding b: got %q, want a", held.Endpoint.Key)
	}
	mustPick(t, b, "b").Done(time.Millisecond, Failure)
	before := statsByKey(b)["a"]

	b.Update([]Endpoint{
		{Key: "c", Address: "10.0.0.3:8443", Healthy: true},
		{Key: "a", Address: "10.0.0.9:8443", Healthy: true}, // moved
	})
	after := statsByKey(b)
	a := after["a"]
	if a.Address != "10.0.0.9:8443" {
		t.Errorf("a's address: got %q, want the new one", a.Address)
	}
	if a.Outstanding != 1 || a.EWMALatency != before.EWMALatency || a.ConsecutiveErrors != 1 {
		t.Errorf("a's stats after Update: got outstanding %d, EWMA %s, errors %d; want 1, %s, 1",
			a.Outstanding, a.EWMALatency, a.ConsecutiveErrors, before.EWMALatency)
	}
	if _, ok := after["b"]; ok {
		t.Errorf("b after Update: got present, want gone")
	}
	if c := after["c"]; c.EWMALatency != 0 || c.Outstanding != 0 {
		t.Errorf("c's stats: got EWMA %s, outstanding %d, want zero", c.EWMALatency, c.Outstanding)
	}
	held.Done(time.Millisecond, Success)
	if got := statsByKey(b)["a"].Outstanding; got != 0 {
		t.Errorf("a's outstanding after Done: got %d, want 0", got)
	}

	// Removing then re-adding a Key starts afresh.
	b.Update(healthy("c"))
	b.Update(healthy("a", "c"))
	if got := statsByKey(b)["a"].EWMALatency; got != 0 {
		t.Errorf("a's EWMA after removal and return: got %s, want 0", got)
	}
}

func TestUpdateKeysAndDuplicates(t *testing.T) {
	b, _ := newTestBalancer(t, Config{}, []Endpoint{
		{Address: "10.0.0.1:80", Healthy: true},
		{Key: "x", Address: "10.0.0.2:80", Healthy: true},
		{Key: "x", Address: "10.0.0.3:80", Healthy: true},
	})
	st := b.Stats()
	if len(st) != 2 {
		t.Fatalf("Stats: got %d endpoints, want 2", len(st))
	}
	if st[0].Key != "10.0.0.1:80" {
		t.Errorf("empty Key: got %q, want the address", st[0].Key)
	}
	if st[1].Address != "10.0.0.2:80" {
		t.Errorf("duplicate Key: got address %q, want the first occurrence", st[1].Address)
	}
}

func TestSetConfigKeepsStats(t *testing.T) {
	b, _ := newTestBalancer(t, Config{}, healthy("a", "b"))
	mustPick(t, b, "b").Done(30*time.Millisecond, Success)
	held := mustPick(t, b, "b")
	if err := b.SetConfig(Config{Policy: RoundRobin, Clock: b.cfg.Load().now}); err != nil {
		t.Fatalf("SetConfig: got error %v, want none", err)
	}
	a := statsByKey(b)["a"]
	if a.EWMALatency != 30*time.Millisecond || a.Outstanding != 1 {
		t.Errorf("a after SetConfig: got EWMA %s, outstanding %d, want 30ms, 1", a.EWMALatency, a.Outstanding)
	}
	held.Done(0, LocalError)
	if err := b.SetConfig(Config{Policy: 7}); err == nil {
		t.Fatalf("SetConfig with a bad policy: got no error, want one")
	}
	if got, want := b.cfg.Load().policy, RoundRobin; got != want {
		t.Errorf("policy after a refused SetConfig: got %v, want %v", got, want)
	}
}

func TestExclusion(t *testing.T) {
	for _, policy := range []Policy{P2CEWMA, LeastRequest, RoundRobin} {
		for _, tc := range []struct {
			name    string
			exclude []string
			want    map[string]bool // keys that may be picked
		}{
			{"none", nil, map[string]bool{"a": true, "b": true, "c": true}},
			{"one", []string{"a"}, map[string]bool{"b": true, "c": true}},
			{"two", []string{"a", "c"}, map[string]bool{"b": true}},
			{"unknown key", []string{"zz"}, map[string]bool{"a": true, "b": true, "c": true}},
			{"all: reuse", []string{"a", "b", "c"}, map[string]bool{"a": true, "b": true, "c": true}},
		} {
			t.Run(policy.String()+"/"+tc.name, func(t *testing.T) {
				b, _ := newTestBalancer(t, Config{Policy: policy}, healthy("a", "b", "c"))
				seen := map[string]bool{}
				for range 200 {
					p := mustPick(t, b, tc.exclude...)
					if !tc.want[p.Endpoint.Key] {
						t.Fatalf("Pick(%q): got %q, want one of %v", tc.exclude, p.Endpoint.Key, tc.want)
					}
					if p.Panic {
						t.Fatalf("Pick(%q): got Panic, want none", tc.exclude)
					}
					seen[p.Endpoint.Key] = true
					p.Done(time.Millisecond, Success)
				}
				if len(seen) != len(tc.want) {
					t.Errorf("Pick(%q): got %v picked, want all of %v", tc.exclude, seen, tc.want)
				}
			})
		}
	}
}

func TestPanicMode(t *testing.T) {
	ep := func(key string, healthy bool) Endpoint { return Endpoint{Key: key, Address: key, Healthy: healthy} }
	for _, tc := range []struct {
		name      string
		eps       []Endpoint
		eject     []string
		exclude   []string
		noPanic   bool
		want      map[string]bool
		wantPanic bool
		wantErr   error
	}{
		{name: "healthy preferred", eps: []Endpoint{ep("a", true), ep("b", false)}, want: map[string]bool{"a": true}},
		{name: "healthy excluded beats unhealthy", eps: []Endpoint{ep("a", true), ep("b", false)}, exclude: []string{"a"}, want: map[string]bool{"a": true}},
		{name: "all unhealthy", eps: []Endpoint{ep("a", false), ep("b", false)}, want: map[string]bool{"a": true, "b": true}, wantPanic: true},
		{name: "all unhealthy, exclusion honoured", eps: []Endpoint{ep("a", false), ep("b", false)}, exclude: []string{"a"}, want: map[string]bool{"b": true}, wantPanic: true},
		{name: "healthy one ejected", eps: []Endpoint{ep("a", true), ep("b", false)}, eject: []string{"a"}, want: map[string]bool{"b": true}, wantPanic: true},
		{name: "all ejected", eps: []Endpoint{ep("a", true), ep("b", false)}, eject: []string{"a", "b"}, want: map[string]bool{"a": true, "b": true}, wantPanic: true},
		{name: "all ejected, exclusion honoured", eps: []Endpoint{ep("a", true), ep("b", true)}, eject: []string{"a", "b"}, exclude: []string{"b"}, want: map[string]bool{"a": true}, wantPanic: true},
		{name: "no panic: all unhealthy", eps: []Endpoint{ep("a", false), ep("b", false)}, noPanic: true, wantErr: ErrNoHealthyEndpoints},
		{name: "no panic: healthy one ejected", eps: []Endpoint{ep("a", true), ep("b", false)}, eject: []string{"a"}, noPanic: true, want: map[string]bool{"a": true}, wantPanic: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{DisablePanicMode: tc.noPanic, Outlier: OutlierConfig{ConsecutiveErrors: 1, MaxEjectionPercent: 100}}
			b, _ := newTestBalancer(t, cfg, tc.eps)
			for _, k := range tc.eject {
				s := b.set.Load().byKey[k]
				(&Pick{b: b, st: s}).Done(0, Failure)
				if !statsByKey(b)[k].Ejected {
					t.Fatalf("setup: %s not ejected", k)
				}
			}
			seen := map[string]bool{}
			for range 100 {
				p, err := b.Pick(tc.exclude...)
				if tc.wantErr != nil {
					if !errors.Is(err, tc.wantErr) {
						t.Fatalf("Pick: got error %v, want %v", err, tc.wantErr)
					}
					return
				}
				if err != nil {
					t.Fatalf("Pick: got error %v, want none", err)
				}
				if !tc.want[p.Endpoint.Key] {
					t.Fatalf("Pick: got %q, want one of %v", p.Endpoint.Key, tc.want)
				}
				if p.Panic != tc.wantPanic {
					t.Fatalf("Pick: got Panic %v, want %v", p.Panic, tc.wantPanic)
				}
				seen[p.Endpoint.Key] = true
				p.Done(time.Millisecond, LocalError)
			}
			if len(seen) != len(tc.want) {
				t.Errorf("picked: got %v, want all of %v", seen, tc.want)
			}
		})
	}
}

// fail reports n consecutive failures on key.
func fail(t *testing.T, b *Balancer, key string, n int) {
	t.Helper()
	for range n {
		s := b.set.Load().byKey[key]
		if s == nil {
			t.Fatalf("fail: no endpoint %q", key)
		}
		s.outstanding.Add(1)
		(&Pick{b: b, st: s}).Done(time.Millisecond, Failure)
	}
}

func TestEjection(t *testing.T) {
	base := 10 * time.Second
	b, clk := newTestBalancer(t, Config{Outlier: OutlierConfig{ConsecutiveErrors: 3, BaseEjectionTime: base, MaxEjectionPercent: 50}}, healthy("a", "b"))

	fail(t, b, "a", 2)
	mustPick(t, b, "b").Done(time.Millisecond, Success) // the only way to reach a
	fail(t, b, "a", 2)
	if got := statsByKey(b)["a"]; got.Ejected || got.ConsecutiveErrors != 2 {
		t.Fatalf("after a success between failures: got ejected %v, errors %d; want false, 2", got.Ejected, got.ConsecutiveErrors)
	}
	for range 5 {
		s := b.set.Load().byKey["a"]
		(&Pick{b: b, st: s}).Done(time.Millisecond, LocalError)
	}
	if got := statsByKey(b)["a"]; got.Ejected || got.ConsecutiveErrors != 2 {
		t.Fatalf("after local errors: got ejected %v, errors %d; want false, 2", got.Ejected, got.ConsecutiveErrors)
	}
	fail(t, b, "a", 1)

	// Ejection n lasts n × base; each expires by time alone.
	for n := 1; n <= 3; n++ {
		start := clk.Now()
		a := statsByKey(b)["a"]
		if !a.Ejected || a.TimesEjected != n || !a.EjectedUntil.Equal(start.Add(time.Duration(n)*base)) {
			t.Fatalf("ejection %d: got ejected %v, times %d, until +%s; want true, %d, +%s",
				n, a.Ejected, a.TimesEjected, a.EjectedUntil.Sub(start), n, time.Duration(n)*base)
		}
		if a.ConsecutiveErrors != 0 {
			t.Fatalf("ejection %d: got %d consecutive errors, want 0", n, a.ConsecutiveErrors)
		}
		for range 50 {
			if p := mustPick(t, b); p.Endpoint.Key != "a" {
				p.Done(time.Millisecond, Success)
			} else {
				t.Fatalf("ejection %d: got a picked, want b", n)
			}
		}
		fail(t, b, "a", 5) // failures while ejected do not count
		if got := statsByKey(b)["a"].ConsecutiveErrors; got != 0 {
			t.Fatalf("failures while ejected: got %d counted, want 0", got)
		}
		clk.Advance(time.Duration(n)*base - time.Nanosecond)
		if !statsByKey(b)["a"].Ejected {
			t.Fatalf("ejection %d: ended early", n)
		}
		clk.Advance(time.Nanosecond)
		if a := statsByKey(b)["a"]; a.Ejected || !a.EjectedUntil.IsZero() {
			t.Fatalf("ejection %d: got ejected %v until %v after its end, want not ejected", n, a.Ejected, a.EjectedUntil)
		}
		seen := false
		for range 50 {
			p := mustPick(t, b)
			seen = seen || p.Endpoint.Key == "a"
			p.Done(time.Millisecond, LocalError)
		}
		if !seen {
			t.Fatalf("ejection %d: a not picked after expiry", n)
		}
		fail(t, b, "a", 3)
	}
}

func TestEjectionTime(t *testing.T) {
	for _, tc := range []struct {
		base  time.Duration
		times int64
		want  time.Duration
	}{
		{30 * time.Second, 1, 30 * time.Second},
		{30 * time.Second, 3, 90 * time.Second},
		{30 * time.Second, 10, 5 * time.Minute},
		{30 * time.Second, 11, 5 * time.Minute},
		{30 * time.Second, 1 << 62, 5 * time.Minute},
		{10 * time.Minute, 1, 10 * time.Minute},
		{10 * time.Minute, 4, 10 * time.Minute},
	} {
		c := Config{Outlier: OutlierConfig{BaseEjectionTime: tc.base}}.withDefaults()
		if got := ejectionTime(c.baseEjection, c.maxEjection, tc.times); got != tc.want {
			t.Errorf("ejectionTime(%s, ×%d): got %s, want %s", tc.base, tc.times, got, tc.want)
		}
	}
}

// TestEjectionMultiplierRestarts: after a full MaxEjectionTime in rotation,
// the next ejection is a first one again.
func TestEjectionMultiplierRestarts(t *testing.T) {
	b, clk := newTestBalancer(t, Config{Outlier: OutlierConfig{ConsecutiveErrors: 1, BaseEjectionTime: time.Minute, MaxEjectionPercent: 100}}, healthy("a", "b"))
	fail(t, b, "a", 1)
	clk.Advance(time.Minute)
	fail(t, b, "a", 1)
	if got := statsByKey(b)["a"].TimesEjected; got != 2 {
		t.Fatalf("second ejection: got times %d, want 2", got)
	}
	clk.Advance(2*time.Minute + MaxEjectionTime - time.Second)
	fail(t, b, "a", 1)
	if got := statsByKey(b)["a"].TimesEjected; got != 3 {
		t.Fatalf("ejection before the restart: got times %d, want 3", got)
	}
	clk.Advance(3*time.Minute + MaxEjectionTime)
	fail(t, b, "a", 1)
	a := statsByKey(b)["a"]
	if a.TimesEjected != 1 || a.EjectedUntil.Sub(clk.Now()) != time.Minute {
		t.Fatalf("ejection after the restart: got times %d for %s, want 1 for 1m", a.TimesEjected, a.EjectedUntil.Sub(clk.Now()))
	}
}

func TestMaxEjectionPercent(t *testing.T) {
	for _, tc := range []struct {
		name        string
		endpoints   int
		percent     int
		failing     int
		wantEjected int
	}{
		{"20% of 10", 10, 20, 5, 2},
		{"50% of 4", 4, 50, 4, 2},
		{"100% of 3", 3, 100, 3, 3},
		{"default 10% of 5: at least one", 5, 0, 3, 1},
		{"10% of 30", 30, 10, 10, 3},
		{"single endpoint", 1, 10, 1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var keys []string
			for i := range tc.endpoints {
				keys = append(keys, fmt.Sprintf("e%d", i))
			}
			b, _ := newTestBalancer(t, Config{Outlier: OutlierConfig{ConsecutiveErrors: 2, MaxEjectionPercent: tc.percent}}, healthy(keys...))
			for _, k := range keys[:tc.failing] {
				fail(t, b, k, 2)
			}
			failing := map[string]bool{}
			for _, k := range keys[:tc.failing] {
				failing[k] = true
			}
			ejected := 0
			for _, s := range b.Stats() {
				switch {
				case s.Ejected:
					ejected++
				case failing[s.Key] && s.ConsecutiveErrors != 2:
					t.Errorf("%s, refused ejection: got %d errors kept, want 2", s.Key, s.ConsecutiveErrors)
				}
			}
			if ejected != tc.wantEjected {
				t.Fatalf("ejected: got %d, want %d", ejected, tc.wantEjected)
			}
		})
	}
}

// TestMaxEjectionPercentRetries: an endpoint refused ejection is ejected on
// its next failure once room opens.
func TestMaxEjectionPercentRetries(t *testing.T) {
	b, clk := newTestBalancer(t, Config{Outlier: OutlierConfig{ConsecutiveErrors: 1, BaseEjectionTime: time.Second, MaxEjectionPercent: 50}}, healthy("a", "b", "c"))
	fail(t, b, "a", 1)
	fail(t, b, "b", 1)
	if st := statsByKey(b); !st["a"].Ejected || st["b"].Ejected {
		t.Fatalf("got a ejected %v, b ejected %v; want true, false", st["a"].Ejected, st["b"].Ejected)
	}
	clk.Advance(time.Second)
	fail(t, b, "b", 1)
	if st := statsByKey(b); !st["b"].Ejected {
		t.Fatalf("b after a's ejection ended: got not ejected, want ejected")
	}
}

func TestDoneIdempotent(t *testing.T) {
	b, _ := newTestBalancer(t, Config{Outlier: OutlierConfig{ConsecutiveErrors: 2}}, healthy("a"))
	p := mustPick(t, b)
	if got := b.Stats()[0].Outstanding; got != 1 {
		t.Fatalf("outstanding after Pick: got %d, want 1", got)
	}
	p.Done(time.Millisecond, Failure)
	p.Done(time.Millisecond, Failure)
	p.Done(time.Second, Success)
	s := b.Stats()[0]
	if s.Outstanding != 0 || s.ConsecutiveErrors != 1 || s.Ejected || s.EWMALatency != 0 {
		t.Fatalf("after three Done calls: got outstanding %d, errors %d, ejected %v, EWMA %s; want 0, 1, false, 0",
			s.Outstanding, s.ConsecutiveErrors, s.Ejected, s.EWMALatency)
	}
	var nilPick *Pick
	nilPick.Done(0, Success) // must not panic
}

func TestManyEndpoints(t *testing.T) {
	// More endpoints than the on-stack candidate buffer.
	var keys []string
	for i := range 200 {
		keys = append(keys, fmt.Sprintf("e%03d", i))
	}
	for _, policy := range []Policy{P2CEWMA, LeastRequest, RoundRobin} {
		b, _ := newTestBalancer(t, Config{Policy: policy}, healthy(keys...))
		seen := map[string]bool{}
		for range 2000 {
			p := mustPick(t, b, "e000", "e199")
			if p.Endpoint.Key == "e000" || p.Endpoint.Key == "e199" {
				t.Fatalf("%s: got excluded %q", policy, p.Endpoint.Key)
			}
			seen[p.Endpoint.Key] = true
			p.Done(time.Millisecond, Success)
		}
		if len(seen) < 150 {
			t.Errorf("%s: got %d distinct endpoints in 2000 picks, want at least 150", policy, len(seen))
		}
	}
}

// TestConcurrent runs Pick/Done from many goroutines while the set, the
// config and the stats change underneath (meaningful under -race).
func TestConcurrent(t *testing.T) {
	clk := newFakeClock()
	b, err := New(Config{Clock: clk.Now, Outlier: OutlierConfig{ConsecutiveErrors: 3, BaseEjectionTime: time.Millisecond, MaxEjectionPercent: 50}})
	if err != nil {
		t.Fatalf("New: got error %v, want none", err)
	}
	sets := [][]Endpoint{healthy("a", "b", "c", "d"), healthy("b", "c", "e"), append(healthy("a"), Endpoint{Key: "u", Address: "u"})}
	b.Update(sets[0])
	stop := make(chan struct{})
	var writers sync.WaitGroup
	writers.Add(1)
	go func() {
		defer writers.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			b.Update(sets[i%len(sets)])
			clk.Advance(time.Millisecond)
			_ = b.Stats()
			if i%10 == 0 {
				_ = b.SetConfig(Config{Policy: Policy(i / 10 % 3), Clock: clk.Now, Outlier: OutlierConfig{ConsecutiveErrors: 3, BaseEjectionTime: time.Millisecond}})
			}
		}
	}()
	var readers sync.WaitGroup
	for g := range 16 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			for i := range 2000 {
				p, err := b.Pick("a")
				if err != nil {
					t.Errorf("Pick: got error %v, want none", err)
					return
				}
				p.Done(time.Duration(i%7)*time.Millisecond, Outcome((g+i)%3))
				p.Done(0, Failure)
			}
		}()
	}
	readers.Wait()
	close(stop)
	writers.Wait()
	for _, s := range b.Stats() {
		if s.Outstanding != 0 {
			t.Errorf("%s: got %d outstanding after all Done, want 0", s.Key, s.Outstanding)
		}
	}
}

func BenchmarkPick(b *testing.B) {
	var keys []string
	for i := range 10 {
		keys = append(keys, fmt.Sprintf("e%d", i))
	}
	lb, err := New(Config{Outlier: OutlierConfig{ConsecutiveErrors: 5}})
	if err != nil {
		b.Fatal(err)
	}
	lb.Update(healthy(keys...))
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			p, err := lb.Pick()
			if err != nil {
				b.Error(err)
				return
			}
			p.Done(time.Millisecond, Success)
		}
	})
}

func TestPriorityTiers(t *testing.T) {
	eps := healthy("local-a", "local-b", "remote-w", "remote-s")
	eps[2].Priority, eps[3].Priority = 1, 2
	for _, policy := range []Policy{P2CEWMA, LeastRequest, RoundRobin} {
		t.Run(policy.String(), func(t *testing.T) {
			b, clk := newTestBalancer(t, Config{Policy: policy, Outlier: OutlierConfig{ConsecutiveErrors: 1, BaseEjectionTime: time.Minute, MaxEjectionPercent: 100}}, eps)
			for range 50 {
				p := mustPick(t, b)
				if p.Endpoint.Priority != 0 {
					t.Fatalf("picked %s while local endpoints are healthy", p.Endpoint.Key)
				}
				p.Done(time.Millisecond, Success)
			}
			// A retry that tried both local endpoints goes to the next tier.
			if p := mustPick(t, b, "local-a", "local-b"); p.Endpoint.Key != "remote-w" {
				t.Fatalf("retry after both locals: %s, want remote-w", p.Endpoint.Key)
			} else {
				p.Done(time.Millisecond, Success)
			}
			// Both local endpoints ejected: traffic fails over to the first peer.
			for _, k := range []string{"local-a", "local-b"} {
				for {
					p := mustPick(t, b)
					if p.Endpoint.Key == k {
						p.Done(time.Millisecond, Failure)
						break
					}
					p.Done(time.Millisecond, Success)
				}
			}
			for range 20 {
				p := mustPick(t, b)
				if p.Endpoint.Key != "remote-w" {
					t.Fatalf("with locals ejected: %s, want remote-w", p.Endpoint.Key)
				}
				p.Done(time.Millisecond, Success)
			}
			// Back after the ejection: local again.
			clk.Advance(2 * time.Minute)
			if p := mustPick(t, b); p.Endpoint.Priority != 0 {
				t.Fatalf("after the ejection ended: %s, want a local endpoint", p.Endpoint.Key)
			}
		})
	}
	// Unhealthy locals: a healthy peer wins over panic-mode locals.
	eps2 := healthy("local-a", "remote-w")
	eps2[0].Healthy = false
	eps2[1].Priority = 1
	b, _ := newTestBalancer(t, Config{}, eps2)
	if p := mustPick(t, b); p.Endpoint.Key != "remote-w" || p.Panic {
		t.Fatalf("unhealthy local: picked %s (panic %v), want remote-w", p.Endpoint.Key, p.Panic)
	}
	// Out-of-range priorities are clamped, not dropped.
	eps3 := healthy("x")
	eps3[0].Priority = 99
	b, _ = newTestBalancer(t, Config{}, eps3)
	if p := mustPick(t, b); p.Endpoint.Key != "x" {
		t.Fatalf("clamped priority: %s", p.Endpoint.Key)
	}
}

func shareOf(t *testing.T, b *Balancer, prio, n int) float64 {
	t.Helper()
	hits := 0
	for range n {
		p := mustPick(t, b)
		if p.Endpoint.Priority == prio {
			hits++
		}
		p.Done(time.Millisecond, Success)
	}
	return float64(hits) / float64(n)
}

func TestSpillThreshold(t *testing.T) {
	eps := healthy("local-a", "local-b", "remote")
	eps[1].Healthy = false
	eps[2].Priority = 1
	for _, tc := range []struct {
		threshold int
		want      float64 // local share
	}{{0, 1}, {50, 1}, {100, 0.5}, {80, 0.625}} {
		b, _ := newTestBalancer(t, Config{SpillThreshold: tc.threshold, Rand: seededRand(7)}, eps)
		if got := shareOf(t, b, 0, 4000); got < tc.want-0.05 || got > tc.want+0.05 {
			t.Errorf("threshold %d%% with half the local endpoints healthy: local share %.2f, want %.2f", tc.threshold, got, tc.want)
		}
	}
	if _, err := New(Config{SpillThreshold: 101}); err == nil {
		t.Error("threshold 101% accepted")
	}
}

func TestSlowStartFailback(t *testing.T) {
	eps := healthy("local-a", "remote")
	eps[1].Priority = 1
	b, clk := newTestBalancer(t, Config{SlowStart: 10 * time.Second, Rand: seededRand(3)}, eps)
	if got := shareOf(t, b, 0, 200); got != 1 {
		t.Fatalf("at start: local share %.2f, want 1 (no ramp for what was up from the start)", got)
	}
	eps[0].Healthy = false
	b.Update(eps)
	if got := shareOf(t, b, 0, 200); got != 0 {
		t.Fatalf("local down: local share %.2f, want 0", got)
	}
	eps[0].Healthy = true
	b.Update(eps)
	shareOf(t, b, 0, 1) // the first pick sees it back
	if got := shareOf(t, b, 0, 2000); got > 0.05 {
		t.Fatalf("just back: local share %.2f, want about 0", got)
	}
	clk.Advance(5 * time.Second)
	if got := shareOf(t, b, 0, 4000); got < 0.44 || got > 0.56 {
		t.Fatalf("halfway through slow start: local share %.2f, want about 0.5", got)
	}
	clk.Advance(5 * time.Second)
	if got := shareOf(t, b, 0, 500); got != 1 {
		t.Fatalf("after slow start: local share %.2f, want 1", got)
	}
}

func TestEjectionCapPerPriority(t *testing.T) {
	// Two local endpoints and a peer; a 50% cap. With the peer healthy,
	// both locals may be ejected: their traffic fails over.
	eps := healthy("local-a", "local-b", "remote")
	eps[2].Priority = 1
	b, _ := newTestBalancer(t, Config{Outlier: OutlierConfig{ConsecutiveErrors: 1, BaseEjectionTime: time.Minute, MaxEjectionPercent: 50}}, eps)
	for range 20 {
		p := mustPick(t, b)
		if p.Endpoint.Priority == 0 {
			p.Done(time.Millisecond, Failure)
		} else {
			p.Done(time.Millisecond, Success)
		}
	}
	if s := statsByKey(b); !s["local-a"].Ejected || !s["local-b"].Ejected {
		t.Fatalf("with a healthy peer, both failing locals should be ejected: %+v", s)
	}
	// Without another priority, the cap holds within the set.
	b2, _ := newTestBalancer(t, Config{Outlier: OutlierConfig{ConsecutiveErrors: 1, BaseEjectionTime: time.Minute, MaxEjectionPercent: 50}}, healthy("a", "b"))
	for range 20 {
		mustPick(t, b2).Done(time.Millisecond, Failure)
	}
	ejected := 0
	for _, s := range statsByKey(b2) {
		if s.Ejected {
			ejected++
		}
	}
	if ejected != 1 {
		t.Fatalf("single priority, 50%% cap: %d of 2 ejected, want 1", ejected)
	}
}
