package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestMain lets this test binary stand in for strait when `dev up` starts
// its children (control planes, echo apps) from os.Executable.
func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	os.Exit(m.Run())
}

var (
	proxyBinOnce sync.Once
	proxyBin     string
	proxyBinErr  error
)

// buildProxy builds the real strait-proxy binary once per test run.
func buildProxy(t *testing.T) string {
	t.Helper()
	proxyBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "strait-proxy-bin")
		if err != nil {
			proxyBinErr = err
			return
		}
		proxyBin = filepath.Join(dir, "strait-proxy")
		// As `make build` does: the lean, static sidecar.
		cmd := exec.Command("go", "build", "-tags", "grpcnotrace", "-trimpath", "-ldflags", "-s -w", "-o", proxyBin, "github.com/straitmesh/strait/cmd/strait-proxy")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		out, err := cmd.CombinedOutput()
		if err != nil {
			proxyBinErr = fmt.Errorf("go build strait-proxy: %v\n%s", err, out)
		}
	})
	if proxyBinErr != nil {
		t.Fatal(proxyBinErr)
	}
	return proxyBin
}

// The dev harness end to end, with real processes: up, a call through
// the mesh, the CLI against the running control plane, the control plane
// SIGKILLed with traffic flowing and restarted, down.
func TestDevUpDown(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	dir := t.TempDir()
	bin := buildProxy(t)
	t.Cleanup(func() { cli(t, "dev", "down", "--dir", dir) })
	out := mustCLI(t, "dev", "up", "--dir", dir, "--clusters", "east", "--proxy-bin", bin)
	if !strings.Contains(out, "ready:") {
		t.Errorf("dev up output lacks the ready line:\n%s", out)
	}
	df, err := readDevFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(df.Clusters) != 1 || len(df.Clusters[0].Workloads) != 3 {
		t.Fatalf("dev.json: got %+v, want one cluster with three workloads", df)
	}
	east := df.Clusters[0]
	fe := east.Workloads[0]
	for _, w := range east.Workloads {
		if w.PID == 0 || w.Inbound == "" || w.Admin == "" || w.WorkloadAPI == "" || w.SPIFFEID == "" {
			t.Errorf("dev.json workload %s incomplete: %+v", w.Instance, w)
		}
	}
	url := "http://" + fe.Upstreams["backend"] + "/"
	call := func() (echoReply, error) {
		resp, err := http.Get(url)
		if err != nil {
			return echoReply{}, err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			return echoReply{}, fmt.Errorf("status %d: %s", resp.StatusCode, body)
		}
		var r echoReply
		return r, json.Unmarshal(body, &r)
	}
	seen := map[string]bool{}
	deadline := time.Now().Add(15 * time.Second)
	for len(seen) < 2 && time.Now().Before(deadline) {
		r, err := call()
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if r.Caller != fe.SPIFFEID || r.Service != "backend" || r.Cluster != "east" {
			t.Fatalf("reply %+v: want backend in east seeing caller %s", r, fe.SPIFFEID)
		}
		seen[r.Instance] = true
	}
	if len(seen) != 2 {
		t.Errorf("backends that answered: %v, want both", seen)
	}

	cfg := filepath.Join(dir, "strait.config")
	status := mustCLI(t, "status", "--config", cfg, "--context", "east")
	for _, want := range []string{"cluster east", "frontend-0", "backend-0", "backend-1"} {
		if !strings.Contains(status, want) {
			t.Errorf("strait status lacks %q:\n%s", want, status)
		}
	}
	tok := mustCLI(t, "workload", "token", "--config", cfg, "--service", "payments")
	if !strings.HasPrefix(tok, "strt1_") {
		t.Errorf("workload token printed %q", tok)
	}
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: b}\nspec:\n  service: backend\n  retries: {attempts: 50}\n"), 0o644)
	code, _, errOut := cli(t, "apply", "--config", cfg, "-f", bad)
	if code == 0 || !strings.Contains(errOut, "spec.retries.attempts") {
		t.Errorf("apply of an out-of-range field: exit %d, stderr %q; want a failure naming spec.retries.attempts", code, errOut)
	}
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte("apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: backend}\nspec:\n  service: backend\n  retries: {attempts: 2}\n"), 0o644)
	if out := mustCLI(t, "apply", "--config", cfg, "-f", good); !strings.Contains(out, "created") {
		t.Errorf("apply: %q, want created", out)
	}

	// Kill the control plane with traffic flowing; the sidecars keep their
	// last snapshot and SVIDs; restart it on the same data directory.
	stopLoad := make(chan struct{})
	var failures, successes int
	var mu sync.Mutex
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 100000; i++ {
			select {
			case <-stopLoad:
				return
			default:
			}
			_, err := call()
			mu.Lock()
			if err != nil {
				failures++
			} else {
				successes++
			}
			mu.Unlock()
			time.Sleep(5 * time.Millisecond)
		}
	}()
	if err := syscall.Kill(east.ControlPlane.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	self, _ := os.Executable()
	restarted, err := startChild(self, []string{"controlplane", "run", "--dir", east.ControlPlane.DataDir, "--listen", east.ControlPlane.Address}, east.ControlPlane.Log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopPID(restarted.cmd.Process.Pid, "", 5*time.Second) })
	err = waitFor(t.Context(), restarted, "restarted control plane", 20*time.Second, func() error {
		out := &strings.Builder{}
		if code := run(t.Context(), []string{"get", "trafficpolicy", "--config", cfg}, out, io.Discard); code != 0 {
			return fmt.Errorf("exit %d", code)
		}
		if !strings.Contains(out.String(), "backend") {
			return fmt.Errorf("TrafficPolicy lost after restart: %s", out)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	close(stopLoad)
	wg.Wait()
	if failures != 0 || successes == 0 {
		t.Errorf("calls while the control plane was killed and restarted: %d ok, %d failed; want none failed", successes, failures)
	}

	down := mustCLI(t, "dev", "down", "--dir", dir)
	if !strings.Contains(down, "stopped") {
		t.Errorf("dev down: %q", down)
	}
	for _, w := range east.Workloads {
		waitForExit(t, w.PID)
	}
}

func waitForExit(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for alive(pid) {
		if time.Now().After(deadline) {
			t.Errorf("pid %d still running after dev down", pid)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}
