package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/local"
	"github.com/straitmesh/strait/internal/atomicfile"
	"github.com/straitmesh/strait/internal/wiring"
	"github.com/straitmesh/strait/proxy"
)

// childEnv marks processes started by `strait dev up`; a test binary
// standing in for strait runs the CLI when it sees it.
const childEnv = "STRAIT_DEV_CHILD"

// devFile is DIR/dev.json: what `strait dev up` started, for tests, for
// `strait dev down` and for people.
type devFile struct {
	TrustDomain string       `json:"trustDomain"`
	CADir       string       `json:"caDir"`
	Config      string       `json:"config"`
	Clusters    []devCluster `json:"clusters"`
}

type devCluster struct {
	Name         string        `json:"name"`
	ControlPlane devCP         `json:"controlPlane"`
	Workloads    []devWorkload `json:"workloads"`
}

type devCP struct {
	Address string `json:"address"`
	DataDir string `json:"dataDir"`
	PID     int    `json:"pid"`
	Log     string `json:"log"`
}

type devWorkload struct {
	Instance    string            `json:"instance"`
	Service     string            `json:"service"`
	Namespace   string            `json:"namespace"`
	SPIFFEID    string            `json:"spiffeID"`
	PID         int               `json:"pid"`
	AppPID      int               `json:"appPID"`
	App         string            `json:"app"`
	Inbound     string            `json:"inbound"`
	Admin       string            `json:"admin"`
	WorkloadAPI string            `json:"workloadAPI"`
	Upstreams   map[string]string `json:"upstreams"`
	Log         string            `json:"log"`
}

// sampleWorkloads is the sample application of every dev cluster.
var sampleWorkloads = []struct {
	instance, service string
	upstreams         []string
}{
	{"frontend-0", "frontend", []string{"backend"}},
	{"backend-0", "backend", nil},
	{"backend-1", "backend", nil},
}

func newDevCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run local clusters on this machine for development and tests",
	}
	cmd.AddCommand(newDevUpCmd(g), newDevDownCmd(g), newDevEchoCmd(g))
	return cmd
}

