package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/internal/wiring"
	"github.com/straitmesh/strait/proxy"
)

const (
	benchConns    = 16   // keep-alive connections (and workers) of the load generator
	benchBodySize = 1024 // request and response body, bytes
	benchRate     = 1000 // requests/s of the fixed-rate phase
	benchRounds   = 3    // interleaved rounds per phase
	clockTicks    = 100  // USER_HZ: /proc/PID/stat times are in 1/100 s on Linux
	mib           = 1 << 20

	aimP99Delta   = 500 * time.Microsecond
	aimRSSIdle    = 15_000_000       // the 15 MB (14.3 MiB)
	aimRSSAtRate  = 25_000_000       // 25 MB (23.8 MiB)
	benchMaxCount = 10_000_000       // requests per worker per closed-loop phase, a bound only
	benchLongIdle = 66 * time.Second // past the sidecar's 60 s pool idle timeout
)

// TestReportProxyBench compares four paths to one HTTP app, measured in
// the same run: a direct connection (the baseline), a Strait client and
// server sidecar pair (strait-proxy processes, mTLS with SVIDs), a pair
// of Debian nginx processes doing the same mTLS hop, and a pair of bare Go
// byte relays doing it too (a floor for a Go proxy, see runRelay). Requests are POSTs of
// 1 KiB answered with 1 KiB, over 16 keep-alive connections. It is a
// report, not a timing test: it fails only on functional errors (a request
// that is not a 200 with the app's body, a component that does not start).
//
// Phases, each path in turn, repeated in interleaved rounds so that the
// noise of a shared 2-core machine falls on every path alike:
//
//  1. start-up and a 1 KiB round trip through each path;
//  2. warm-up (1s closed loop: connections, TLS sessions, pools), settle,
//     idle RSS of each proxy;
//  3. open loop at a fixed 1000 requests/s: p50/p99 latency measured from
//     each request's scheduled send time (no coordinated omission), CPU and
//     peak RSS of each proxy (sampled every 200ms);
//  4. closed loop, 16 workers: maximum throughput (median of the rounds)
//     and CPU of each proxy;
//  5. 66 s without traffic, past the sidecar's 60 s connection-pool idle
//     timeout, then RSS again ("long idle"; STRAIT_BENCH_LONG_IDLE=0
//     skips it).
//
// Knobs: STRAIT_BENCH=1 runs it; STRAIT_BENCH_SECONDS (default 5, at most
// 60) is the length of each of phases 3 and 4 per path;
// STRAIT_BENCH_PROFILE=DIR runs the sidecars with --profiling and saves
// in DIR their heap and goroutine profiles and /proc smaps at the idle
// point, and CPU profiles of the last maximum-throughput round;
// STRAIT_BENCH_SIDECAR_FLAGS adds flags to both strait-proxy command lines
// (to compare settings: "--release-binary-pages=false");
// STRAIT_BENCH_NGINX_INSTALL=0 stops it from apt-get installing nginx-light
// when nginx is missing (it only tries as root).
func TestReportProxyBench(t *testing.T) {
	if os.Getenv("STRAIT_BENCH") != "1" {
		t.Skip("set STRAIT_BENCH=1 (make bench) to run the proxy benchmark")
	}
	d := benchSeconds(t)
	round := max(d/benchRounds, time.Second)
	tmp := t.TempDir()

	appAddr, appBody := startBenchApp(t)
	east := newCluster(t, "east", clusterOptions{})

	direct := &benchPath{name: "direct", url: "http://" + appAddr + "/"}
	strait := startStraitPair(t, east, appAddr, filepath.Join(tmp, "strait"))
	nginx := startNginxPair(t, east, appAddr, filepath.Join(tmp, "nginx"))
	relay := startRelayPair(t, east, appAddr, filepath.Join(tmp, "relay"))
	paths := []*benchPath{direct, strait, nginx, relay}

	// 0. RSS at start, then a wait for start-up to finish: a sidecar
	// releases its start-up pages after three quiet seconds, before the
	// traffic a sidecar usually meets once it is up.
	for _, p := range paths {
		if p.skip == "" && p.procs[0] != nil {
			p.rssStart = p.rss()
		}
	}
	time.Sleep(4 * time.Second)
	// 1. A round trip through each path, then 2. warm-up and idle RSS.
	for _, p := range paths {
		if p.skip != "" {
			continue
		}
		p.client = newBenchClient()
		defer p.client.CloseIdleConnections()
		if err := p.roundTrip(appBody); err != nil {
			t.Errorf("%s: round trip: %v", p.name, err)
			p.skip = "round trip failed: " + err.Error()
			continue
		}
		warm := closedLoop(p.client, p.url, appBody, time.Second)
		if warm.fail > 0 {
			t.Errorf("%s: warm-up: %d of %d requests failed, first: %s", p.name, warm.fail, warm.ok+warm.fail, warm.firstErr)
		}
	}
	runtime.GC()
	time.Sleep(5 * time.Second) // let the proxies settle after the burst (the sidecar returns memory after 3s idle)
	for _, p := range paths {
		if p.skip == "" && p.procs[0] != nil {
			p.rssIdle = p.rss()
			p.saveIdle(t)
		}
	}

	// 3. Fixed rate, all rounds first so that RSS at 1000 rps is not
	// inflated by the saturation phase.
	for range benchRounds {
		for _, p := range paths {
			if p.skip != "" {
				continue
			}
			runtime.GC()
			p.measure(&p.fixed, func() phaseStats { return openLoop(p.client, p.url, appBody, benchRate, round) })
		}
	}
	// 4. Maximum throughput.
	for i := range benchRounds {
		for _, p := range paths {
			if p.skip != "" {
				continue
			}
			runtime.GC()
			var profiled sync.WaitGroup
			if i == benchRounds-1 {
				p.profile(t, &profiled, round)
			}
			p.measure(&p.max, func() phaseStats { return closedLoop(p.client, p.url, appBody, round) })
			profiled.Wait()
		}
	}

	// 5. Idle again, past the connection pools' 60 s idle timeout: a
	// sidecar quiet that long gives its binary's pages back again (the
	// next request dials anyway).
	if os.Getenv("STRAIT_BENCH_LONG_IDLE") != "0" {
		t.Logf("waiting %s for the long-idle RSS sample (STRAIT_BENCH_LONG_IDLE=0 skips it)", benchLongIdle)
		time.Sleep(benchLongIdle)
		for _, p := range paths {
			if p.skip == "" && p.procs[0] != nil {
				p.rssQuiet = p.rss()
			}
		}
		// The first request after it: the proxies dial and handshake again
		// (and the sidecar faults the pages it uses back in).
		for _, p := range paths {
			if p.skip != "" {
				continue
			}
			start := time.Now()
			if err := p.roundTrip(appBody); err != nil {
				t.Errorf("%s: first request after the long idle: %v", p.name, err)
				continue
			}
			p.firstAfterQuiet = time.Since(start)
		}
	}

	reportProxyBench(t, d, paths)
	for _, p := range paths {
		for _, ph := range []*phase{&p.fixed, &p.max} {
			if ph.fail > 0 {
				t.Errorf("%s: %d of %d requests failed, first: %s", p.name, ph.fail, ph.ok+ph.fail, ph.firstErr)
			}
		}
	}
}

