package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// failoverRun is what crashFailover measured.
type failoverRun struct {
	killed, lastLocal, firstRemote time.Time
	ok, failed                     int
	errs                           []string
}

// exportService applies a ServiceExport of service in cluster.
func exportService(t *testing.T, dir, config, cluster, service string) {
	t.Helper()
	export := filepath.Join(dir, service+"-export.yaml")
	doc := "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: " + service + ", namespace: default}\n"
	if err := os.WriteFile(export, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	mustCLI(t, "apply", "--config", config, "--context", cluster, "-f", export)
}

// waitHealthy waits until the sidecar behind admin holds at least want[c]
// healthy endpoints of upstream in each cluster c.
func waitHealthy(t *testing.T, admin, upstream string, want map[string]int) {
	t.Helper()
	var got map[string]int
	var err error
	ok := pollUntil(15*time.Second, func() bool {
		if got, err = upstreamHealthy(admin, upstream); err != nil {
			return false
		}
		for c, n := range want {
			if got[c] < n {
				return false
			}
		}
		return true
	})
	if !ok {
		t.Fatalf("%s: healthy endpoints of %s by cluster %v (%v), want at least %v", admin, upstream, got, err, want)
	}
}

// crashFailover starts east and west linked (west exports backend), puts
// steady load on east's frontend from 4 clients, kills east's backends
// (sidecars and apps, SIGKILL) and keeps the load on for 3 seconds.
func crashFailover(t *testing.T) failoverRun {
	dir := t.TempDir()
	bin := buildProxy(t)
	t.Cleanup(func() { cli(t, "dev", "down", "--dir", dir) })
	mustCLI(t, "dev", "up", "--dir", dir, "--clusters", "east,west", "--link", "--proxy-bin", bin)
	df, err := readDevFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	exportService(t, dir, df.Config, "west", "backend")
	fe := df.Clusters[0].Workloads[0]
	// The frontend's sidecar holds east's two backends and west's.
	waitHealthy(t, fe.Admin, "backend", map[string]int{"east": 2, "west": 1})

	l, err := startLoad([]loadTarget{{"backend", "http://" + fe.Upstreams["backend"] + "/"}},
		loadOptions{clients: 4, pause: 2 * time.Millisecond, limit: 30 * time.Second, perClient: 15000})
	if err != nil {
		t.Fatal(err)
	}
	defer l.stopLoad()
	time.Sleep(time.Second)
	if _, err := killInstances(dir, "east", "backend"); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	time.Sleep(3 * time.Second)
	if err := l.stopLoad(); err != nil {
		t.Fatal(err)
	}
	c := l.count("", time.Time{}, time.Time{})
	return failoverRun{
		killed: killed, lastLocal: l.last("east", time.Now()), firstRemote: l.first("west", time.Time{}),
		ok: c.ok, failed: c.failed, errs: c.errs,
	}
}

// TestCrashFailover: when east's backends crash under load, west (which
// exports backend) answers within a second and no client request fails,
// retries included.
func TestCrashFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	r := crashFailover(t)
	if r.firstRemote.IsZero() {
		t.Fatalf("west never answered after east's backends were killed (%d ok, %d failed: %v)", r.ok, r.failed, r.errs)
	}
	t.Logf("east's backends killed: first answer from west after %s; %d requests ok, %d failed %v", r.firstRemote.Sub(r.killed).Round(time.Millisecond), r.ok, r.failed, r.errs)
	if r.failed > 0 {
		t.Errorf("%d of %d requests failed during the failover: %v", r.failed, r.ok+r.failed, r.errs)
	}
	if d := r.firstRemote.Sub(r.killed); d > time.Second {
		t.Errorf("first answer from west %s after the kill, want within 1s", d)
	}
}

// TestReportFailover is make bench's failover figure: from the last answer
// by the local cluster to the first by a peer, and the failed requests.
func TestReportFailover(t *testing.T) {
	if os.Getenv("STRAIT_BENCH") != "1" {
		t.Skip("set STRAIT_BENCH=1 (make bench)")
	}
	r := crashFailover(t)
	gap := "never"
	if !r.firstRemote.IsZero() {
		gap = r.firstRemote.Sub(r.lastLocal).Round(100 * time.Microsecond).String()
	}
	t.Logf("report: failover (SIGKILL of east's 2 backends under 4 clients, dev harness processes on loopback): last east answer -> first west answer %s (from the kill: %s); %d requests ok, %d failed %v",
		gap, r.firstRemote.Sub(r.killed).Round(100*time.Microsecond), r.ok, r.failed, r.errs)
}

// TestReportRotation is make bench's rotation figure: how long each step
// of `strait ca rotate --auto` takes, from taken to acknowledged by every
// sidecar and gateway of three linked clusters, while east's frontend
// calls payments in west under steady load, and the failed requests.
func TestReportRotation(t *testing.T) {
	if os.Getenv("STRAIT_BENCH") != "1" {
		t.Skip("set STRAIT_BENCH=1 (make bench)")
	}
	dir := t.TempDir()
	bin := buildProxy(t)
	t.Cleanup(func() { cli(t, "dev", "down", "--dir", dir) })
	mustCLI(t, "dev", "up", "--dir", dir, "--clusters", "east,west,south", "--link", "--proxy-bin", bin)
	mustCLI(t, "dev", "run", "payments", "--dir", dir, "--cluster", "west", "--proxy-bin", bin)
	df, err := readDevFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	exportService(t, dir, df.Config, "west", "payments")
	fe := df.Clusters[0].Workloads[0]
	waitHealthy(t, fe.Admin, "payments", map[string]int{"west": 1})
	// Every cluster reported; prepare may be taken.
	if !pollUntil(30*time.Second, func() bool {
		st, err := rotationStatus(t.Context(), df.Config, "east")
		return err == nil && st.GetReady() && strings.HasPrefix(st.GetNext(), "prepare") && len(st.GetClusters()) == 3
	}) {
		t.Fatal("the root authority never said prepare may be taken with 3 clusters reporting")
	}

	l, err := startLoad([]loadTarget{{"payments", "http://" + fe.Upstreams["payments"] + "/"}},
		loadOptions{clients: 4, pause: 2 * time.Millisecond, limit: 2 * time.Minute, perClient: 60000})
	if err != nil {
		t.Fatal(err)
	}
	defer l.stopLoad()
	time.Sleep(time.Second)
	// --wait=false, then RotationStatus: the timings come from the
	// control plane's record of each step.
	rotate := []string{"ca", "rotate", "--auto", "--wait=false", "--config", df.Config, "--context", "east"}
	mustCLI(t, rotate...)
	st, err := waitAutoRotation(t.Context(), df.Config, "east", time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // traffic after the last step
	if err := l.stopLoad(); err != nil {
		t.Fatal(err)
	}
	steps, total, err := rotationTimings(st.GetAuto())
	if err != nil {
		t.Fatal(err)
	}
	var parts []string
	for _, s := range steps {
		parts = append(parts, fmt.Sprintf("%s %s", s.step, s.took.Round(time.Millisecond)))
	}
	c := l.count("", time.Time{}, time.Time{})
	t.Logf("report: rotation (`strait %s`, then RotationStatus until done; 3 linked clusters, dev harness processes on loopback, 4 clients on east's frontend -> payments in west): per step, taken -> acknowledged by every sidecar and gateway: %s; total %s; %d requests ok (%d answered by west), %d failed %v",
		strings.Join(rotate[:4], " ")+" --config DIR/strait.config --context east", strings.Join(parts, ", "), total.Round(time.Millisecond), c.ok, c.byCluster["west"], c.failed, c.errs)
}