func newDevUpCmd(g *globals) *cobra.Command {
	var dir, clusters, td, proxyBin string
	var svidTTL time.Duration
	cmd := &cobra.Command{
		Use:   "up --dir DIR [--clusters east,west]",
		Short: "Start control planes and the sample application with sidecars; return when all is ready",
		Long: `Start, per cluster, a control plane and the sample application (frontend-0,
backend-0, backend-1, each an echo server behind a strait-proxy sidecar) as
processes on loopback. Returns once every sidecar is ready, and writes
DIR/dev.json (what runs where) and DIR/strait.config (one context per
cluster, for --config). Stop everything with strait dev down --dir DIR.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--dir is required")}
			}
			names := strings.Split(clusters, ",")
			for _, n := range names {
				if err := identity.ValidateClusterName(n); err != nil {
					return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("--clusters: %w", err)}
				}
			}
			abs, err := filepath.Abs(dir)
			if err != nil {
				return err
			}
			return devUp(cmd.Context(), g, abs, names, td, proxyBin, svidTTL)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory for state, logs, dev.json and strait.config")
	cmd.Flags().StringVar(&clusters, "clusters", "east", "comma-separated cluster names")
	cmd.Flags().StringVar(&td, "trust-domain", "strait.example", "trust domain of a new mesh")
	cmd.Flags().StringVar(&proxyBin, "proxy-bin", "", "strait-proxy binary (default: next to strait, then $PATH)")
	cmd.Flags().Var(durationValue{&svidTTL}, "svid-ttl", "lifetime of workload SVIDs (default 1h)")
	return cmd
}

func findProxyBinary(flag string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "strait-proxy")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	if p, err := exec.LookPath("strait-proxy"); err == nil {
		return p, nil
	}
	return "", errors.New("strait-proxy not found next to strait or on $PATH: run `make build` or pass --proxy-bin")
}

// freeAddr reserves a loopback port for a process that must keep its
// address across restarts (the control plane).
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// child is a process started by dev up; exited is closed when it ends.
type child struct {
	cmd    *exec.Cmd
	log    string
	exited chan struct{}
}

func startChild(bin string, args []string, logPath string) (*child, error) {
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer lf.Close()
	c := exec.Command(bin, args...)
	c.Stdout, c.Stderr = lf, lf
	// Children get their credentials from their flags only.
	env := []string{childEnv + "=1"}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "STRAIT_TOKEN=") && !strings.HasPrefix(kv, childEnv+"=") {
			env = append(env, kv)
		}
	}
	c.Env = env
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // outlives dev up and its terminal
	if err := c.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", filepath.Base(bin), err)
	}
	ch := &child{cmd: c, log: logPath, exited: make(chan struct{})}
	go func() { c.Wait(); close(ch.exited) }()
	return ch, nil
}

// failed describes a child that exited, with the end of its log.
func (c *child) failed(what string) error {
	data, _ := os.ReadFile(c.log)
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return fmt.Errorf("%s exited (%s); end of %s:\n  %s", what, c.cmd.ProcessState, c.log, strings.Join(lines, "\n  "))
}

// waitFor polls check until it succeeds, the child exits, or the timeout.
func waitFor(ctx context.Context, c *child, what string, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return nil
		}
		select {
		case <-c.exited:
			return c.failed(what)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %v (log: %s)", what, timeout, err, c.log)
		}
	}
}

func socketPath(dir, cluster, instance string) string {
	p := filepath.Join(dir, cluster, instance, "workload.sock")
	if len(p) < 100 {
		return p
	}
	sum := sha256.Sum256([]byte(dir))
	return filepath.Join(os.TempDir(), "strait-"+hex.EncodeToString(sum[:6]), cluster+"-"+instance+".sock")
}

// devUpper is one run of `strait dev up`: what it shares across clusters
// and what it started (stopped again if the run fails).
type devUpper struct {
	g        *globals
	dir      string
	self     string
	proxyBin string
	svidTTL  time.Duration
	auth     *ca.Authority
	td       spiffeid.TrustDomain
	started  []*child
}

func (u *devUpper) say(format string, a ...any) { fmt.Fprintf(u.g.stdout, format+"\n", a...) }

func (u *devUpper) start(bin string, args []string, logPath string) (*child, error) {
	c, err := startChild(bin, args, logPath)
	if err == nil {
		u.started = append(u.started, c)
	}
	return c, err
}

func devUp(ctx context.Context, g *globals, dir string, clusters []string, tdName, proxyFlag string, svidTTL time.Duration) error {
	if old, err := readDevFile(dir); err == nil && anyAlive(dir, old) {
		return fmt.Errorf("%s is already up; run `strait dev down --dir %s` first", dir, dir)
	}
	proxyBin, err := findProxyBinary(proxyFlag)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	u := &devUpper{g: g, dir: dir, self: self, proxyBin: proxyBin, svidTTL: svidTTL}
	ok := false
	defer func() {
		if !ok {
			for _, c := range u.started {
				stopPID(c.cmd.Process.Pid, "", 3*time.Second)
			}
		}
	}()

	caDir := filepath.Join(dir, "ca")
	if u.td, err = identity.ParseTrustDomain(tdName); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(caDir, "state.json")); err == nil {
		if u.auth, err = ca.Open(ctx, ca.Config{Dir: caDir, Logger: g.logger()}); err != nil {
			return err
		}
		u.td = u.auth.TrustDomain()
		u.say("mesh CA      %s (existing, trust domain %s)", caDir, u.td.Name())
	} else {
		if u.auth, err = ca.Init(ctx, ca.Config{Dir: caDir, Logger: g.logger()}, ca.InitOptions{TrustDomain: u.td}); err != nil {
			return err
		}
		u.say("mesh CA      %s (new, trust domain %s)", caDir, u.td.Name())
	}
	defer u.auth.Close()
	df := &devFile{TrustDomain: u.td.Name(), CADir: caDir, Config: filepath.Join(dir, "strait.config")}
	cfg := &clientConfig{CurrentContext: clusters[0]}
	for _, name := range clusters {
		dc, cx, err := u.cluster(ctx, name)
		if err != nil {
			return err
		}
		cfg.Contexts = append(cfg.Contexts, cx)
		df.Clusters = append(df.Clusters, dc)
	}
	if err := writeClientConfig(df.Config, cfg); err != nil {
		return err
	}
	data, _ := json.MarshalIndent(df, "", "  ")
	if err := atomicfile.WriteFile(filepath.Join(dir, "dev.json"), append(data, '\n'), 0o644); err != nil {
		return err
	}
	ok = true
	u.say("ready: %s\n       %s\ntry:   curl http://%s/   (frontend-0's outbound listener for backend)\n       strait status --config %s\nstop:  strait dev down --dir %s",
		filepath.Join(dir, "dev.json"), df.Config, df.Clusters[0].Workloads[0].Upstreams["backend"], df.Config, dir)
	return nil
}

// cluster starts one cluster: its control plane (initialized on first
// use, with fresh admin credentials every time) and the sample workloads.
func (u *devUpper) cluster(ctx context.Context, name string) (devCluster, clientContext, error) {
	cpDir := filepath.Join(u.dir, name, "controlplane")
	d, err := local.Load(cpDir)
	if errors.Is(err, local.ErrNotInitialized) {
		d, err = local.Init(ctx, cpDir, name, wiring.RootAuthority{CA: u.auth}, 0, false)
	}
	if err == nil {
		var iss wiring.Issuer
		if iss, err = wiring.NewIssuer(d, 0); err == nil {
			_, err = d.MintAdmin(iss, 24*time.Hour)
		}
	}
	if err != nil {
		return devCluster{}, clientContext{}, fmt.Errorf("cluster %s: %w", name, err)
	}
	addr, err := freeAddr()
	if err != nil {
		return devCluster{}, clientContext{}, err
	}
	args := []string{"controlplane", "run", "--dir", cpDir, "--listen", addr}
	if u.svidTTL > 0 {
		args = append(args, "--svid-ttl", u.svidTTL.String())
	}
	cp, err := u.start(u.self, args, filepath.Join(u.dir, name, "controlplane.log"))
	if err != nil {
		return devCluster{}, clientContext{}, err
	}
	certPath, keyPath := d.AdminPaths()
	cx := clientContext{Name: name, Cluster: name, Server: addr, TrustDomain: u.td.Name(), TrustBundle: d.BundlePEMPath(), ClientCertificate: certPath, ClientKey: keyPath}
	dc := devCluster{Name: name, ControlPlane: devCP{Address: addr, DataDir: cpDir, PID: cp.cmd.Process.Pid, Log: cp.log}}
	conn, err := dialContext(&cx)
	if err != nil {
		return dc, cx, err
	}
	defer conn.Close()
	admin := controlplanev1.NewAdminServiceClient(conn)
	err = waitFor(ctx, cp, "control plane "+name, 20*time.Second, func() error {
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := admin.Status(rctx, &controlplanev1.StatusRequest{})
		return err
	})
	if err != nil {
		return dc, cx, err
	}
	u.say("cluster %-6s control plane %s (pid %d)", name, addr, cp.cmd.Process.Pid)
	type pending struct {
		w       *devWorkload
		sidecar *child
		addrs   string
	}
	var waits []pending
	for _, sw := range sampleWorkloads {
		w, sc, addrsFile, err := u.workload(ctx, admin, name, addr, d, sw.instance, sw.service, sw.upstreams)
		if err != nil {
			return dc, cx, err
		}
		waits = append(waits, pending{w: w, sidecar: sc, addrs: addrsFile})
	}
	for _, p := range waits {
		err := waitFor(ctx, p.sidecar, "sidecar "+p.w.Instance, 30*time.Second, func() error {
			if p.w.Admin == "" {
				data, err := os.ReadFile(p.addrs)
				if err != nil {
					return errors.New("not listening yet")
				}
				var a proxy.Addrs
				if err := json.Unmarshal(data, &a); err != nil {
					return err
				}
				p.w.Inbound, p.w.Admin, p.w.Upstreams = a.Inbound, a.Admin, a.Upstreams
			}
			resp, err := http.Get("http://" + p.w.Admin + "/ready")
			if err != nil {
				return err
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return errors.New(strings.TrimSpace(string(body)))
			}
			return nil
		})
		if err != nil {
			return dc, cx, err
		}
		u.say("cluster %-6s %-10s %-8s sidecar %s (pid %d), app %s", name, p.w.Instance, p.w.Service, p.w.Inbound, p.w.PID, p.w.App)
		dc.Workloads = append(dc.Workloads, *p.w)
	}
	// Ready means callers know their upstreams' endpoints too.
	want := map[string]int{}
	for _, w := range dc.Workloads {
		want[w.Service]++
	}
	for _, p := range waits {
		for up := range p.w.Upstreams {
			err := waitFor(ctx, p.sidecar, "sidecar "+p.w.Instance+" learning "+up+"'s endpoints", 15*time.Second, func() error {
				return healthyEndpoints(p.w.Admin, up, want[up])
			})
			if err != nil {
				return dc, cx, err
			}
		}
	}
	return dc, cx, nil
}

// workload starts one sample instance (an echo app and its sidecar, with
// a fresh registration token) and returns without waiting for readiness.
func (u *devUpper) workload(ctx context.Context, admin controlplanev1.AdminServiceClient, cluster, cpAddr string, d *local.Dir,
	instance, service string, upstreams []string) (*devWorkload, *child, string, error) {
	wdir := filepath.Join(u.dir, cluster, instance)
	if err := os.MkdirAll(wdir, 0o700); err != nil {
		return nil, nil, "", err
	}
	// The app binds port 0 and reports what it got: reserving a port here
	// and handing it over races with other processes.
	appAddrFile := filepath.Join(wdir, "app-address")
	os.Remove(appAddrFile)
	app, err := u.start(u.self, []string{"dev", "echo", "--listen", "127.0.0.1:0", "--address-file", appAddrFile,
		"--cluster", cluster, "--service", service, "--instance", instance}, filepath.Join(u.dir, cluster, instance+"-app.log"))
	if err != nil {
		return nil, nil, "", err
	}
	var appAddr string
	err = waitFor(ctx, app, "sample app "+instance, 10*time.Second, func() error {
		b, err := os.ReadFile(appAddrFile)
		if err != nil {
			return errors.New("not listening yet")
		}
		appAddr = strings.TrimSpace(string(b))
		return nil
	})
	if err != nil {
		return nil, nil, "", err
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	tok, err := admin.CreateRegistrationToken(rctx, &controlplanev1.CreateRegistrationTokenRequest{Namespace: "default", ServiceAccount: service, Service: service})
	cancel()
	if err != nil {
		return nil, nil, "", fmt.Errorf("registration token for %s: %w", instance, rpcError(err))
	}
	tokenFile := filepath.Join(wdir, "token")
	if err := atomicfile.WriteFile(tokenFile, []byte(tok.GetToken()+"\n"), 0o600); err != nil {
		return nil, nil, "", err
	}
	addrsFile := filepath.Join(wdir, "addresses.json")
	os.Remove(addrsFile)
	sock := socketPath(u.dir, cluster, instance)
	os.MkdirAll(filepath.Dir(sock), 0o700)
	args := []string{"--trust-domain", u.td.Name(), "--control-plane", cpAddr, "--trust-bundle", d.BundlePEMPath(),
		"--token-file", tokenFile, "--data-dir", wdir, "--instance", instance, "--service", service,
		"--namespace", "default", "--inbound", "127.0.0.1:0", "--app", appAddr, "--admin", "127.0.0.1:0",
		"--workload-api", sock, "--addresses-file", addrsFile}
	for _, up := range upstreams {
		args = append(args, "--upstream", up+"=127.0.0.1:0")
	}
	logPath := filepath.Join(u.dir, cluster, instance+".log")
	sc, err := u.start(u.proxyBin, args, logPath)
	if err != nil {
		return nil, nil, "", err
	}
	id, _ := identity.Workload(u.td, "default", service)
	return &devWorkload{Instance: instance, Service: service, Namespace: "default", SPIFFEID: id.String(),
		PID: sc.cmd.Process.Pid, AppPID: app.cmd.Process.Pid, App: appAddr, WorkloadAPI: sock, Log: logPath}, sc, addrsFile, nil
}

// healthyEndpoints checks, through a sidecar's /config_dump, that its
// snapshot lists at least n healthy endpoints of upstream.
func healthyEndpoints(admin, upstream string, n int) error {
	resp, err := http.Get("http://" + admin + "/config_dump")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var dump struct {
		Snapshot struct {
			Services []struct {
				Name      string `json:"name"`
				Endpoints []struct {
					Health string `json:"health"`
				} `json:"endpoints"`
			} `json:"services"`
		} `json:"snapshot"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&dump); err != nil {
		return err
	}
	for _, svc := range dump.Snapshot.Services {
		if svc.Name != upstream {
			continue
		}
		healthy := 0
		for _, ep := range svc.Endpoints {
			if ep.Health == "HEALTH_HEALTHY" {
				healthy++
			}
		}
		if healthy >= n {
			return nil
		}
		return fmt.Errorf("%d of %d endpoints healthy", healthy, n)
	}
	return errors.New("no configuration for it yet")
}