func benchSeconds(t *testing.T) time.Duration {
	s := os.Getenv("STRAIT_BENCH_SECONDS")
	if s == "" {
		return 5 * time.Second
	}
	n, err := strconv.ParseFloat(s, 64)
	if err != nil || n < 1 || n > 60 {
		t.Fatalf("STRAIT_BENCH_SECONDS: got %q, want a number of seconds from 1 to 60", s)
	}
	return time.Duration(n * float64(time.Second))
}

// startBenchApp serves POST 1 KiB -> 200 with a fixed 1 KiB body.
func startBenchApp(t *testing.T) (addr string, body []byte) {
	t.Helper()
	body = bytes.Repeat([]byte("strait bench 16b"), benchBodySize/16)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	length := strconv.Itoa(len(body))
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var buf [benchBodySize + 1]byte
		n, _ := io.ReadFull(r.Body, buf[:])
		if r.Method != http.MethodPost || n != benchBodySize {
			http.Error(w, fmt.Sprintf("want POST with %d bytes, got %s with %d", benchBodySize, r.Method, n), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", length)
		w.Write(body)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String(), body
}

// benchPath is one way to reach the app, and what was measured on it.
type benchPath struct {
	name   string
	url    string
	procs  [2]*benchProc // client-side and server-side proxy; nil for direct
	admins [2]string     // admin addresses of the strait sidecars (for profiles)
	skip   string        // why the path is not measured
	note   string
	client *http.Client

	rssStart, rssIdle [2]rssSample
	rssQuiet          [2]rssSample  // after the long idle (phase 5); zero if skipped
	firstAfterQuiet   time.Duration // the first request after it
	fixed, max        phase
}

// profile saves CPU profiles of the strait sidecars over the next d into
// the directory STRAIT_BENCH_PROFILE names (the sidecars run with
// --profiling then).
func (p *benchPath) profile(t *testing.T, wg *sync.WaitGroup, d time.Duration) {
	dir := os.Getenv("STRAIT_BENCH_PROFILE")
	if dir == "" || p.admins[0] == "" {
		return
	}
	for i, side := range []string{"client", "server"} {
		wg.Go(func() {
			if err := saveCPUProfile(p.admins[i], d, filepath.Join(dir, side+".pprof")); err != nil {
				t.Logf("profile %s: %v", side, err)
			}
		})
	}
}

// saveIdle saves each strait sidecar's heap and goroutine profiles, its
// metrics (with the Go runtime's memory statistics) and its /proc smaps at the idle point into the directory
// STRAIT_BENCH_PROFILE names, to see what the idle RSS is made of.
func (p *benchPath) saveIdle(t *testing.T) {
	dir := os.Getenv("STRAIT_BENCH_PROFILE")
	if dir == "" || p.admins[0] == "" {
		return
	}
	for i, side := range []string{"client", "server"} {
		for _, prof := range []string{"heap", "goroutine"} {
			if err := saveURL(fmt.Sprintf("http://%s/debug/pprof/%s", p.admins[i], prof), filepath.Join(dir, side+"-idle-"+prof+".pprof")); err != nil {
				t.Logf("idle %s profile of the %s sidecar: %v", prof, side, err)
			}
		}
		if err := saveURL(fmt.Sprintf("http://%s/metrics", p.admins[i]), filepath.Join(dir, side+"-idle-metrics.txt")); err != nil {
			t.Logf("idle metrics of the %s sidecar: %v", side, err)
		}
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", p.procs[i].cmd.Process.Pid)); err == nil {
			_ = os.WriteFile(filepath.Join(dir, side+"-idle-smaps.txt"), b, 0o644)
		}
	}
}

// saveCPUProfile takes a CPU profile of the process serving pprof on admin
// over the next d (at least a second) and writes it to path.
func saveCPUProfile(admin string, d time.Duration, path string) error {
	return saveURL(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", admin, max(int(d/time.Second), 1)), path)
}

// saveURL writes the body of a successful GET of url to path.
func saveURL(url, path string) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", resp.Status, b)
	}
	return os.WriteFile(path, b, 0o644)
}

