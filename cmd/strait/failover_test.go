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

// TestCrashFailover kills east's backends (sidecars and apps, SIGKILL)
// under steady load from east's frontend: west, which exports backend,
// answers, and no client request fails (retries included).
func TestCrashFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
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
	fe := df.Clusters[0].Workloads[0]
	url := "http://" + fe.Upstreams["backend"] + "/"
	// Wait until east's frontend knows west's endpoint too.
	deadline := time.Now().Add(15 * time.Second)
	for !strings.Contains(mustCLI(t, "explain", "backend", "--config", df.Config, "--context", "east"), "west") {
		if time.Now().After(deadline) {
			t.Fatal("east never saw west's backend")
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(time.Second) // the frontend's snapshot follows the control plane's view

	var mu sync.Mutex
	var ok, failed int
	var errs []string
	var firstWest time.Time
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
				code, r, err := getEcho(url)
				mu.Lock()
				switch {
				case err != nil || code != http.StatusOK:
					failed++
					if len(errs) < 5 {
						errs = append(errs, http.StatusText(code)+" "+errString(err))
					}
				default:
					ok++
					if r.Cluster == "west" && firstWest.IsZero() {
						firstWest = time.Now()
					}
				}
				mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		})
	}
	time.Sleep(time.Second)
	killed := time.Now()
	for _, w := range df.Clusters[0].Workloads {
		if w.Service == "backend" {
			syscall.Kill(w.PID, syscall.SIGKILL)
			syscall.Kill(w.AppPID, syscall.SIGKILL)
		}
	}
	time.Sleep(3 * time.Second)
	close(stop)
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if firstWest.IsZero() {
		t.Fatalf("west never answered after east's backends were killed (%d ok, %d failed: %v)", ok, failed, errs)
	}
	t.Logf("east's backends killed: first answer from west after %s; %d requests ok, %d failed %v", firstWest.Sub(killed).Round(time.Millisecond), ok, failed, errs)
	if failed > 0 {
		t.Errorf("%d of %d requests failed during the failover: %v", failed, ok+failed, errs)
	}
	if d := firstWest.Sub(killed); d > time.Second {
		t.Errorf("first answer from west %s after the kill, want within 1s", d)
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
