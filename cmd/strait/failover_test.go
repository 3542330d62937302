package main

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// failoverRun is what crashFailover measured.
type failoverRun struct {
	killed, lastLocal, firstRemote time.Time
	ok, failed                     int
	errs                           []string
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
	export := filepath.Join(dir, "export.yaml")
	os.WriteFile(export, []byte("apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: backend, namespace: default}\n"), 0o644)
	mustCLI(t, "apply", "--config", df.Config, "--context", "west", "-f", export)
	url := "http://" + df.Clusters[0].Workloads[0].Upstreams["backend"] + "/"
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(mustCLI(t, "explain", "backend", "--config", df.Config, "--context", "east"), "west") {
		if time.Now().After(deadline) {
			t.Fatal("east never saw west's backend")
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(time.Second) // the frontend's snapshot follows the control plane's view

	var mu sync.Mutex
	var r failoverRun
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for i := 0; i < 100000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				code, reply, err := getEcho(url)
				now := time.Now()
				mu.Lock()
				switch {
				case err != nil || code != http.StatusOK:
					r.failed++
					if len(r.errs) < 5 {
						r.errs = append(r.errs, http.StatusText(code)+" "+errString(err))
					}
				default:
					r.ok++
					if reply.Cluster == "east" && now.After(r.lastLocal) {
						r.lastLocal = now
					}
					if reply.Cluster == "west" && r.firstRemote.IsZero() {
						r.firstRemote = now
					}
				}
				mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		})
	}
	time.Sleep(time.Second)
	mu.Lock()
	r.killed = time.Now()
	mu.Unlock()
	for _, w := range df.Clusters[0].Workloads {
		if w.Service == "backend" {
			syscall.Kill(w.PID, syscall.SIGKILL)
			syscall.Kill(w.AppPID, syscall.SIGKILL)
		}
	}
	time.Sleep(3 * time.Second)
	close(stop)
	wg.Wait()
	return r
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

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