// phase accumulates the rounds of one phase on one path.
type phase struct {
	ok, fail int
	firstErr string
	wall     time.Duration
	lat, lag []time.Duration // open loop only
	rps      []float64       // per round
	ticks    [2]int64        // CPU of each proxy
	user     [2]int64        // its user-mode part
	sysc     [2]int64        // read and write system calls of each proxy
	csw      [2]int64        // context switches of each proxy
	rssPeak  [2]rssSample
}

func (p *benchPath) measure(ph *phase, run func() phaseStats) {
	var t0, u0, s0, c0 [2]int64
	for i, pr := range p.procs {
		if pr != nil {
			t0[i], u0[i], s0[i], c0[i] = pr.ticks(), pr.userTicks(), pr.syscalls(), pr.contextSwitches()
		}
	}
	stop := p.sampleRSS()
	st := run()
	peak := stop()
	for i, pr := range p.procs {
		if pr != nil {
			ph.ticks[i] += pr.ticks() - t0[i]
			ph.user[i] += pr.userTicks() - u0[i]
			ph.sysc[i] += pr.syscalls() - s0[i]
			ph.csw[i] += pr.contextSwitches() - c0[i]
			ph.rssPeak[i] = ph.rssPeak[i].max(peak[i])
		}
	}
	ph.ok += st.ok
	ph.fail += st.fail
	if ph.firstErr == "" {
		ph.firstErr = st.firstErr
	}
	ph.wall += st.wall
	ph.lat = append(ph.lat, st.lat...)
	ph.lag = append(ph.lag, st.lag...)
	ph.rps = append(ph.rps, float64(st.ok)/st.wall.Seconds())
}

// cores is the CPU time of proxy i per second of the phase.
func (ph *phase) cores(i int) float64 {
	if ph.wall <= 0 {
		return 0
	}
	return float64(ph.ticks[i]) / clockTicks / ph.wall.Seconds()
}

func (p *benchPath) rss() [2]rssSample {
	var r [2]rssSample
	for i, pr := range p.procs {
		if pr != nil {
			r[i] = pr.rss()
		}
	}
	return r
}

// sampleRSS records the peak RSS of the path's proxies every 200ms until
// the returned function is called.
func (p *benchPath) sampleRSS() func() [2]rssSample {
	if p.procs[0] == nil {
		return func() [2]rssSample { return [2]rssSample{} }
	}
	var (
		mu   sync.Mutex
		peak = p.rss()
		done = make(chan struct{})
		wg   sync.WaitGroup
	)
	take := func() {
		r := p.rss()
		mu.Lock()
		for i := range peak {
			peak[i] = peak[i].max(r[i])
		}
		mu.Unlock()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				take()
			}
		}
	}()
	return func() [2]rssSample {
		close(done)
		wg.Wait()
		take()
		return peak
	}
}

// roundTrip checks that one request through the path gets the app's body.
func (p *benchPath) roundTrip(want []byte) error {
	buf := make([]byte, benchBodySize+1)
	return benchRequest(p.client, p.url, want, buf)
}

func newBenchClient() *http.Client {
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			MaxConnsPerHost:     benchConns,
			MaxIdleConnsPerHost: benchConns,
			MaxIdleConns:        benchConns,
			IdleConnTimeout:     5 * time.Minute,
			DisableCompression:  true,
		},
	}
}

// benchRequest POSTs body to url and checks that the answer is a 200
// carrying exactly body (the app echoes nothing, it answers its own body,
// which is the same bytes). buf is the caller's scratch space.
func benchRequest(client *http.Client, url string, body, buf []byte) error {
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	// Replayable: a request that meets a keep-alive connection closed by
	// the peer is retried by the transport instead of counted as an error.
	// A nil value marks it without sending the header.
	req.Header["Idempotency-Key"] = nil
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	n, err := io.ReadFull(resp.Body, buf[:benchBodySize+1])
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read response: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d: %q", resp.StatusCode, buf[:min(n, 200)])
	}
	if !bytes.Equal(buf[:n], body) {
		return fmt.Errorf("response body: got %d bytes %q..., want the app's %d bytes", n, buf[:min(n, 32)], len(body))
	}
	return nil
}

type phaseStats struct {
	ok, fail int
	firstErr string
	wall     time.Duration
	lat, lag []time.Duration
}

func (s *phaseStats) failed(err error) {
	s.fail++
	if s.firstErr == "" {
		s.firstErr = err.Error()
	}
}

func (s *phaseStats) merge(o phaseStats) {
	s.ok += o.ok
	if o.fail > 0 && s.firstErr == "" {
		s.firstErr = o.firstErr
	}
	s.fail += o.fail
	s.lat = append(s.lat, o.lat...)
	s.lag = append(s.lag, o.lag...)
}

// closedLoop runs benchConns workers back to back for d.
func closedLoop(client *http.Client, url string, body []byte, d time.Duration) phaseStats {
	start := time.Now()
	deadline := start.Add(d)
	var (
		mu  sync.Mutex
		all phaseStats
		wg  sync.WaitGroup
	)
	for range benchConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var s phaseStats
			buf := make([]byte, benchBodySize+1)
			for i := 0; i < benchMaxCount && time.Now().Before(deadline); i++ {
				if err := benchRequest(client, url, body, buf); err != nil {
					s.failed(err)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				s.ok++
			}
			mu.Lock()
			all.merge(s)
			mu.Unlock()
		}()
	}
	wg.Wait()
	all.wall = time.Since(start)
	return all
}