func readDevFile(dir string) (*devFile, error) {
	data, err := os.ReadFile(filepath.Join(dir, "dev.json"))
	if err != nil {
		return nil, err
	}
	var df devFile
	if err := json.Unmarshal(data, &df); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, "dev.json"), err)
	}
	return &df, nil
}

// ours reports whether pid is alive and one of dev up's processes for dir
// (so a recycled pid is never signalled).
func ours(pid int, marker string) bool {
	if pid <= 0 {
		return false
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	if marker == "" {
		return true
	}
	return bytes.Contains(cmdline, []byte(marker))
}

func anyAlive(dir string, df *devFile) bool {
	for _, c := range df.Clusters {
		if ours(c.ControlPlane.PID, dir) {
			return true
		}
		for _, w := range c.Workloads {
			if ours(w.PID, dir) {
				return true
			}
		}
	}
	return false
}

// stopPID sends SIGTERM, waits up to grace, then SIGKILLs.
func stopPID(pid int, marker string, grace time.Duration) bool {
	if !ours(pid, marker) {
		return false
	}
	syscall.Kill(pid, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		if !alive(pid) {
			return true
		}
		time.Sleep(50 * time.Millisecond)
	}
	syscall.Kill(pid, syscall.SIGKILL)
	return true
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	if i := bytes.LastIndexByte(data, ')'); i >= 0 && i+2 < len(data) {
		return data[i+2] != 'Z'
	}
	return true
}

func newDevDownCmd(g *globals) *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "down --dir DIR",
		Short: "Stop everything `strait dev up` started in DIR (state is kept)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--dir is required")}
			}
			abs, err := filepath.Abs(dir)
			if err != nil {
				return err
			}
			df, err := readDevFile(abs)
			if errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("nothing to stop: %s has no dev.json", abs)
			}
			if err != nil {
				return err
			}
			stopped := 0
			for _, c := range df.Clusters {
				for _, w := range c.Workloads {
					if stopPID(w.PID, abs, 5*time.Second) {
						stopped++
					}
					if stopPID(w.AppPID, w.Instance, 5*time.Second) {
						stopped++
					}
				}
				if stopPID(c.ControlPlane.PID, abs, 5*time.Second) {
					stopped++
				}
			}
			fmt.Fprintf(g.stdout, "stopped %d processes; state kept in %s\n", stopped, abs)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory given to strait dev up")
	return cmd
}
