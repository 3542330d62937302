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
	if gw := east.Gateway; gw == nil || gw.Peer == "" || gw.Entry == "" || gw.PID == 0 || gw.DataDir == "" {
		t.Errorf("dev.json: gateway %+v, want its addresses, pid and data dir", gw)
	}
	fe := east.Workloads[0]
	for _, w := range east.Workloads {
		if w.PID == 0 || w.Inbound == "" || w.Admin == "" || w.WorkloadAPI == "" || w.SPIFFEID == "" {
			t.Errorf("dev.json workload %s incomplete: %+v", w.Instance, w)
		}
	}
	// The sidecar started over with sysmon kept awake, under the pid
	// dev.json names (--keep-sysmon-awake, the default).
	if env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", fe.PID)); err == nil {
		godebug := ""
		for kv := range strings.SplitSeq(string(env), "\x00") {
			if v, ok := strings.CutPrefix(kv, "GODEBUG="); ok {
				godebug = v
				break
			}
		}
		if !strings.Contains(godebug, "schedtrace=") {
			t.Errorf("sidecar %s (pid %d) runs with GODEBUG=%q, want schedtrace set", fe.Instance, fe.PID, godebug)
		}
	}
	// Starting over through /proc/self/exe does not leave the processes
	// named "exe" in ps and top.
	pids := []int{fe.PID}
	if east.Gateway != nil {
		pids = append(pids, east.Gateway.PID)
	}
	for _, pid := range pids {
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		for _, task := range tasks {
			c, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/comm", pid, task.Name()))
			if err == nil && strings.TrimSpace(string(c)) == "exe" {
				t.Errorf("pid %d thread %s is named %q after starting over", pid, task.Name(), c)
			}
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

// fedStatus is what `strait federation status -o json` prints, in part.
type fedStatus struct {
	Cluster string `json:"cluster"`
	Pending bool   `json:"pending"`
	Links   []struct {
		Link struct {
			Peer string `json:"peer"`
		} `json:"link"`
		State           string `json:"state"`
		ControlStreamUp bool   `json:"controlStreamUp"`
	} `json:"links"`
}

func federationStatus(t *testing.T, cfg, cluster string) fedStatus {
	t.Helper()
	var st fedStatus
	out := mustCLI(t, "federation", "status", "-o", "json", "--config", cfg, "--context", cluster)
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("federation status -o json: %v\n%s", err, out)
	}
	return st
}

func linkConnected(st fedStatus, peer string) bool {
	for _, l := range st.Links {
		if l.Link.Peer == peer {
			return l.State == "connected" && l.ControlStreamUp
		}
	}
	return false
}

func getEcho(url string) (int, echoReply, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, echoReply{}, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var r echoReply
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, &r); err != nil {
			return resp.StatusCode, r, fmt.Errorf("%v: %s", err, body)
		}
	}
	return resp.StatusCode, r, nil
}