// openLoop sends rate requests/s for d on a fixed schedule, whatever the
// answers' pace: a request waits for a free connection (of benchConns) if
// it must, and its latency runs from its scheduled time, so a stall is
// charged to every request it delays. lag is how late the generator itself
// released each request (timer slack), for the record.
func openLoop(client *http.Client, url string, body []byte, rate int, d time.Duration) phaseStats {
	n := int(d.Seconds() * float64(rate))
	interval := time.Second / time.Duration(rate)
	type job struct{ due, released time.Time }
	jobs := make(chan job, n)
	start := time.Now().Add(5 * time.Millisecond)
	giveUp := start.Add(d + 10*time.Second)
	go func() {
		defer close(jobs)
		for i := 0; i < n; {
			now := time.Now()
			for ; i < n; i++ {
				due := start.Add(time.Duration(i) * interval)
				if due.After(now) {
					break
				}
				jobs <- job{due: due, released: now}
			}
			if i < n {
				sleepUntil(start.Add(time.Duration(i) * interval))
			}
		}
	}()
	var (
		mu  sync.Mutex
		all phaseStats
		wg  sync.WaitGroup
	)
	for range benchConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := phaseStats{lat: make([]time.Duration, 0, n/benchConns*2), lag: make([]time.Duration, 0, n/benchConns*2)}
			buf := make([]byte, benchBodySize+1)
			for j := range jobs {
				if time.Now().After(giveUp) {
					s.failed(errors.New("not sent: the phase ran 10s over its time"))
					continue
				}
				err := benchRequest(client, url, body, buf)
				end := time.Now()
				if err != nil {
					s.failed(err)
					continue
				}
				s.ok++
				s.lat = append(s.lat, end.Sub(j.due))
				s.lag = append(s.lag, j.released.Sub(j.due))
			}
			mu.Lock()
			all.merge(s)
			mu.Unlock()
		}()
	}
	wg.Wait()
	all.wall = time.Since(start)
	return all
}

// sleepUntil sleeps in nanosleep(2) rather than time.Sleep: with nothing
// else to do the Go runtime waits for timers in epoll_wait, whose timeout
// is in whole milliseconds, and a 1000/s schedule would then run up to 1ms
// late (measured: p50 0.5ms). The kernel's high-resolution timer keeps the
// generator's own lag to tens of microseconds. EINTR (the runtime's
// preemption signal) just returns early; the caller checks the time again.
func sleepUntil(t time.Time) {
	if d := time.Until(t); d > 0 {
		ts := syscall.NsecToTimespec(d.Nanoseconds())
		syscall.Nanosleep(&ts, nil)
	}
}

func percentile(xs []time.Duration, p float64) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(math.Ceil(p*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// --- proxy processes ---

// benchProc is a proxy process started by the test. For nginx the master's
// children (the worker) are counted with it.
type benchProc struct {
	name     string
	cmd      *exec.Cmd
	done     chan struct{}
	log      string
	children bool
}

type rssSample struct {
	total  int64 // bytes, the process and (nginx) its children
	worker int64 // bytes, the children only (nginx); the process otherwise
	anon   int64 // bytes of total that are anonymous (heap, stacks): no file pages
}

func (r rssSample) max(o rssSample) rssSample {
	return rssSample{total: max(r.total, o.total), worker: max(r.worker, o.worker), anon: max(r.anon, o.anon)}
}

func startProc(t *testing.T, name, logPath, bin string, children bool, args ...string) *benchProc {
	t.Helper()
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	if v := os.Getenv("STRAIT_BENCH_PROXY_ENV"); v != "" && !children {
		cmd.Env = append(os.Environ(), strings.Fields(v)...) // e.g. "GOMAXPROCS=2 GOGC=100" to compare runtime settings
	}
	// If the test binary dies, so do its proxies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &benchProc{name: name, cmd: cmd, done: make(chan struct{}), log: logPath, children: children}
	go func() {
		cmd.Wait()
		f.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("--- %s log (%s), tail:\n%s", name, logPath, tail(logPath, 3000))
		}
	})
	return p
}

func (p *benchProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop asks the process to stop (SIGTERM), then kills it (and, for nginx,
// its workers) after 5s.
func (p *benchProc) stop() {
	if p.exited() {
		return
	}
	kids := p.childPIDs()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(5 * time.Second):
	}
	p.cmd.Process.Kill()
	for _, pid := range kids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
	}
}

func (p *benchProc) childPIDs() []int {
	if !p.children {
		return nil
	}
	return childPIDs(p.cmd.Process.Pid)
}

// sum adds f over the process and its children.
func (p *benchProc) sum(f func(pid int) int64) int64 {
	n := f(p.cmd.Process.Pid)
	for _, c := range p.childPIDs() {
		n += f(c)
	}
	return n
}

func (p *benchProc) ticks() int64 {
	return p.sum(func(pid int) int64 { u, s, _ := procTicks(pid); return u + s })
}

// userTicks is the user-mode part of ticks.
func (p *benchProc) userTicks() int64 {
	return p.sum(func(pid int) int64 { u, _, _ := procTicks(pid); return u })
}

// syscalls is the read and write system calls (syscr + syscw of
// /proc/PID/io) of the process and its children so far.
func (p *benchProc) syscalls() int64 {
	return p.sum(func(pid int) int64 { return procFields("/proc/"+strconv.Itoa(pid)+"/io", "syscr", "syscw") })
}

