package main

// Steady load through a dev cluster's sidecars and what it measured,
// killing a service's instances, and following an automatic rotation:
// shared by `strait demo` and the failover and rotation tests.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// loadTarget is one URL the load calls: a sidecar's local listener for an
// upstream, on loopback.
type loadTarget struct {
	name, url string
}

// loadOptions bound the load: it stops by itself after limit or after
// perClient requests per client, whichever comes first.
type loadOptions struct {
	clients   int           // per target
	pause     time.Duration // between one client's requests
	limit     time.Duration
	perClient int
}

// loadAnswer is one request answered 200 by the echo app of cluster.
type loadAnswer struct {
	at              time.Time
	target, cluster string
}

// loadFailure is one request that failed (transport error or non-200).
type loadFailure struct {
	at           time.Time
	target, what string
}

// load runs clients that each call their target in a loop, and records
// every outcome with its time.
type load struct {
	client *http.Client
	stop   chan struct{}
	once   sync.Once
	wg     sync.WaitGroup
	start  time.Time
	limit  time.Duration

	mu       sync.Mutex
	answers  []loadAnswer
	failures []loadFailure
	bounded  bool // a client stopped by itself: its bounds ran out
}

// loopbackURL refuses a URL whose host is not a loopback IP: the load
// only ever calls sidecars on this machine.
func loopbackURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return err
	}
	host, _, err := net.SplitHostPort(u.Host)
	if err != nil {
		return fmt.Errorf("load: %s: %w", raw, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("load: %s is not a loopback address", raw)
	}
	return nil
}

// startLoad starts o.clients clients per target. Stop it with stop.
func startLoad(targets []loadTarget, o loadOptions) (*load, error) {
	if o.clients < 1 || o.limit <= 0 || o.perClient < 1 {
		return nil, errors.New("load: clients, limit and perClient must be positive")
	}
	for _, t := range targets {
		if err := loopbackURL(t.url); err != nil {
			return nil, err
		}
	}
	l := &load{
		client: &http.Client{
			Timeout: 5 * time.Second,
			Transport: &http.Transport{
				Proxy:               nil, // loopback only, never through a proxy
				MaxIdleConnsPerHost: o.clients,
				IdleConnTimeout:     30 * time.Second,
			},
		},
		stop:  make(chan struct{}),
		start: time.Now(),
		limit: o.limit,
	}
	deadline := l.start.Add(o.limit)
	for _, t := range targets {
		for range o.clients {
			l.wg.Go(func() {
				for range o.perClient {
					select {
					case <-l.stop:
						return
					default:
					}
					if time.Now().After(deadline) {
						break
					}
					l.call(t)
					time.Sleep(o.pause)
				}
				l.mu.Lock()
				l.bounded = true
				l.mu.Unlock()
			})
		}
	}
	return l, nil
}

func (l *load) call(t loadTarget) {
	cluster, err := l.get(t.url)
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil {
		l.failures = append(l.failures, loadFailure{at: now, target: t.name, what: err.Error()})
		return
	}
	l.answers = append(l.answers, loadAnswer{at: now, target: t.name, cluster: cluster})
}

// get does one request and returns the cluster of the echo app that
// answered.
func (l *load) get(u string) (string, error) {
	resp, err := l.client.Get(u)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	var r echoReply
	if err := json.Unmarshal(body, &r); err != nil {
		return "", fmt.Errorf("HTTP 200 but not an echo reply: %w", err)
	}
	return r.Cluster, nil
}

// stopLoad stops the clients and waits for their last requests. It
// reports an error if a client had stopped by itself before (its bounds
// ran out), since what the load measured then ends early.
func (l *load) stopLoad() error {
	l.once.Do(func() { close(l.stop) })
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.bounded {
		return fmt.Errorf("load: a client reached its bound (%s or its request count) before the load was stopped; the measurement ended early", l.limit)
	}
	return nil
}

// loadCount is what a load measured in a window.
type loadCount struct {
	ok, failed int
	byCluster  map[string]int
	errs       []string // the first few failures
}

// count tallies outcomes of target ("" for all) from from to to (zero
// times: unbounded).
func (l *load) count(target string, from, to time.Time) loadCount {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := loadCount{byCluster: map[string]int{}}
	in := func(at time.Time, t string) bool {
		return (target == "" || t == target) && (from.IsZero() || !at.Before(from)) && (to.IsZero() || at.Before(to))
	}
	for _, a := range l.answers {
		if in(a.at, a.target) {
			c.ok++
			c.byCluster[a.cluster]++
		}
	}
	for _, f := range l.failures {
		if in(f.at, f.target) {
			c.failed++
			if len(c.errs) < 5 {
				c.errs = append(c.errs, f.target+": "+f.what)
			}
		}
	}
	return c
}

// first is the time of the first answer by cluster after after (zero if
// none).
func (l *load) first(cluster string, after time.Time) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, a := range l.answers {
		if a.cluster == cluster && a.at.After(after) {
			return a.at
		}
	}
	return time.Time{}
}

// last is the time of the last answer by cluster before before (zero if
// none).
func (l *load) last(cluster string, before time.Time) time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	var t time.Time
	for _, a := range l.answers {
		if a.cluster == cluster && a.at.Before(before) && a.at.After(t) {
			t = a.at
		}
	}
	return t
}

