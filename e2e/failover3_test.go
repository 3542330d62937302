package e2e

import (
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/proxy"
)

// Failover with three clusters under steady load from east's frontend:
// east (the root authority) runs backend, and west and south, joined to
// east with join tokens, run and export it. A TrafficPolicy in east orders
// the peers: west, then south.

// threeClustersForFailover starts east, west and south with their
// gateways, runs backend in west and south and exports it there, and joins
// both to east, waiting until east imports their backend.
func threeClustersForFailover(t *testing.T) (east, west, south *cluster) {
	t.Helper()
	east, west, south, _ = threeClustersWithGateways(t)
	return east, west, south
}

// threeClustersWithGateways is threeClustersForFailover that also returns
// the gateways, by cluster name.
func threeClustersWithGateways(t *testing.T) (east, west, south *cluster, gateways map[string]*gatewayProc) {
	t.Helper()
	east = newCluster(t, "east", clusterOptions{rootAuthority: true})
	west = newCluster(t, "west", clusterOptions{meshOf: east})
	south = newCluster(t, "south", clusterOptions{meshOf: east})
	gateways = map[string]*gatewayProc{}
	for _, c := range []*cluster{east, west, south} {
		gateways[c.name] = c.startGateway("")
	}
	for _, c := range []*cluster{west, south} {
		c.workload("backend-"+c.name, "backend", workloadOptions{})
		c.mustApply(exportBackend)
		if _, err := c.join(east.joinToken(c.name)); err != nil {
			t.Fatalf("%s joins east: %v", c.name, err)
		}
		east.linkUp(c.name, 1)
	}
	return east, west, south, gateways
}

// backendPolicy is east's TrafficPolicy for backend: failover to west,
// then south, with more failover fields (", slowStart: 4s").
func backendPolicy(more string) string {
	return "apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: backend}\nspec:\n  service: backend\n" +
		"  failover: {peers: [west, south]" + more + "}\n"
}

// endpointView is one endpoint of backend as a sidecar's snapshot has it.
type endpointView struct {
	cluster  string
	health   controlplanev1.Health
	priority uint32
}

func (e endpointView) healthy() bool { return e.health == controlplanev1.Health_HEALTH_HEALTHY }

// backendView returns the endpoints of backend in w's snapshot, by instance
// ("west/backend" for a peer's), and the policy's spill threshold.
func backendView(w *workload) (map[string]endpointView, uint32) {
	out := map[string]endpointView{}
	for _, svc := range w.sc.Snapshot().GetServices() {
		if svc.GetName() != "backend" {
			continue
		}
		for _, ep := range svc.GetEndpoints() {
			out[ep.GetInstance()] = endpointView{cluster: ep.GetCluster(), health: ep.GetHealth(), priority: ep.GetPriority()}
		}
		return out, svc.GetPolicy().GetFailover().GetSpillThresholdPercent()
	}
	return out, 0
}

// waitTiers waits until fe's snapshot has west in tier 1 and south in tier
// 2, both healthy, and the given local instances healthy.
func waitTiers(t *testing.T, fe *workload, local ...string) {
	t.Helper()
	waitUntil(t, 15*time.Second, fmt.Sprintf("frontend sees %v healthy locally, west in tier 1 and south in tier 2", local), func() bool {
		v, _ := backendView(fe)
		for _, in := range local {
			if !v[in].healthy() {
				return false
			}
		}
		w, s := v["west/backend"], v["south/backend"]
		return w.healthy() && w.priority == 1 && s.healthy() && s.priority == 2
	})
}

// relay forwards loopback TCP connections to a target, and can be killed
// like a crashed host: its port closes and every open connection is reset,
// with nothing said first.
type relay struct {
	ln     net.Listener
	target func() string
	wg     sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	dead  bool
}

func newRelay(t testing.TB, target func() string) *relay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	r.wg.Add(1)
	go r.serve()
	t.Cleanup(func() { r.kill(); r.wg.Wait() })
	return r
}

func (r *relay) addr() string { return r.ln.Addr().String() }

func (r *relay) serve() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.pipe(c)
		}()
	}
}