// contextSwitches is the voluntary and involuntary context switches of
// every thread of the process and its children so far.
func (p *benchProc) contextSwitches() int64 {
	return p.sum(func(pid int) int64 {
		dir := "/proc/" + strconv.Itoa(pid) + "/task"
		tasks, _ := os.ReadDir(dir)
		var n int64
		for _, task := range tasks {
			n += procFields(filepath.Join(dir, task.Name(), "status"), "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
		}
		return n
	})
}

// procFields adds the values of the "key: value" lines of a /proc file
// named by keys (0 if the file is gone).
func procFields(path string, keys ...string) int64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	var n int64
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		if slices.Contains(keys, k) {
			c, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			n += c
		}
	}
	return n
}

func (p *benchProc) rss() rssSample {
	own, anon := procRSS(p.cmd.Process.Pid)
	if !p.children {
		return rssSample{total: own, worker: own, anon: anon}
	}
	var kids int64
	for _, c := range p.childPIDs() {
		k, a := procRSS(c)
		kids += k
		anon += a
	}
	return rssSample{total: own + kids, worker: kids, anon: anon}
}

// procStat returns the fields of /proc/PID/stat after the command name:
// [0] is field 3 (state), [1] ppid, [11] utime, [12] stime.
func procStat(pid int) ([]string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 > len(s) {
		return nil, fmt.Errorf("parse /proc/%d/stat: %q", pid, s)
	}
	f := strings.Fields(s[i+2:])
	if len(f) < 13 {
		return nil, fmt.Errorf("parse /proc/%d/stat: %q", pid, s)
	}
	return f, nil
}

// procTicks is the user and system CPU time of a process in clock ticks.
func procTicks(pid int) (user, sys int64, err error) {
	f, err := procStat(pid)
	if err != nil {
		return 0, 0, err
	}
	user, _ = strconv.ParseInt(f[11], 10, 64)
	sys, _ = strconv.ParseInt(f[12], 10, 64)
	return user, sys, nil
}

// procRSS is VmRSS and its anonymous part, RssAnon, in bytes (0 if the
// process is gone). The rest is file pages (the binary, shared libraries)
// and shared memory.
func procRSS(pid int) (rss, anon int64) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, 0
	}
	kb := func(v string) int64 {
		n, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
		return n * 1024
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			rss = kb(v)
		} else if v, ok := strings.CutPrefix(line, "RssAnon:"); ok {
			anon = kb(v)
		}
	}
	return rss, anon
}

func childPIDs(ppid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	want := strconv.Itoa(ppid)
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if f, err := procStat(pid); err == nil && f[1] == want {
			out = append(out, pid)
		}
	}
	return out
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// waitFor polls cond every 50ms until it holds, the process exits or 15s
// pass.
func waitFor(p *benchProc, what string, cond func() bool) error {
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if p != nil && p.exited() {
			return fmt.Errorf("%s exited while waiting for %s: %s", p.name, what, tail(p.log, 2000))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after 15s waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// --- the Strait pair ---

func startStraitPair(t *testing.T, c *cluster, app, dir string) *benchPath {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	bin := buildProxy(t, dir)
	server, saddrs := startSidecar(t, c, bin, dir, "backend-0", "backend", app, nil)
	client, addrs := startSidecar(t, c, bin, dir, "frontend-0", "frontend", app, []string{"backend"})
	p := &benchPath{name: "strait pair", url: "http://" + addrs.Upstreams["backend"] + "/", procs: [2]*benchProc{client, server}, admins: [2]string{addrs.Admin, saddrs.Admin}}
	// Ready means an SVID and a snapshot; the backend's endpoint may come
	// a moment later.
	hc := &http.Client{Timeout: 2 * time.Second}
	body := bytes.Repeat([]byte("x"), benchBodySize)
	if err := waitFor(client, "a 200 through the strait pair", func() bool {
		resp, err := hc.Post(p.url, "application/octet-stream", bytes.NewReader(body))
		if err != nil {
			return false
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}); err != nil {
		t.Fatalf("strait pair: %v", err)
	}
	hc.CloseIdleConnections()
	return p
}

func buildProxy(t *testing.T, dir string) string {
	t.Helper()
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil || strings.TrimSpace(string(gomod)) == "" || strings.TrimSpace(string(gomod)) == os.DevNull {
		t.Fatalf("find the module root: go env GOMOD: %q, %v", gomod, err)
	}
	bin := filepath.Join(dir, "strait-proxy")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// Built as `make build` builds it: static, stripped, no x/net/trace.
	cmd := exec.CommandContext(ctx, "go", "build", "-tags", "grpcnotrace", "-trimpath", "-ldflags", "-s -w", "-o", bin, "./cmd/strait-proxy")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(gomod)))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build strait-proxy: %v\n%s", err, out)
	}
	return bin
}