// Two clusters linked by dev up, a service run in west only, exported,
// and called from east's frontend through both gateways; then dev down
// stops every process.
func TestDevUpLinkedClusters(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	dir := t.TempDir()
	bin := buildProxy(t)
	t.Cleanup(func() { cli(t, "dev", "down", "--dir", dir) })
	out := mustCLI(t, "dev", "up", "--dir", dir, "--clusters", "east,west", "--link", "--proxy-bin", bin)
	for _, want := range []string{"root authority", "cluster west   linked with east", "link to west connected", "ready:"} {
		if !strings.Contains(out, want) {
			t.Errorf("dev up output lacks %q:\n%s", want, out)
		}
	}
	df, err := readDevFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(df.Clusters) != 2 || !df.Clusters[0].RootAuthority || df.Clusters[1].RootAuthority {
		t.Fatalf("dev.json clusters: %+v; want east (root authority) and west", df.Clusters)
	}
	for _, c := range df.Clusters {
		if gw := c.Gateway; gw == nil || gw.Peer == "" || gw.Entry == "" || !alive(gw.PID) || gw.Log == "" || gw.DataDir == "" {
			t.Errorf("dev.json: %s's gateway %+v, want addresses, a running pid, log and data dir", c.Name, gw)
		}
		if c.Pending || len(c.Workloads) != 3 {
			t.Errorf("dev.json: %s pending %t with %d workloads, want a full cluster with 3", c.Name, c.Pending, len(c.Workloads))
		}
	}
	cfg := df.Config
	if st := federationStatus(t, cfg, "east"); !linkConnected(st, "west") {
		t.Errorf("east's federation status: %+v, want the link to west connected", st)
	}

	// payments runs in west only; east's frontend has a listener for it.
	if out := mustCLI(t, "dev", "run", "payments", "--dir", dir, "--cluster", "west", "--proxy-bin", bin); !strings.Contains(out, "payments-0") {
		t.Errorf("dev run: %q", out)
	}
	if df, err = readDevFile(dir); err != nil {
		t.Fatal(err)
	}
	if w := df.Clusters[1].Workloads; len(w) != 4 || w[3].Instance != "payments-0" {
		t.Fatalf("dev.json west workloads after dev run: %+v", w)
	}
	fe := df.Clusters[0].Workloads[0]
	url := "http://" + fe.Upstreams["payments"] + "/"
	if code, r, err := getEcho(url); err == nil && code == http.StatusOK {
		t.Fatalf("east reached west's payments before it was exported: %+v", r)
	}
	export := filepath.Join(dir, "export.yaml")
	os.WriteFile(export, []byte("apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: payments, namespace: default}\n"), 0o644)
	mustCLI(t, "apply", "--config", cfg, "--context", "west", "-f", export)
	var r echoReply
	deadline := time.Now().Add(15 * time.Second)
	for {
		code, got, err := getEcho(url)
		if err == nil && code == http.StatusOK {
			r = got
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("east's frontend -> payments after the export: %d %v", code, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if r.Cluster != "west" || r.Service != "payments" || r.Caller != fe.SPIFFEID {
		t.Fatalf("reply %+v: want payments in west seeing the caller %s", r, fe.SPIFFEID)
	}
	// The endpoint east's frontend used is west's, through east's gateway.
	resp, err := http.Get("http://" + fe.Admin + "/config_dump")
	if err != nil {
		t.Fatal(err)
	}
	dump, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(dump), df.Clusters[0].Gateway.Entry) {
		t.Errorf("east frontend's config_dump does not name east's gateway entry %s", df.Clusters[0].Gateway.Entry)
	}

	pids := df.pids()
	if len(pids) != 2*(1+1+2*3)+2 {
		t.Errorf("dev.json lists %d processes, want 18", len(pids))
	}
	down := mustCLI(t, "dev", "down", "--dir", dir)
	if !strings.Contains(down, "stopped 18 processes") {
		t.Errorf("dev down: %q", down)
	}
	for _, pid := range pids {
		waitForExit(t, pid)
	}
}

// A cluster installed pending waits; dev link joins it (it receives its
// intermediate) and then starts its gateway and workloads.
func TestDevUpPendingCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts processes")
	}
	dir := t.TempDir()
	bin := buildProxy(t)
	t.Cleanup(func() { cli(t, "dev", "down", "--dir", dir) })
	out := mustCLI(t, "dev", "up", "--dir", dir, "--clusters", "east,south", "--pending", "south", "--proxy-bin", bin)
	for _, want := range []string{"pending: waiting to join", "strait dev link --dir " + dir + " --cluster south"} {
		if !strings.Contains(out, want) {
			t.Errorf("dev up output lacks %q:\n%s", want, out)
		}
	}
	df, err := readDevFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	south := df.Clusters[1]
	if !south.Pending || south.Gateway != nil || len(south.Workloads) != 0 || !alive(south.ControlPlane.PID) {
		t.Fatalf("dev.json south: %+v; want pending, its control plane running, no gateway or workloads", south)
	}
	cfg := df.Config
	if st := federationStatus(t, cfg, "south"); !st.Pending || len(st.Links) != 0 {
		t.Errorf("south's federation status: %+v, want pending without links", st)
	}
	if code, _, errOut := cli(t, "dev", "run", "payments", "--dir", dir, "--cluster", "south", "--proxy-bin", bin); code == 0 || !strings.Contains(errOut, "pending") {
		t.Errorf("dev run in a pending cluster: exit %d, %q; want a refusal saying it is pending", code, errOut)
	}

	out = mustCLI(t, "dev", "link", "--dir", dir, "--cluster", "south", "--proxy-bin", bin)
	for _, want := range []string{"received this cluster's intermediate", "cluster south  gateway", "link to east connected"} {
		if !strings.Contains(out, want) {
			t.Errorf("dev link output lacks %q:\n%s", want, out)
		}
	}
	if df, err = readDevFile(dir); err != nil {
		t.Fatal(err)
	}
	south = df.Clusters[1]
	if south.Pending || south.Gateway == nil || len(south.Workloads) != 3 {
		t.Fatalf("dev.json south after dev link: %+v; want a gateway and 3 workloads", south)
	}
	if st := federationStatus(t, cfg, "south"); st.Pending || !linkConnected(st, "east") {
		t.Errorf("south's federation status after the join: %+v", st)
	}
	// The CLI context made for the pending cluster keeps working, and
	// south's sample app runs under the mesh's identities.
	if status := mustCLI(t, "status", "--config", cfg, "--context", "south"); !strings.Contains(status, "frontend-0") {
		t.Errorf("strait status --context south:\n%s", status)
	}
	fe := south.Workloads[0]
	code, r, err := getEcho("http://" + fe.Upstreams["backend"] + "/")
	if err != nil || code != http.StatusOK || r.Cluster != "south" || r.Caller != fe.SPIFFEID {
		t.Errorf("south frontend -> backend: %d %+v %v", code, r, err)
	}
	// Linking again changes nothing.
	if out := mustCLI(t, "dev", "link", "--dir", dir, "--cluster", "south", "--proxy-bin", bin); !strings.Contains(out, "linked to east already") {
		t.Errorf("second dev link: %q", out)
	}

	pids := df.pids()
	mustCLI(t, "dev", "down", "--dir", dir)
	for _, pid := range pids {
		waitForExit(t, pid)
	}
}