func (r *relay) pipe(c net.Conn) {
	var up net.Conn
	if addr := r.target(); addr != "" {
		up, _ = net.DialTimeout("tcp", addr, 5*time.Second)
	}
	if up == nil {
		c.Close()
		return
	}
	r.mu.Lock()
	dead := r.dead
	if !dead {
		r.conns[c], r.conns[up] = struct{}{}, struct{}{}
	}
	r.mu.Unlock()
	if dead {
		resetConn(c)
		resetConn(up)
		return
	}
	done := make(chan struct{}, 2)
	go func() { io.Copy(up, c); done <- struct{}{} }()
	go func() { io.Copy(c, up); done <- struct{}{} }()
	<-done
	c.Close()
	up.Close()
	<-done
	r.mu.Lock()
	delete(r.conns, c)
	delete(r.conns, up)
	r.mu.Unlock()
}

// kill closes the port and resets every connection. It may be called more
// than once.
func (r *relay) kill() {
	r.mu.Lock()
	r.dead = true
	conns := r.conns
	r.conns = map[net.Conn]struct{}{}
	r.mu.Unlock()
	r.ln.Close()
	for c := range conns {
		resetConn(c)
	}
}

// resetConn closes c with an RST rather than a FIN.
func resetConn(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

// crashableBackend is a backend instance (echo app and sidecar) whose
// sidecar reaches the control plane, and is reached by its peers, through
// relays: crash kills it as a power cut would, without the graceful stop
// of the harness's workloads (which deregister the instance and drain
// connections). The control plane then learns of it only when its health
// lease lapses; until then only the callers' sidecars can tell.
type crashableBackend struct {
	instance string
	sc       *proxy.Sidecar
	srv      *http.Server
	cp, in   *relay
	cancel   context.CancelFunc
	done     chan error
}

func (c *cluster) crashableBackend(instance string) *crashableBackend {
	c.t.Helper()
	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		c.t.Fatal(err)
	}
	srv := &http.Server{Handler: echoApp(c.name, "backend", instance)}
	go srv.Serve(app)
	c.t.Cleanup(func() { srv.Close() })
	var scp atomic.Pointer[proxy.Sidecar]
	cpAddr := c.addr
	b := &crashableBackend{instance: instance, srv: srv, done: make(chan error, 1)}
	b.cp = newRelay(c.t, func() string { return cpAddr })
	b.in = newRelay(c.t, func() string {
		if sc := scp.Load(); sc != nil && sc.Addrs() != nil {
			return sc.Addrs().Inbound
		}
		return ""
	})
	sc, err := proxy.New(proxy.Config{
		TrustDomain: c.td, ControlPlane: b.cp.addr(), TrustBundle: c.dir.Bundle, Token: c.token("backend"),
		Instance: instance, Service: "backend", Namespace: "default", Inbound: "127.0.0.1:0", Advertise: b.in.addr(),
		App: app.Addr().String(), HealthInterval: 500 * time.Millisecond,
		Logger: testLogger(c.t).With("component", instance), Registry: prometheus.NewRegistry(),
	})
	if err != nil {
		c.t.Fatal(err)
	}
	scp.Store(sc)
	ctx, cancel := context.WithCancel(context.Background())
	b.sc, b.cancel = sc, cancel
	go func() { b.done <- sc.Run(ctx) }()
	c.t.Cleanup(b.stop)
	deadline := time.Now().Add(15 * time.Second)
	for !sc.Ready() {
		select {
		case err := <-b.done:
			c.t.Fatalf("sidecar %s: %v", instance, err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("sidecar %s not ready", instance)
		}
	}
	return b
}

// crash cuts the instance off the control plane first (so nothing is
// reported or deregistered), resets its callers' connections and closes
// its port, stops the app with its connections, and stops the sidecar.
func (b *crashableBackend) crash() {
	b.cp.kill()
	b.in.kill()
	b.srv.Close()
	b.cancel()
}

// appDown stops the app (listener and open connections) and leaves the
// sidecar running: its health probe fails and it reports the instance
// unhealthy.
func (b *crashableBackend) appDown() { b.srv.Close() }

func (b *crashableBackend) stop() {
	b.cancel()
	select {
	case <-b.done:
	case <-time.After(10 * time.Second):
	}
}

// answer is one request that the echo app answered.
type answer struct {
	at       time.Time // when the reply arrived
	took     time.Duration
	cluster  string
	instance string
}

// recordedLoad runs requests from several clients, bounded in count and
// time, and records every answer in arrival order.
type recordedLoad struct {
	mu      sync.Mutex
	answers []answer
	fail    int
	errs    []string
	stop    chan struct{}
	wg      sync.WaitGroup
}

func startRecordedLoad(url string, clients, maxRequests int, maxDuration time.Duration) *recordedLoad {
	l := &recordedLoad{stop: make(chan struct{})}
	client := &http.Client{Timeout: 10 * time.Second}
	deadline := time.Now().Add(maxDuration)
	for range clients {
		l.wg.Go(func() {
			for i := 0; i < maxRequests/clients && time.Now().Before(deadline); i++ {
				select {
				case <-l.stop:
					return
				default:
				}
				start := time.Now()
				code, r, err := get(client, url)
				l.mu.Lock()
				now := time.Now() // under the lock: answers stay in time order
				if err != nil || code != http.StatusOK {
					l.fail++
					if len(l.errs) < 10 {
						l.errs = append(l.errs, fmt.Sprintf("%s: code %d err %v", now.Format("15:04:05.000"), code, err))
					}
				} else {
					l.answers = append(l.answers, answer{at: now, took: now.Sub(start), cluster: r.Cluster, instance: r.Instance})
				}
				l.mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		})
	}
	return l
}

func (l *recordedLoad) finish() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

// report stops the load, logs what it saw and the retries the frontend
// (its metrics in reg) sent, fails t if any request failed, and returns
// the answers by cluster.
func (l *recordedLoad) report(t *testing.T, reg *prometheus.Registry, began time.Time) map[string]int {
	t.Helper()
	l.finish()
	l.mu.Lock()
	defer l.mu.Unlock()
	byCluster := map[string]int{}
	for _, a := range l.answers {
		byCluster[a.cluster]++
	}
	retries := metric(t, reg, "strait_proxy_retries_total", map[string]string{"destination": "backend", "outcome": "sent"})
	t.Logf("load: %d answered %v, %d failed %v; %v retries sent by the frontend; test ran %s",
		len(l.answers), byCluster, l.fail, l.errs, retries, time.Since(began).Round(time.Millisecond))
	if l.fail > 0 {
		t.Errorf("%d client requests failed (retries included): %v", l.fail, l.errs)
	}
	return byCluster
}

// counts returns how many answers have arrived and how many requests failed.
func (l *recordedLoad) counts() (answered, failed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.answers), l.fail
}

// since returns a copy of the answers that arrived at or after from.
func (l *recordedLoad) since(from time.Time) []answer {
	l.mu.Lock()
	defer l.mu.Unlock()
	i, _ := slices.BinarySearchFunc(l.answers, from, func(a answer, t time.Time) int { return a.at.Compare(t) })
	return slices.Clone(l.answers[i:])
}

// measure waits for n answers after the next few (requests sent before the
// call may still arrive: they are skipped), and returns the count of each
// cluster among those n and the failures meanwhile.
func (l *recordedLoad) measure(t *testing.T, n int) (byCluster map[string]int, failed int) {
	t.Helper()
	const skip = 8
	a0, f0 := l.counts()
	waitUntil(t, 60*time.Second, fmt.Sprintf("%d more answers", skip+n), func() bool {
		a, _ := l.counts()
		return a >= a0+skip+n
	})
	l.mu.Lock()
	defer l.mu.Unlock()
	byCluster = map[string]int{}
	for _, a := range l.answers[a0+skip : a0+skip+n] {
		byCluster[a.cluster]++
	}
	return byCluster, l.fail - f0
}

// TestThreeClusterCrashFailover kills both of east's backend instances at
// once under load (crashableBackend: no deregistration, connections reset)
// and checks: zero failed client requests, west (the first peer tier)
// answering within 1s of the last east answer, south never used; then new
// east instances start and east's share ramps up over the 4s slow start
// without falling back.
func TestThreeClusterCrashFailover(t *testing.T) {
	began := time.Now()
	east, _, _ := threeClustersForFailover(t)
	east.mustApply(backendPolicy(", slowStart: 4s"))
	b0 := east.crashableBackend("backend-e0")
	b1 := east.crashableBackend("backend-e1")
	fe := east.workload("frontend-e0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	waitTiers(t, fe, "backend-e0", "backend-e1")
	t.Logf("three clusters linked, policy in force: %s", time.Since(began).Round(time.Millisecond))

	l := startRecordedLoad(fe.url("backend"), 4, 400_000, 90*time.Second)
	defer l.finish()
	byCluster, failed := l.measure(t, 200)
	if byCluster["east"] != 200 || failed != 0 {
		t.Fatalf("with east's backends healthy: answers %v, %d failed; want all from east", byCluster, failed)
	}

	// Before the crash, explain sends traffic to the local cluster.
	if s, err := explainBackend(context.Background(), east); err != nil || !strings.Contains(s, "goes to the local cluster") {
		t.Fatalf("explain before the crash: %q %v; want traffic to the local cluster", s, err)
	}

	// Both local instances die at once, as in a power cut: the control
	// plane is not told; only the frontend's sidecar sees connections fail
	// at first. The control plane sees the sidecars' configuration streams
	// close (their relay is cut) and marks the instances unhealthy 2s
	// later: explain, polled from the crash on, then says west.
	type flip struct {
		lag     time.Duration // -1: not within the poll's bound
		summary string
	}
	flipped := make(chan flip, 1)
	pollCtx, stopPoll := context.WithCancel(context.Background())
	var poll sync.WaitGroup
	defer func() { stopPoll(); poll.Wait() }()
	killAt := time.Now()
	b0.crash()
	b1.crash()
	poll.Go(func() {
		var last string
		for pollCtx.Err() == nil && time.Since(killAt) < 20*time.Second {
			if s, err := explainBackend(pollCtx, east); err == nil {
				last = s
				if strings.Contains(s, "west") {
					flipped <- flip{time.Since(killAt), s}
					return
				}
			}
			select {
			case <-pollCtx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
		flipped <- flip{-1, last}
	})
	waitUntil(t, 10*time.Second, "west answers after east's backends died", func() bool {
		for _, a := range l.since(killAt) {
			if a.cluster == "west" {
				return true
			}
		}
		return false
	})
	// Some steady state served by west.
	westFrom := time.Now()
	if by, _ := l.measure(t, 200); by["west"] != 200 {
		t.Errorf("after the failover: answers %v, want all from west (the first peer tier) while it is healthy", by)
	}
	if v, _ := backendView(fe); v["backend-e0"].healthy() && v["backend-e1"].healthy() {
		t.Logf("the control plane still lists east's dead instances healthy %s after the crash: the failover was the frontend sidecar's alone (retries on connect failure, then outlier ejection)", time.Since(killAt).Round(time.Millisecond))
	}
	var lastEast, firstWest time.Time
	var slowest time.Duration
	for _, a := range l.since(killAt.Add(-time.Second)) {
		if !a.at.Before(westFrom) {
			break
		}
		switch {
		case a.cluster == "east" && a.at.After(lastEast):
			lastEast = a.at
		case a.cluster == "west" && firstWest.IsZero():
			firstWest = a.at
		}
		if a.at.After(killAt) {
			slowest = max(slowest, a.took)
		}
	}
	if lastEast.IsZero() {
		lastEast = killAt
	}
	gap := firstWest.Sub(lastEast)
	t.Logf("failover: last east answer %s after the kill, first west answer %s after the kill: %s from last east to first west; slowest request around the kill took %s",
		lastEast.Sub(killAt).Round(100*time.Microsecond), firstWest.Sub(killAt).Round(100*time.Microsecond), gap.Round(100*time.Microsecond), slowest.Round(100*time.Microsecond))
	if gap > time.Second || firstWest.Sub(killAt) > time.Second {
		t.Errorf("west answered %s after the last east answer (%s after the kill), want within 1s", gap, firstWest.Sub(killAt))
	}
	switch f := <-flipped; {
	case f.lag < 0:
		t.Errorf("explain did not mention west within 20s of the crash; last summary %q", f.summary)
	case f.lag > 5*time.Second:
		t.Errorf("explain said %q only %s after the crash, want within 5s (the control plane marks an instance unhealthy 2s after its sidecar's streams closed)", f.summary, f.lag.Round(time.Millisecond))
	default:
		t.Logf("explain flipped to west %s after the crash: %q", f.lag.Round(time.Millisecond), f.summary)
	}

	// East comes back: new instances of backend.
	backAt := time.Now()
	east.workload("backend-e2", "backend", workloadOptions{})
	east.workload("backend-e3", "backend", workloadOptions{})
	var firstEast time.Time
	waitUntil(t, 15*time.Second, "east answers again after new backends started", func() bool {
		for _, a := range l.since(backAt) {
			if a.cluster == "east" {
				firstEast = a.at
				return true
			}
		}
		return false
	})
	t.Logf("first east answer %s after the new backends started", firstEast.Sub(backAt).Round(time.Millisecond))
	// Slow start of 4s: east's share per 500ms window from its first
	// answer, over 8s.
	const window, windows = 500 * time.Millisecond, 16
	waitUntil(t, 30*time.Second, "the failback observed for 8s", func() bool { return time.Since(firstEast) > windows*window+time.Second })
	type share struct {
		east, n int
	}
	shares := make([]share, windows)
	for _, a := range l.since(firstEast) {
		i := int(a.at.Sub(firstEast) / window)
		if i >= windows {
			break
		}
		shares[i].n++
		if a.cluster == "east" {
			shares[i].east++
		}
		if a.cluster == "south" {
			t.Errorf("south answered during the failback at %s, while west was healthy", a.at.Sub(firstEast))
		}
	}
	frac := func(s share) float64 {
		if s.n == 0 {
			return math.NaN()
		}
		return float64(s.east) / float64(s.n)
	}
	var b strings.Builder
	for i, s := range shares {
		fmt.Fprintf(&b, " %.1fs:%.2f(n=%d)", float64(i+1)*window.Seconds(), frac(s), s.n)
	}
	t.Logf("east's share per 500ms window after its first answer (slow start 4s):%s", b.String())

	// A ramp: it starts low, passes through intermediate shares, ends whole,
	// and never drops back by more than sampling noise explains.
	if f := frac(shares[0]); shares[0].n >= 10 && f > 0.5 {
		t.Errorf("failback jumped: east's share %.2f in its first 500ms, want a ramp", f)
	}
	between := 0
	for _, s := range shares[:8] {
		if f := frac(s); s.n >= 10 && f >= 0.1 && f <= 0.9 {
			between++
		}
	}
	if between < 3 {
		t.Errorf("east's share did not ramp: %d windows between 0.1 and 0.9 in the first 4s, want at least 3", between)
	}
	for i := 1; i < windows; i++ {
		p, c := shares[i-1], shares[i]
		if p.n < 10 || c.n < 10 {
			continue
		}
		fp, fc := frac(p), frac(c)
		pm := (fp + fc) / 2
		noise := 3 * math.Sqrt(max(pm*(1-pm), 0.05)*(1/float64(p.n)+1/float64(c.n)))
		if fc < fp-0.1-noise {
			t.Errorf("failback flapped: east's share fell from %.2f to %.2f at %.1fs", fp, fc, float64(i+1)*window.Seconds())
		}
	}
	for i := 10; i < windows; i++ { // from 5s, past the 4s slow start
		if f := frac(shares[i]); shares[i].n >= 10 && f < 0.95 {
			t.Errorf("east's share %.2f at %.1fs, after the 4s slow start; want all", f, float64(i+1)*window.Seconds())
		}
	}

	total := l.report(t, fe.registry, began)
	if total["south"] > 0 {
		t.Errorf("south answered %d requests while west, the first peer tier, was healthy", total["south"])
	}
}

// explainBackend returns the summary of `strait explain backend` on c.
func explainBackend(ctx context.Context, c *cluster) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	ex, err := c.admin.Explain(ctx, &controlplanev1.ExplainRequest{Service: "backend"})
	return ex.GetSummary(), err
}

// TestThreeClusterSpillThreshold measures the share of traffic that
// spills to west when east's local tier is partly unhealthy (by the health
// probe, then by passive ejection) against the balancer's rule, with zero
// failed requests.
func TestThreeClusterSpillThreshold(t *testing.T) {
	began := time.Now()
	east, _, _ := threeClustersForFailover(t)
	policy := func(threshold int) string { return backendPolicy(fmt.Sprintf(", spillThreshold: %d", threshold)) }
	east.mustApply(policy(80))
	east.crashableBackend("backend-e0")
	b1 := east.crashableBackend("backend-e1")
	fe := east.workload("frontend-e0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	waitTiers(t, fe, "backend-e0", "backend-e1")

	l := startRecordedLoad(fe.url("backend"), 4, 400_000, 120*time.Second)
	defer l.finish()
	const n = 400
	// The balancer's spill rule (proxy/balance, spillPriority): a tier
	// whose healthy fraction h (healthy and not ejected, over all its
	// endpoints) is below the threshold T keeps h/T of the picks that
	// reach it; the rest moves to the next tier with candidates (west,
	// which keeps all: its one endpoint is healthy). So 1 - h/T of the
	// traffic goes to west.
	expect := func(healthy, total, threshold int) float64 {
		return 1 - math.Min(1, float64(healthy)/float64(total)/(float64(threshold)/100))
	}
	check := func(what string, healthy, total, threshold int) {
		t.Helper()
		by, failed := l.measure(t, n)
		got := float64(by["west"]) / n
		want := expect(healthy, total, threshold)
		t.Logf("%s: %d of %d local endpoints healthy, spill threshold %d%%: west answered %.3f of %d requests (expected %.3f), answers %v, %d failed",
			what, healthy, total, threshold, got, n, want, by, failed)
		if math.Abs(got-want) > 0.15 || want == 0 && by["west"] > 0 {
			t.Errorf("%s: west's share %.3f, want %.3f ± 0.15 (exactly 0 when nothing should spill)", what, got, want)
		}
		if by["south"] > 0 {
			t.Errorf("%s: south answered %d requests while west, the first peer tier, was healthy", what, by["south"])
		}
		if failed > 0 {
			t.Errorf("%s: %d requests failed", what, failed)
		}
	}
	setThreshold := func(threshold int) {
		t.Helper()
		east.mustApply(policy(threshold))
		waitUntil(t, 10*time.Second, fmt.Sprintf("the frontend has spill threshold %d%%", threshold), func() bool {
			_, th := backendView(fe)
			return th == uint32(threshold)
		})
	}
	check("both local backends healthy", 2, 2, 80)

	// One of the two local instances loses its app; its sidecar's health
	// probe fails and the control plane marks it unhealthy (it stays in
	// the endpoint set, so the local tier is at half capacity). This is the
	// deterministic trigger: the test waits for the frontend's snapshot to
	// show it before measuring.
	b1.appDown()
	down := time.Now()
	waitUntil(t, 10*time.Second, "backend-e1 unhealthy in the frontend's snapshot", func() bool {
		v, _ := backendView(fe)
		e1, ok := v["backend-e1"]
		return ok && !e1.healthy() && v["backend-e0"].healthy()
	})
	t.Logf("backend-e1 unhealthy in the frontend's snapshot %s after its app stopped", time.Since(down).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	ex, err := east.admin.Explain(ctx, &controlplanev1.ExplainRequest{Service: "backend"})
	cancel()
	if err != nil || !strings.Contains(ex.GetSummary(), "1 of 2 healthy is below the 80% spill threshold") {
		t.Errorf("explain at half local capacity: %v %v", ex.GetSummary(), err)
	}
	check("app of backend-e1 down", 1, 2, 80)
	setThreshold(100)
	check("app of backend-e1 down", 1, 2, 100)
	setThreshold(40)
	check("app of backend-e1 down", 1, 2, 40)

	// Passive ejection as the trigger: a third instance comes, then
	// crashes without the control plane being told. The frontend's sidecar
	// ejects it after consecutive connect failures (retried elsewhere).
	setThreshold(80)
	b2 := east.crashableBackend("backend-e2")
	waitUntil(t, 10*time.Second, "backend-e2 healthy in the frontend's snapshot", func() bool {
		v, _ := backendView(fe)
		return v["backend-e2"].healthy()
	})
	check("backend-e2 added", 2, 3, 80)
	b2.crash()
	crashed := time.Now()
	ejected := func() bool {
		for _, s := range fe.sc.UpstreamStats("backend") {
			if s.Key == "backend-e2" {
				return s.Ejected
			}
		}
		return false
	}
	waitUntil(t, 10*time.Second, "the frontend ejects crashed backend-e2", ejected)
	v, _ := backendView(fe)
	t.Logf("backend-e2 ejected by the frontend %s after its crash; the control plane lists it %s", time.Since(crashed).Round(time.Millisecond), v["backend-e2"].health)
	// The control plane lists backend-e2 healthy; `explain --from` shows
	// the frontend's own view, where it is ejected.
	waitUntil(t, 10*time.Second, "explain --from frontend-e0 shows backend-e2 ejected", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		ex, err := east.admin.Explain(ctx, &controlplanev1.ExplainRequest{Service: "backend", From: "frontend-e0"})
		if err != nil || len(ex.GetFrom().GetEjected()) == 0 {
			return false
		}
		var names []string
		for _, e := range ex.GetFrom().GetEjected() {
			names = append(names, e.GetEndpoint())
		}
		if !slices.Contains(names, "backend-e2") || ex.GetTiers()[0].GetHealthy() != 1 || !ex.GetFrom().GetConnected() {
			return false
		}
		t.Logf("explain --from frontend-e0: %s; ejected %v; local tier %d/%d healthy", ex.GetSummary(), names, ex.GetTiers()[0].GetHealthy(), ex.GetTiers()[0].GetTotal())
		return true
	})
	check("backend-e2 crashed and ejected", 1, 3, 80)
	if !ejected() {
		t.Log("backend-e2's ejection ended during the measurement")
	}

	l.finish()
	l.mu.Lock()
	defer l.mu.Unlock()
	t.Logf("load: %d answered, %d failed %v; test ran %s", len(l.answers), l.fail, l.errs, time.Since(began).Round(time.Millisecond))
	if l.fail > 0 {
		t.Errorf("%d client requests failed: %v", l.fail, l.errs)
	}
}

// windowCounts splits the answers from `from` on into n windows of length
// w and counts, per window, the answers and those from cluster.
func windowCounts(answers []answer, from time.Time, w time.Duration, n int, cluster string) (of, total []int) {
	of, total = make([]int, n), make([]int, n)
	for _, a := range answers {
		if a.at.Before(from) {
			continue
		}
		i := int(a.at.Sub(from) / w)
		if i >= n {
			break
		}
		total[i]++
		if a.cluster == cluster {
			of[i]++
		}
	}
	return of, total
}

// TestThreeClusterPartition partitions west, the first peer tier, off
// east by stopping west's gateway, under load from east's frontend (east
// runs no backend), and checks: zero failed client requests throughout;
// south answering from shortly after the stop; west's endpoint in the
// frontend's snapshot turning unhealthy when the link is reported down,
// then expiring after the 3s staleness (not before 2.5s, by 10s), with no
// west answer after the stop; then west's gateway restarts on its address,
// west's endpoint comes back healthy in tier 1, and traffic returns to west
// over the 2s slow start, south's share falling to nothing.
func TestThreeClusterPartition(t *testing.T) {
	began := time.Now()
	east, west, _, gateways := threeClustersWithGateways(t)
	east.mustApply(backendPolicy(", staleness: 3s, slowStart: 2s"))
	fe := east.workload("frontend-e0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	waitTiers(t, fe)
	t.Logf("three clusters linked, policy in force: %s", time.Since(began).Round(time.Millisecond))

	l := startRecordedLoad(fe.url("backend"), 4, 400_000, 90*time.Second)
	defer l.finish()
	if by, failed := l.measure(t, 200); by["west"] != 200 || failed != 0 {
		t.Fatalf("with both peers up: answers %v, %d failed; want all from west (the first peer tier)", by, failed)
	}

	// The partition: west's gateway stops. Its peer address is kept, to
	// restart it there.
	westView := func() (endpointView, bool) {
		v, _ := backendView(fe)
		e, ok := v["west/backend"]
		return e, ok
	}
	westGW := gateways["west"]
	addr := westGW.peer
	stopAt := time.Now()
	westGW.stop()
	stopped := time.Now()
	var unhealthyAt time.Time
	sawUnhealthy := false
	waitUntil(t, 10*time.Second, "west's endpoint unhealthy or gone in the frontend's snapshot", func() bool {
		e, ok := westView()
		if ok && e.healthy() {
			return false
		}
		unhealthyAt, sawUnhealthy = time.Now(), ok
		return true
	})
	var goneAt time.Time
	waitUntil(t, 15*time.Second, "west's endpoint expires from the frontend's snapshot", func() bool {
		if _, ok := westView(); ok {
			return false
		}
		goneAt = time.Now()
		return true
	})
	// When east's gateway last heard from west's, as it reports it: the
	// staleness counts from there.
	var heard time.Time
	var state string
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	st, err := east.fed.FederationStatus(ctx, &controlplanev1.FederationStatusRequest{})
	cancel()
	if err != nil {
		t.Fatalf("federation status: %v", err)
	}
	for _, ls := range st.GetLinks() {
		if ls.GetLink().GetPeer() == "west" {
			state = ls.GetState()
			if ls.GetLastHeard() != nil {
				heard = ls.GetLastHeard().AsTime()
			}
		}
	}
	var firstSouth, lastWest time.Time
	var slowest time.Duration // of the answers within 3s of the stop
	for _, a := range l.since(stopAt) {
		if a.at.Sub(stopAt) < 3*time.Second {
			slowest = max(slowest, a.took)
		}
		switch a.cluster {
		case "south":
			if firstSouth.IsZero() {
				firstSouth = a.at
			}
		case "west":
			lastWest = a.at
		}
	}
	since := func(at time.Time) string {
		if at.IsZero() {
			return "never"
		}
		return at.Sub(stopAt).Round(time.Millisecond).String()
	}
	how := "unhealthy"
	if !sawUnhealthy {
		how = "gone (never seen unhealthy)"
	}
	t.Logf("partition: west's gateway stopped in %s; from the stop: first south answer %s, last west answer %s, west's endpoint %s in the frontend's snapshot %s, expired %s (staleness 3s; %s after east's gateway last heard from west, at %s; link %q); slowest request answered within 3s of the stop took %s",
		stopped.Sub(stopAt).Round(time.Millisecond), since(firstSouth), since(lastWest), how, since(unhealthyAt), since(goneAt),
		goneAt.Sub(heard).Round(time.Millisecond), since(heard), state, slowest.Round(time.Millisecond))
	if heard.IsZero() || state == "connected" {
		t.Errorf("east's link to west after the partition: state %q, last heard %s; want it not connected, with a last-heard time", state, since(heard))
	} else if goneAt.Sub(heard) < 3*time.Second {
		t.Errorf("west's endpoint expired %s after east's gateway last heard from west, before the 3s staleness", goneAt.Sub(heard).Round(time.Millisecond))
	}
	// Requests sent to west before the frontend's snapshot marks it
	// unhealthy wait at east's gateway, which dials west again, until the
	// frontend's 1s connect timeout; then they are retried to south.
	if firstSouth.IsZero() || firstSouth.Sub(stopAt) > 2*time.Second {
		t.Errorf("first south answer %s after the stop, want within 2s", since(firstSouth))
	}
	if !lastWest.IsZero() && lastWest.Sub(stopped) > time.Second {
		t.Errorf("west answered %s after its gateway stopped (stopping took %s)", since(lastWest), stopped.Sub(stopAt))
	}
	if d := goneAt.Sub(stopAt); d < 2500*time.Millisecond || d > 10*time.Second {
		t.Errorf("west's endpoint expired %s after the stop, want between 2.5s and 10s (staleness 3s)", d.Round(time.Millisecond))
	}
	if by, failed := l.measure(t, 200); by["south"] != 200 || failed != 0 {
		t.Errorf("west partitioned: answers %v, %d failed; want all from south", by, failed)
	}

	// West heals: its gateway restarts on the same address.
	healAt := time.Now()
	west.startGateway(addr)
	waitTiers(t, fe)
	backAt := time.Now()
	var firstWest time.Time
	waitUntil(t, 15*time.Second, "west answers again after its gateway restarted", func() bool {
		for _, a := range l.since(healAt) {
			if a.cluster == "west" {
				firstWest = a.at
				return true
			}
		}
		return false
	})
	// South's share per 500ms window from west's return to the snapshot,
	// over 6s: west ramps up over the 2s slow start.
	const window, windows = 500 * time.Millisecond, 12
	waitUntil(t, 30*time.Second, "the return to west observed for 6s", func() bool { return time.Since(backAt) > windows*window+500*time.Millisecond })
	south, total := windowCounts(l.since(backAt), backAt, window, windows, "south")
	var b strings.Builder
	for i := range windows {
		f := math.NaN()
		if total[i] > 0 {
			f = float64(south[i]) / float64(total[i])
		}
		fmt.Fprintf(&b, " %.1fs:%.2f(n=%d)", float64(i+1)*window.Seconds(), f, total[i])
	}
	t.Logf("heal: west's endpoint healthy in tier 1 in the frontend's snapshot %s after its gateway restarted; first west answer %s after; south's share per 500ms window from then (slow start 2s):%s",
		backAt.Sub(healAt).Round(time.Millisecond), firstWest.Sub(healAt).Round(time.Millisecond), b.String())
	for i := 6; i < windows; i++ { // from 3s: past the 2s slow start
		if total[i] >= 10 && float64(south[i]) > 0.02*float64(total[i]) {
			t.Errorf("south's share %d/%d at %.1fs after west came back, past the 2s slow start; want ~0", south[i], total[i], float64(i+1)*window.Seconds())
		}
	}
	if by, failed := l.measure(t, 200); by["west"] < 198 || failed != 0 {
		t.Errorf("west healed: answers %v, %d failed; want all (at least 198 of 200) from west", by, failed)
	}

	counts := l.report(t, fe.registry, began)
	if counts["east"] > 0 {
		t.Errorf("east answered %d requests; it runs no backend", counts["east"])
	}
}