func startSidecar(t *testing.T, c *cluster, bin, dir, instance, service, app string, upstreams []string) (*benchProc, proxy.Addrs) {
	t.Helper()
	addrFile := filepath.Join(dir, instance+".addrs.json")
	args := []string{
		"--trust-domain", trustDomain, "--control-plane", c.addr, "--trust-bundle", c.dir.BundlePEMPath(),
		"--token", c.token(service), "--instance", instance, "--service", service, "--namespace", "default",
		"--inbound", "127.0.0.1:0", "--app", app, "--admin", "127.0.0.1:0", "--addresses-file", addrFile,
		"--log-level", "warn",
	}
	for _, u := range upstreams {
		args = append(args, "--upstream", u+"=127.0.0.1:0")
	}
	if os.Getenv("STRAIT_BENCH_PROFILE") != "" {
		args = append(args, "--profiling")
	}
	args = append(args, strings.Fields(os.Getenv("STRAIT_BENCH_SIDECAR_FLAGS"))...)
	p := startProc(t, instance, filepath.Join(dir, instance+".log"), bin, false, args...)
	var addrs proxy.Addrs
	if err := waitFor(p, instance+" addresses file", func() bool {
		b, err := os.ReadFile(addrFile)
		return err == nil && json.Unmarshal(b, &addrs) == nil && addrs.Admin != ""
	}); err != nil {
		t.Fatalf("sidecar %s: %v", instance, err)
	}
	hc := &http.Client{Timeout: time.Second}
	if err := waitFor(p, instance+" /ready", func() bool {
		resp, err := hc.Get("http://" + addrs.Admin + "/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}); err != nil {
		t.Fatalf("sidecar %s: %v", instance, err)
	}
	hc.CloseIdleConnections()
	return p, addrs
}

// --- the nginx pair ---

// startNginxPair runs a client nginx (plain HTTP in, mTLS out with a
// frontend SVID) and a server nginx (mTLS in, requiring a client
// certificate from the mesh CA, plain HTTP to the app), one worker each.
// The client side does not verify the server: nginx checks the server's
// name whenever it verifies (proxy_ssl_verify), and SVIDs carry only a
// SPIFFE URI, no DNS name or common name to match.
func startNginxPair(t *testing.T, c *cluster, app, dir string) *benchPath {
	t.Helper()
	p := &benchPath{name: "nginx pair"}
	bin, why := findNginx()
	if bin == "" {
		p.skip = why
		return p
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	pems := writeBenchSVIDs(t, c, dir)
	bundle := c.dir.BundlePEMPath()
	cport, sport := freePort(t), freePort(t)

	server := startNginx(t, bin, filepath.Join(dir, "server"), sport, fmt.Sprintf(`
	upstream bench_app {
		server %s;
		keepalive 64;
		keepalive_requests 1000000;
		keepalive_timeout 300s;
	}
	server {
		listen 127.0.0.1:%d ssl;
		ssl_protocols TLSv1.3;
		ssl_certificate %s;
		ssl_certificate_key %s;
		ssl_client_certificate %s;
		ssl_verify_client on;
		ssl_verify_depth 3;
		keepalive_requests 1000000;
		keepalive_timeout 300s;
		location / {
			proxy_pass http://bench_app;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
		}
	}`, app, sport, pems["backend"][0], pems["backend"][1], bundle))
	client := startNginx(t, bin, filepath.Join(dir, "client"), cport, fmt.Sprintf(`
	upstream bench_server {
		server 127.0.0.1:%d;
		keepalive 64;
		keepalive_requests 1000000;
		keepalive_timeout 300s;
	}
	server {
		listen 127.0.0.1:%d;
		keepalive_requests 1000000;
		keepalive_timeout 300s;
		location / {
			proxy_pass https://bench_server;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_ssl_protocols TLSv1.3;
			proxy_ssl_certificate %s;
			proxy_ssl_certificate_key %s;
			proxy_ssl_trusted_certificate %s;
			proxy_ssl_verify off; # nginx would also check a DNS name; SVIDs have none
			proxy_ssl_session_reuse on;
		}
	}`, sport, cport, pems["frontend"][0], pems["frontend"][1], bundle))
	if server == nil || client == nil {
		p.skip = "nginx did not start (see errors above)"
		return p
	}
	p.url = fmt.Sprintf("http://127.0.0.1:%d/", cport)
	p.procs = [2]*benchProc{client, server}
	p.note = "nginx client side: proxy_ssl_verify off (its verification requires a DNS name/CN match, SVIDs carry only a URI SAN); server side verifies the client chain against the bundle"
	return p
}

// writeBenchSVIDs mints frontend and backend SVIDs of c into PEM files in
// dir and returns their certificate and key paths by service account.
func writeBenchSVIDs(t *testing.T, c *cluster, dir string) map[string][2]string {
	t.Helper()
	iss, err := wiring.NewIssuer(c.dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	pems := map[string][2]string{}
	for _, sa := range []string{"frontend", "backend"} {
		id, err := identity.Workload(c.td, "default", sa)
		if err != nil {
			t.Fatal(err)
		}
		sv, err := iss.MintSVID(id, time.Hour)
		if err != nil {
			t.Fatalf("mint %s: %v", id, err)
		}
		certs, key, err := sv.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		cert, keyPath := filepath.Join(dir, sa+".pem"), filepath.Join(dir, sa+".key")
		if err := os.WriteFile(cert, certs, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(keyPath, key, 0o600); err != nil {
			t.Fatal(err)
		}
		pems[sa] = [2]string{cert, keyPath}
	}
	return pems
}

// findNginx finds nginx, installing Debian's nginx-light as root if it is
// missing, or says why there is none.
func findNginx() (string, string) {
	look := func() string {
		if p, err := exec.LookPath("nginx"); err == nil {
			return p
		}
		for _, p := range []string{"/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"} {
			if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
				return p
			}
		}
		return ""
	}
	if p := look(); p != "" {
		return p, ""
	}
	switch {
	case os.Getenv("STRAIT_BENCH_NGINX_INSTALL") == "0":
		return "", "nginx not installed (STRAIT_BENCH_NGINX_INSTALL=0)"
	case os.Geteuid() != 0:
		return "", "nginx not installed, and not root to apt-get install nginx-light"
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return "", "nginx not installed, and no apt-get"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for _, args := range [][]string{{"update", "-qq"}, {"install", "-y", "-qq", "nginx-light"}} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			msg := strings.TrimSpace(string(out))
			if len(msg) > 300 {
				msg = "..." + msg[len(msg)-300:]
			}
			return "", fmt.Sprintf("nginx not installed; apt-get %s: %v: %s", args[0], err, msg)
		}
	}
	if p := look(); p != "" {
		return p, ""
	}
	return "", "nginx not found after apt-get install nginx-light"
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startNginx runs one nginx (master and one worker) with httpBlock as its http
// block, and waits until it accepts connections on port. It reports a
// failure and returns nil if nginx does not start.
func startNginx(t *testing.T, bin, prefix string, port int, httpBlock string) *benchProc {
	t.Helper()
	if err := os.MkdirAll(prefix, 0o700); err != nil {
		t.Fatal(err)
	}
	user := ""
	if os.Geteuid() == 0 {
		user = "user root;" // the worker reads nothing after start, but temp dirs are under a 0700 test dir
	}
	conf := fmt.Sprintf(`# written by e2e TestReportProxyBench
daemon off;
master_process on;
worker_processes 1;
%s
pid %[2]s/nginx.pid;
error_log %[2]s/error.log warn;
events {
	worker_connections 1024;
}
http {
	access_log off;
	client_body_temp_path %[2]s/client_body;
	proxy_temp_path %[2]s/proxy;
%[3]s
}
`, user, prefix, httpBlock)
	confPath := filepath.Join(prefix, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	name := "nginx " + filepath.Base(prefix)
	p := startProc(t, name, filepath.Join(prefix, "stderr.log"), bin, true,
		"-p", prefix+"/", "-e", filepath.Join(prefix, "error.log"), "-c", confPath)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	err := waitFor(p, name+" listening on "+addr, func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false
		}
		c.Close()
		return len(p.childPIDs()) > 0
	})
	if err != nil {
		t.Errorf("%s: %v\nerror.log: %s", name, err, tail(filepath.Join(prefix, "error.log"), 2000))
		return nil
	}
	return p
}

// --- the report ---

func reportProxyBench(t *testing.T, d time.Duration, paths []*benchPath) {
	direct := paths[0]
	ms := func(x time.Duration) string { return fmt.Sprintf("%.3fms", float64(x)/float64(time.Millisecond)) }
	mb := func(b int64) string { return fmt.Sprintf("%.1f", float64(b)/mib) }
	pair := func(a, b string) string { return a + "/" + b }
	directRPS := median(direct.max.rps)
	directP99 := percentile(direct.fixed.lat, 0.99)

	t.Logf("report: proxy bench: POST %d B -> %d B over %d keep-alive connections; %d rounds x %s per phase per path (STRAIT_BENCH_SECONDS=%g); cpu in cores (%d on this machine: the load generator and app share them), RSS in MiB; c/s = client-side/server-side proxy",
		benchBodySize, benchBodySize, benchConns, benchRounds, max(d/benchRounds, time.Second).Round(time.Millisecond), d.Seconds(), runtime.NumCPU())
	t.Logf("report: %-12s %9s %6s %9s %9s %9s %11s %11s %11s %11s", "path", "max rps", "ratio", "p50@1000", "p99@1000", "Δp99", "cpu@max", "cpu@1000", "rss idle", "rss@1000")
	for _, p := range paths {
		if p.skip != "" {
			t.Logf("report: %-12s skipped: %s", p.name, p.skip)
			continue
		}
		rps := median(p.max.rps)
		ratio := 0.0
		if directRPS > 0 {
			ratio = rps / directRPS
		}
		p99 := percentile(p.fixed.lat, 0.99)
		cpuMax, cpuFixed, rssIdle, rssFixed := "-", "-", "-", "-"
		if p.procs[0] != nil {
			cpuMax = pair(fmt.Sprintf("%.2f", p.max.cores(0)), fmt.Sprintf("%.2f", p.max.cores(1)))
			cpuFixed = pair(fmt.Sprintf("%.2f", p.fixed.cores(0)), fmt.Sprintf("%.2f", p.fixed.cores(1)))
			rssIdle = pair(mb(p.rssIdle[0].total), mb(p.rssIdle[1].total))
			rssFixed = pair(mb(p.fixed.rssPeak[0].total), mb(p.fixed.rssPeak[1].total))
		}
		t.Logf("report: %-12s %9.0f %6.2f %9s %9s %9s %11s %11s %11s %11s", p.name, rps, ratio,
			ms(percentile(p.fixed.lat, 0.50)), ms(p99), fmt.Sprintf("%+.3fms", float64(p99-directP99)/float64(time.Millisecond)),
			cpuMax, cpuFixed, rssIdle, rssFixed)
	}
	for _, p := range paths {
		if p.skip != "" {
			continue
		}
		rounds := make([]string, len(p.max.rps))
		for i, r := range p.max.rps {
			rounds[i] = fmt.Sprintf("%.0f", r)
		}
		line := fmt.Sprintf("report:   %s: max rps per round %s; fixed phase achieved %.0f rps, p99.9 %s, generator lag p50/p99 %s/%s",
			p.name, strings.Join(rounds, " "), float64(p.fixed.ok)/p.fixed.wall.Seconds(),
			ms(percentile(p.fixed.lat, 0.999)), ms(percentile(p.fixed.lag, 0.5)), ms(percentile(p.fixed.lag, 0.99)))
		if p.procs[0] != nil {
			perReq := func(ph *phase, i int) string {
				if ph.ok == 0 {
					return "-"
				}
				return fmt.Sprintf("%.0f", float64(ph.ticks[i])/clockTicks*1e6/float64(ph.ok))
			}
			userShare := func(i int) string {
				if p.max.ticks[i] == 0 {
					return "-"
				}
				return fmt.Sprintf("%.0f%%", 100*float64(p.max.user[i])/float64(p.max.ticks[i]))
			}
			line += fmt.Sprintf("; cpu per request at max %s µs (user mode %s), at 1000 rps %s µs",
				pair(perReq(&p.max, 0), perReq(&p.max, 1)), pair(userShare(0), userShare(1)), pair(perReq(&p.fixed, 0), perReq(&p.fixed, 1)))
			perMaxReq := func(n [2]int64, i int) string {
				if p.max.ok == 0 {
					return "-"
				}
				return fmt.Sprintf("%.1f", float64(n[i])/float64(p.max.ok))
			}
			line += fmt.Sprintf("; per request at max: read+write syscalls %s, context switches %s",
				pair(perMaxReq(p.max.sysc, 0), perMaxReq(p.max.sysc, 1)), pair(perMaxReq(p.max.csw, 0), perMaxReq(p.max.csw, 1)))
			line += fmt.Sprintf("; rss at start %s, peak at max %s MiB; anonymous (private) part of rss idle %s, @1000 %s MiB",
				pair(mb(p.rssStart[0].total), mb(p.rssStart[1].total)), pair(mb(p.max.rssPeak[0].total), mb(p.max.rssPeak[1].total)),
				pair(mb(p.rssIdle[0].anon), mb(p.rssIdle[1].anon)), pair(mb(p.fixed.rssPeak[0].anon), mb(p.fixed.rssPeak[1].anon)))
			if p.rssQuiet[0].total > 0 {
				line += fmt.Sprintf("; rss long idle %s MiB (anonymous part %s)",
					pair(mb(p.rssQuiet[0].total), mb(p.rssQuiet[1].total)), pair(mb(p.rssQuiet[0].anon), mb(p.rssQuiet[1].anon)))
			}
			if p.procs[0].children {
				line += fmt.Sprintf("; worker-only rss idle %s, @1000 %s MiB",
					pair(mb(p.rssIdle[0].worker), mb(p.rssIdle[1].worker)), pair(mb(p.fixed.rssPeak[0].worker), mb(p.fixed.rssPeak[1].worker)))
			}
		}
		t.Log(line)
		if p.note != "" {
			t.Logf("report:   %s: %s", p.name, p.note)
		}
	}
	if direct.firstAfterQuiet > 0 {
		var firsts []string
		for _, p := range paths {
			if p.firstAfterQuiet > 0 {
				firsts = append(firsts, p.name+" "+ms(p.firstAfterQuiet))
			}
		}
		t.Logf("report:   first request after %s idle (proxies redial): %s", benchLongIdle, strings.Join(firsts, ", "))
	}
	t.Log("report:   syscalls and context switches: /proc/PID/io syscr+syscw and every thread's voluntary+involuntary switches; a Go read that finds nothing before it waits counts as a syscall")

	strait, nginx := paths[1], paths[2]
	if strait.skip != "" {
		return
	}
	sp99 := percentile(strait.fixed.lat, 0.99)
	delta := sp99 - directP99
	idle := [2]int64{strait.rssIdle[0].total, strait.rssIdle[1].total}
	atRate := [2]int64{strait.fixed.rssPeak[0].total, strait.fixed.rssPeak[1].total}
	nratio := "n/a (nginx skipped)"
	if nginx.skip == "" && median(nginx.max.rps) > 0 {
		nratio = fmt.Sprintf("%.2f", median(strait.max.rps)/median(nginx.max.rps))
	}
	rest := "-"
	if q := strait.rssQuiet; q[0].total > 0 {
		rest = pair(mb(q[0].total), mb(q[1].total))
	}
	t.Logf("report: strait/nginx throughput ratio: %s   strait p99 - direct p99: %+.3f ms   sidecar RSS at rest %s MiB (5 s after warm-up %s), at 1000 rps %s MiB",
		nratio, float64(delta)/float64(time.Millisecond), rest, pair(mb(idle[0]), mb(idle[1])), pair(mb(atRate[0]), mb(atRate[1])))
	met := func(ok bool) string {
		if ok {
			return "met"
		}
		return "NOT met"
	}
	if nginx.skip == "" {
		t.Logf("report: aim throughput above the nginx pair's: %s (%.0f vs %.0f rps)", met(median(strait.max.rps) > median(nginx.max.rps)), median(strait.max.rps), median(nginx.max.rps))
	} else {
		t.Logf("report: aim throughput above the nginx pair's: not measured (%s)", nginx.skip)
	}
	t.Logf("report: aim p99 at 1000 rps within 0.5 ms of direct: %s (%+.3f ms)", met(delta <= aimP99Delta), float64(delta)/float64(time.Millisecond))
	// Idle is judged at rest: once the sidecar's own idle housekeeping has
	// run (past the pools' idle timeout). Five seconds after a burst it is
	// still settling: reported beside it.
	if q := strait.rssQuiet; q[0].total > 0 {
		t.Logf("report: aim RSS idle under 15 MB (14.3 MiB) per sidecar, at rest (%s after traffic): %s (%s MiB); 5 s after the warm-up, still settling: %s MiB",
			benchLongIdle, met(max(q[0].total, q[1].total) < aimRSSIdle), pair(mb(q[0].total), mb(q[1].total)), pair(mb(idle[0]), mb(idle[1])))
	} else {
		t.Logf("report: aim RSS idle under 15 MB (14.3 MiB) per sidecar: judged at rest, not measured (STRAIT_BENCH_LONG_IDLE=0); 5 s after the warm-up, still settling: %s (%s MiB)",
			met(max(idle[0], idle[1]) < aimRSSIdle), pair(mb(idle[0]), mb(idle[1])))
	}
	t.Logf("report: aim RSS at 1000 rps under 25 MB (23.8 MiB) per sidecar: %s (%s MiB)", met(max(atRate[0], atRate[1]) < aimRSSAtRate), pair(mb(atRate[0]), mb(atRate[1])))
}