// share is the percentage of answers in [from, to) given by cluster, and
// how many answers there were.
func (l *load) share(cluster string, from, to time.Time) (pct float64, total int) {
	c := l.count("", from, to)
	if c.ok == 0 {
		return 0, 0
	}
	return 100 * float64(c.byCluster[cluster]) / float64(c.ok), c.ok
}

// pollUntil checks cond every 50ms until it holds, for at most timeout.
func pollUntil(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// killInstances SIGKILLs the sidecar and the app of every instance of
// service in cluster, as dev.json in dir records them; only processes
// that are still dev's own are signalled (a recycled pid never is).
func killInstances(dir, cluster, service string) ([]devWorkload, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	df, err := readDevFile(abs)
	if err != nil {
		return nil, err
	}
	var killed []devWorkload
	for _, c := range df.Clusters {
		if c.Name != cluster {
			continue
		}
		for _, w := range c.Workloads {
			if w.Service != service {
				continue
			}
			sidecar := ours(w.PID, abs) && syscall.Kill(w.PID, syscall.SIGKILL) == nil
			app := ours(w.AppPID, w.Instance) && syscall.Kill(w.AppPID, syscall.SIGKILL) == nil
			if sidecar || app {
				killed = append(killed, w)
			}
		}
	}
	if len(killed) == 0 {
		return nil, fmt.Errorf("no running instance of %s in %s", service, cluster)
	}
	return killed, nil
}

// upstreamHealthy is, per cluster, how many endpoints of upstream a
// sidecar's snapshot (its admin /config_dump) holds healthy; nil if the
// snapshot has no configuration for upstream yet.
func upstreamHealthy(admin, upstream string) (map[string]int, error) {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://" + admin + "/config_dump")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var dump struct {
		Snapshot struct {
			Services []struct {
				Name      string `json:"name"`
				Endpoints []struct {
					Cluster string `json:"cluster"`
					Health  string `json:"health"`
				} `json:"endpoints"`
			} `json:"services"`
		} `json:"snapshot"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&dump); err != nil {
		return nil, err
	}
	var healthy map[string]int // nil: no configuration for upstream yet
	for _, svc := range dump.Snapshot.Services {
		if svc.Name != upstream {
			continue
		}
		healthy = map[string]int{}
		for _, ep := range svc.Endpoints {
			if ep.Health == "HEALTH_HEALTHY" {
				healthy[ep.Cluster]++
			}
		}
	}
	return healthy, nil
}

// rotationStatus asks the control plane of context in config for
// RotationStatus over a new connection: during a rotation the admin
// credentials on disk are re-issued under the new root, and a connection
// opened under the old root stops authenticating once it is retired.
func rotationStatus(ctx context.Context, config, name string) (*controlplanev1.RotationStatusResponse, error) {
	c, err := loadClientConfig(config)
	if err != nil {
		return nil, err
	}
	for i := range c.Contexts {
		if c.Contexts[i].Name != name {
			continue
		}
		conn, err := dialContext(&c.Contexts[i])
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		return controlplanev1.NewRotationServiceClient(conn).RotationStatus(ctx, &controlplanev1.RotationStatusRequest{})
	}
	return nil, fmt.Errorf("context %q not found in %s", name, config)
}

// waitAutoRotation follows the automatic rotation on the root authority
// (context name in config) until it is done, for at most timeout; seen,
// if not nil, gets every status read.
func waitAutoRotation(ctx context.Context, config, name string, timeout time.Duration, seen func(*controlplanev1.RotationStatusResponse)) (*controlplanev1.RotationStatusResponse, error) {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for {
		st, err := rotationStatus(ctx, config, name)
		if err == nil && seen != nil {
			seen(st)
		}
		switch {
		case err != nil:
			lastErr = err
		case st.GetAuto().GetDone():
			return st, nil
		case !st.GetAuto().GetRunning():
			return st, fmt.Errorf("the automatic rotation stopped before it was done: %s", dash(st.GetAuto().GetLastError()))
		default:
			lastErr = fmt.Errorf("still running, next: %s", st.GetNext())
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return st, fmt.Errorf("the automatic rotation was not done after %s (%v)", timeout, lastErr)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// stepTiming is one rotation step: taken, then acknowledged by every node
// of every linked cluster.
type stepTiming struct {
	step string
	took time.Duration
}

// rotationTimings are the steps of a done automatic rotation and the
// total, from the first step taken to the last acknowledged.
func rotationTimings(a *controlplanev1.AutoRotation) ([]stepTiming, time.Duration, error) {
	var steps []stepTiming
	var first, last time.Time
	for _, s := range a.GetSteps() {
		if s.GetTaken() == nil || s.GetAcknowledged() == nil {
			return nil, 0, fmt.Errorf("step %s: taken %v, acknowledged %v", s.GetStep(), s.GetTaken() != nil, s.GetAcknowledged() != nil)
		}
		taken, acked := s.GetTaken().AsTime(), s.GetAcknowledged().AsTime()
		steps = append(steps, stepTiming{step: s.GetStep(), took: acked.Sub(taken)})
		if first.IsZero() || taken.Before(first) {
			first = taken
		}
		if acked.After(last) {
			last = acked
		}
	}
	if len(steps) == 0 {
		return nil, 0, errors.New("no step recorded")
	}
	return steps, last.Sub(first), nil
}
