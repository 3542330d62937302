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
	"slices"
	"strconv"
	"strings"
	"sync"
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
	Name string `json:"name"`
	// RootAuthority marks the first cluster: its control plane holds the
	// mesh CA (caDir) and signs the intermediates of clusters that join
	// pending.
	RootAuthority bool `json:"rootAuthority,omitempty"`
	// Pending: installed without an intermediate, its control plane waits
	// for a join; its gateway and workloads start once it joined.
	Pending      bool          `json:"pending,omitempty"`
	ControlPlane devCP         `json:"controlPlane"`
	Gateway      *devGateway   `json:"gateway,omitempty"`
	Workloads    []devWorkload `json:"workloads"`
}

type devCP struct {
	Address string `json:"address"`
	DataDir string `json:"dataDir"`
	PID     int    `json:"pid"`
	Log     string `json:"log"`
}

// devGateway is a cluster's east-west gateway: Peer is its QUIC (UDP)
// address for peer gateways, Entry its TCP address for local sidecars.
type devGateway struct {
	Peer    string `json:"peer"`
	Entry   string `json:"entry"`
	PID     int    `json:"pid"`
	Log     string `json:"log"`
	DataDir string `json:"dataDir"`
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

// workloadSpec is one instance to start: an echo app behind a sidecar.
type workloadSpec struct {
	instance, service string
	upstreams         []string
}

// sampleWorkloads is the sample application of every dev cluster.
// frontend also has a listener for payments, which no cluster runs until
// `strait dev run payments --cluster NAME` starts it somewhere.
var sampleWorkloads = []workloadSpec{
	{"frontend-0", "frontend", []string{"backend", "payments"}},
	{"backend-0", "backend", nil},
	{"backend-1", "backend", nil},
}

func newDevCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run local clusters on this machine for development and tests",
	}
	cmd.AddCommand(newDevUpCmd(g), newDevDownCmd(g), newDevLinkCmd(g), newDevRunCmd(g), newDevEchoCmd(g))
	return cmd
}

// devUpOptions are dev up's flags.
type devUpOptions struct {
	clusters    []string
	pending     []string
	link        bool
	trustDomain string
	proxyBin    string
	svidTTL     time.Duration
	reissue     time.Duration
}

func newDevUpCmd(g *globals) *cobra.Command {
	var dir, clusters string
	var o devUpOptions
	cmd := &cobra.Command{
		Use:   "up --dir DIR [--clusters east,west,south] [--link] [--pending NAME]...",
		Short: "Start clusters (control plane, gateway, sample application with sidecars); return when all is ready",
		Long: `Start, per cluster, a control plane, an east-west gateway and the sample
application (frontend-0, backend-0, backend-1, each an echo server behind a
strait-proxy sidecar) as processes on loopback. All clusters share the mesh CA
in DIR/ca; the first is the root authority. Clusters start unlinked: --link
links every other cluster to the first with a one-time join token, as
` + "`strait federation token create`" + ` and ` + "`strait federation join`" + ` do; without it, link
one later with ` + "`strait dev link --dir DIR --cluster NAME`" + `.

--pending NAME installs that cluster without an intermediate: its control plane
waits for a join (through which the root authority sends it one), and its
gateway and workloads start once it joined (by --link or dev link).

Returns once everything started is ready, and writes DIR/dev.json (what runs
where) and DIR/strait.config (one context per cluster, for --config). Stop
everything with strait dev down --dir DIR; the state is kept, and dev up on the
same DIR starts the same clusters again.`,
		Example: `  strait dev up --dir ./dev
  strait status --config dev/strait.config
  strait dev up --dir ./mesh --clusters east,west,south --link
  strait dev up --dir ./mesh --clusters east,west,south --pending south`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--dir is required")}
			}
			o.clusters = strings.Split(clusters, ",")
			for i, n := range o.clusters {
				if err := identity.ValidateClusterName(n); err != nil {
					return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("--clusters: %w", err)}
				}
				if slices.Contains(o.clusters[:i], n) {
					return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("--clusters: %s given twice", n)}
				}
			}
			for _, p := range o.pending {
				switch {
				case !slices.Contains(o.clusters, p):
					return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("--pending %s: not one of --clusters %s", p, clusters)}
				case p == o.clusters[0]:
					return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("--pending %s: the first cluster is the root authority and holds an intermediate", p)}
				}
			}
			if o.svidTTL != 0 && o.svidTTL < minDevSVIDTTL {
				return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("--svid-ttl %s: at least %s (sidecars and gateways renew at half life, and an SVID shorter than that expires while it is renewed)", o.svidTTL, minDevSVIDTTL)}
			}
			abs, err := filepath.Abs(dir)
			if err != nil {
				return err
			}
			return devUp(cmd.Context(), g, abs, o)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory for state, logs, dev.json and strait.config")
	cmd.Flags().StringVar(&clusters, "clusters", "east", "comma-separated cluster names; the first is the root authority")
	cmd.Flags().BoolVar(&o.link, "link", false, "link every other cluster to the first with a join token")
	cmd.Flags().StringSliceVar(&o.pending, "pending", nil, "start this cluster without an intermediate, waiting to join (repeatable)")
	cmd.Flags().StringVar(&o.trustDomain, "trust-domain", "strait.example", "trust domain of a new mesh")
	cmd.Flags().StringVar(&o.proxyBin, "proxy-bin", "", "strait-proxy binary (default: next to strait, then $PATH)")
	cmd.Flags().Var(durationValue{&o.svidTTL}, "svid-ttl", "lifetime of workload SVIDs, at least 10s (default 1h)")
	o.reissue = 3 * time.Second
	cmd.Flags().Var(durationValue{&o.reissue}, "reissue-window", "after a root rotation re-signs an intermediate, nodes renew their SVIDs at random within this window")
	return cmd
}

// minDevSVIDTTL is the shortest SVID lifetime dev up takes.
const minDevSVIDTTL = 10 * time.Second

func findProxyBinary(flag string) (string, error) {
	if flag != "" {
		// Checked now, not when the first sidecar starts (after the
		// control planes and gateways have).
		p, err := exec.LookPath(flag)
		if err != nil {
			return "", fmt.Errorf("--proxy-bin %s: not an executable file (%w); `make build` builds bin/strait-proxy", flag, errors.Unwrap(err))
		}
		return p, nil
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
	handedOut.mu.Lock()
	defer handedOut.mu.Unlock()
	for range 50 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		addr := ln.Addr().String()
		ln.Close()
		// The kernel may hand a port it just gave (and we closed) out
		// again: never return one twice, or two children collide.
		if !handedOut.addrs[addr] {
			handedOut.addrs[addr] = true
			return addr, nil
		}
	}
	return "", errors.New("no free loopback port found that was not already handed out")
}

// handedOut are the addresses freeAddr returned in this process.
var handedOut = struct {
	mu    sync.Mutex
	addrs map[string]bool
}{addrs: map[string]bool{}}

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
// c may be nil (a process this run did not start).
func waitFor(ctx context.Context, c *child, what string, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	var exited chan struct{}
	logPath := ""
	if c != nil {
		exited, logPath = c.exited, " (log: "+c.log+")"
	}
	for {
		err := check()
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return c.failed(what)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %v%s", what, timeout, err, logPath)
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

// devUpper is one run of `strait dev up` (or dev link, dev run): what it
// shares across clusters and what it started (stopped again if the run
// fails).
type devUpper struct {
	g        *globals
	dir      string
	self     string
	proxyBin string
	svidTTL  time.Duration
	reissue  time.Duration
	td       spiffeid.TrustDomain
	config   string                    // DIR/strait.config
	contexts map[string]*clientContext // by cluster
	// peerAddrs are the gateways' QUIC addresses of the previous run, by
	// cluster: peers store them in their links, so a gateway comes back on
	// its address when it is free.
	peerAddrs map[string]string
	started   []*child
}

func (u *devUpper) say(format string, a ...any) { fmt.Fprintf(u.g.stdout, format+"\n", a...) }

func (u *devUpper) start(bin string, args []string, logPath string) (*child, error) {
	c, err := startChild(bin, args, logPath)
	if err == nil {
		u.started = append(u.started, c)
	}
	return c, err
}

// stopStarted stops what this run started, newest first.
func (u *devUpper) stopStarted() {
	for i := len(u.started) - 1; i >= 0; i-- {
		stopPID(u.started[i].cmd.Process.Pid, "", 3*time.Second)
	}
}

func devUp(ctx context.Context, g *globals, dir string, o devUpOptions) error {
	peerAddrs := map[string]string{}
	old, err := readDevFile(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		// It records what runs and which cluster is the root authority:
		// without it, neither check below can be made.
		return fmt.Errorf("%w (it records what runs in %s and which cluster is the root authority: repair it, or stop what runs and remove it)", err, dir)
	default:
		if anyAlive(dir, old) {
			return fmt.Errorf("%s is already up; run `strait dev down --dir %s` first", dir, dir)
		}
		// The first cluster holds the mesh root: another first cluster
		// would make a second root authority over the same CA.
		for _, c := range old.Clusters {
			if c.RootAuthority && len(o.clusters) > 0 && o.clusters[0] != c.Name {
				return fmt.Errorf("%s was brought up with %s first, as the root authority; list it first again (--clusters %s,...) or use another --dir", dir, c.Name, c.Name)
			}
		}
		for _, c := range old.Clusters {
			if c.Gateway != nil {
				peerAddrs[c.Name] = c.Gateway.Peer
			}
		}
	}
	proxyBin, err := findProxyBinary(o.proxyBin)
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
	u := &devUpper{g: g, dir: dir, self: self, proxyBin: proxyBin, svidTTL: o.svidTTL, reissue: o.reissue, config: filepath.Join(dir, "strait.config"),
		contexts: map[string]*clientContext{}, peerAddrs: peerAddrs}
	ok := false
	defer func() {
		if !ok {
			u.stopStarted()
		}
	}()

	caDir := filepath.Join(dir, "ca")
	dirs, err := u.prepare(ctx, caDir, o)
	if err != nil {
		return err
	}
	df := &devFile{TrustDomain: u.td.Name(), CADir: caDir, Config: u.config}
	cfg := &clientConfig{CurrentContext: o.clusters[0]}
	cps := make([]*child, len(o.clusters))
	for i, name := range o.clusters {
		cpDir := filepath.Join(dir, name, "controlplane")
		addr, err := freeAddr()
		if err != nil {
			return err
		}
		args := []string{"controlplane", "run", "--dir", cpDir, "--listen", addr}
		if u.svidTTL > 0 {
			args = append(args, "--svid-ttl", u.svidTTL.String())
		}
		if u.reissue > 0 {
			args = append(args, "--reissue-window", u.reissue.String())
		}
		if i == 0 {
			args = append(args, "--root-authority", caDir)
		}
		if cps[i], err = u.start(u.self, args, filepath.Join(dir, name, "controlplane.log")); err != nil {
			return err
		}
		// A pending cluster's bootstrap credentials are where its admin
		// SVID and bundle will be after the join: the context keeps working.
		ld := &local.Dir{Path: cpDir}
		certPath, keyPath := ld.AdminPaths()
		cfg.Contexts = append(cfg.Contexts, clientContext{Name: name, Cluster: name, Server: addr, TrustDomain: u.td.Name(),
			TrustBundle: ld.BundlePEMPath(), ClientCertificate: certPath, ClientKey: keyPath})
		df.Clusters = append(df.Clusters, devCluster{Name: name, RootAuthority: i == 0, Pending: dirs[i] == nil,
			ControlPlane: devCP{Address: addr, DataDir: cpDir, PID: cps[i].cmd.Process.Pid, Log: cps[i].log}, Workloads: []devWorkload{}})
	}
	for i := range cfg.Contexts {
		u.contexts[cfg.Contexts[i].Name] = &cfg.Contexts[i]
	}
	if err := writeClientConfig(u.config, cfg); err != nil {
		return err
	}
	for i := range df.Clusters {
		dc := &df.Clusters[i]
		err := waitFor(ctx, cps[i], "control plane "+dc.Name, 20*time.Second, func() error { return u.status(ctx, dc.Name) })
		if err != nil {
			return err
		}
		role := ""
		switch {
		case dc.RootAuthority && len(df.Clusters) > 1:
			role = ", root authority"
		case dc.Pending:
			role = ", pending: waiting to join"
		}
		u.say("cluster %-6s control plane %s (pid %d)%s", dc.Name, dc.ControlPlane.Address, dc.ControlPlane.PID, role)
	}
	for i := range df.Clusters {
		if dirs[i] != nil {
			if err := u.startGateway(ctx, &df.Clusters[i], dirs[i]); err != nil {
				return err
			}
		}
	}
	for i := range df.Clusters {
		if dirs[i] != nil {
			if err := u.startWorkloads(ctx, &df.Clusters[i], sampleWorkloads); err != nil {
				return err
			}
		}
	}
	if o.link {
		for i := 1; i < len(df.Clusters); i++ {
			if err := u.link(ctx, df, i); err != nil {
				return err
			}
		}
	}
	if err := writeDevFile(dir, df); err != nil {
		return err
	}
	ok = true
	u.say("ready: %s\n       %s\ntry:   curl http://%s/   (frontend-0's outbound listener for backend)\n       strait status --config %s",
		filepath.Join(dir, "dev.json"), df.Config, df.Clusters[0].Workloads[0].Upstreams["backend"], df.Config)
	if len(df.Clusters) > 1 {
		u.say("       strait federation status --config %s --context %s", df.Config, df.Clusters[0].Name)
		if !o.link {
			for i, dc := range df.Clusters[1:] {
				prefix := "link:  "
				if i > 0 {
					prefix = "       "
				}
				why := "(a join token from " + df.Clusters[0].Name + ", redeemed by " + dc.Name + ")"
				if dc.Pending {
					why = "(pending: it receives its intermediate through the join, then its gateway and workloads start)"
				}
				u.say("%sstrait dev link --dir %s --cluster %s   %s", prefix, dir, dc.Name, why)
			}
		}
	}
	u.say("stop:  strait dev down --dir %s", dir)
	return nil
}

// prepare creates (or reuses) the mesh CA and every cluster's data
// directory, with fresh admin credentials. It returns each cluster's
// directory, nil for a pending one. It all happens before any control
// plane starts: the root authority's holds the CA directory locked.
func (u *devUpper) prepare(ctx context.Context, caDir string, o devUpOptions) ([]*local.Dir, error) {
	var auth *ca.Authority
	var err error
	if u.td, err = identity.ParseTrustDomain(o.trustDomain); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(caDir, "state.json")); err == nil {
		if auth, err = ca.Open(ctx, ca.Config{Dir: caDir, Logger: u.g.logger()}); err != nil {
			return nil, err
		}
		u.td = auth.TrustDomain()
		u.say("mesh CA      %s (existing, trust domain %s)", caDir, u.td.Name())
	} else {
		if auth, err = ca.Init(ctx, ca.Config{Dir: caDir, Logger: u.g.logger()}, ca.InitOptions{TrustDomain: u.td}); err != nil {
			return nil, err
		}
		u.say("mesh CA      %s (new, trust domain %s)", caDir, u.td.Name())
	}
	defer auth.Close()
	dirs := make([]*local.Dir, len(o.clusters))
	for i, name := range o.clusters {
		cpDir := filepath.Join(u.dir, name, "controlplane")
		pending := slices.Contains(o.pending, name)
		d, err := local.Load(cpDir)
		switch {
		case err == nil:
			if pending {
				u.say("cluster %-6s holds its intermediate already (it joined before): --pending does not apply", name)
			}
		case errors.Is(err, local.ErrPending):
			continue // initialized pending before, still waiting
		case errors.Is(err, local.ErrNotInitialized) && pending:
			if _, err := local.InitPending(cpDir, name, u.td, false); err != nil {
				return nil, fmt.Errorf("cluster %s: %w", name, err)
			}
			continue
		case errors.Is(err, local.ErrNotInitialized):
			d, err = local.Init(ctx, cpDir, name, wiring.RootAuthority{CA: auth}, 0, false)
		}
		if err == nil {
			var iss wiring.Issuer
			if iss, err = wiring.NewIssuer(d, 0); err == nil {
				_, err = d.MintAdmin(iss, 24*time.Hour)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("cluster %s: %w", name, err)
		}
		dirs[i] = d
	}
	return dirs, nil
}

// dial connects to a cluster's control plane with its strait.config
// context (the credentials are read again on every dial: a pending
// cluster's change when it joins).
func (u *devUpper) dial(cluster string) (controlplanev1.AdminServiceClient, controlplanev1.FederationServiceClient, func(), error) {
	cx := u.contexts[cluster]
	if cx == nil {
		return nil, nil, nil, fmt.Errorf("no context for cluster %s in %s", cluster, u.config)
	}
	conn, err := dialContext(cx)
	if err != nil {
		return nil, nil, nil, err
	}
	return controlplanev1.NewAdminServiceClient(conn), controlplanev1.NewFederationServiceClient(conn), func() { conn.Close() }, nil
}

// status asks a cluster's control plane for its status (served to the
// bootstrap admin of a pending cluster too).
func (u *devUpper) status(ctx context.Context, cluster string) error {
	_, err := u.adminStatus(ctx, cluster)
	return err
}

func (u *devUpper) adminStatus(ctx context.Context, cluster string) (*controlplanev1.StatusResponse, error) {
	admin, _, done, err := u.dial(cluster)
	if err != nil {
		return nil, err
	}
	defer done()
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	st, err := admin.Status(rctx, &controlplanev1.StatusRequest{})
	if err != nil {
		return nil, rpcError(err)
	}
	return st, nil
}

// startWorkloads starts specs in cluster dc (each an echo app behind a
// sidecar, with a fresh registration token), waits until every sidecar
// is ready and knows the local endpoints of its upstreams, and adds them
// to dc.
func (u *devUpper) startWorkloads(ctx context.Context, dc *devCluster, specs []workloadSpec) error {
	admin, _, done, err := u.dial(dc.Name)
	if err != nil {
		return err
	}
	defer done()
	bundlePEM := (&local.Dir{Path: dc.ControlPlane.DataDir}).BundlePEMPath()
	type pending struct {
		w       *devWorkload
		sidecar *child
		addrs   string
	}
	var waits []pending
	for _, sw := range specs {
		w, sc, addrsFile, err := u.workload(ctx, admin, dc.Name, dc.ControlPlane.Address, bundlePEM, sw.instance, sw.service, sw.upstreams)
		if err != nil {
			return err
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
			return err
		}
		u.say("cluster %-6s %-10s %-8s sidecar %s (pid %d), app %s", dc.Name, p.w.Instance, p.w.Service, p.w.Inbound, p.w.PID, p.w.App)
		dc.Workloads = append(dc.Workloads, *p.w)
	}
	// Ready means callers know their upstreams' local endpoints too
	// (services that run nowhere in this cluster are not waited for).
	want := map[string]int{}
	for _, w := range dc.Workloads {
		want[w.Service]++
	}
	for _, p := range waits {
		for up := range p.w.Upstreams {
			if want[up] == 0 {
				continue
			}
			err := waitFor(ctx, p.sidecar, "sidecar "+p.w.Instance+" learning "+up+"'s endpoints", 15*time.Second, func() error {
				return healthyEndpoints(p.w.Admin, up, want[up])
			})
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// workload starts one instance (an echo app and its sidecar, with a fresh
// registration token) and returns without waiting for readiness.
func (u *devUpper) workload(ctx context.Context, admin controlplanev1.AdminServiceClient, cluster, cpAddr, bundlePEM string,
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
	args := []string{"--trust-domain", u.td.Name(), "--control-plane", cpAddr, "--trust-bundle", bundlePEM,
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
	byCluster, err := upstreamHealthy(admin, upstream)
	if err != nil {
		return err
	}
	if byCluster == nil {
		return errors.New("no configuration for it yet")
	}
	healthy := 0
	for _, c := range byCluster {
		healthy += c
	}
	if healthy < n {
		return fmt.Errorf("%d of %d endpoints healthy", healthy, n)
	}
	return nil
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

func writeDevFile(dir string, df *devFile) error {
	data, _ := json.MarshalIndent(df, "", "  ")
	return atomicfile.WriteFile(filepath.Join(dir, "dev.json"), append(data, '\n'), 0o644)
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

// pids lists every process df records: control planes, gateways,
// sidecars and apps.
func (df *devFile) pids() []int {
	var pids []int
	for _, c := range df.Clusters {
		pids = append(pids, c.ControlPlane.PID)
		if c.Gateway != nil {
			pids = append(pids, c.Gateway.PID)
		}
		for _, w := range c.Workloads {
			pids = append(pids, w.PID, w.AppPID)
		}
	}
	return pids
}

func anyAlive(dir string, df *devFile) bool {
	for _, c := range df.Clusters {
		if ours(c.ControlPlane.PID, dir) {
			return true
		}
		if c.Gateway != nil && ours(c.Gateway.PID, dir) {
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
		Long: `Stop everything ` + "`strait dev up`" + ` (and dev link, dev run) started in DIR, as
dev.json records it: workloads first, then gateways, then control planes. The
state is kept: ` + "`strait dev up --dir DIR`" + ` starts the same clusters again, with
their links and resources. To start afresh, remove DIR after dev down.`,
		Example: `  strait dev down --dir ./dev`,
		Args:    cobra.NoArgs,
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
				// Stopping what is not running succeeds, as cleanup scripts
				// expect; the message still names the directory, should it
				// be the wrong one.
				fmt.Fprintf(g.stderr, "nothing to stop: %s has no dev.json\n", abs)
				return nil
			}
			if err != nil {
				return err
			}
			stopped := 0
			// Workloads first, then gateways, then control planes.
			for _, c := range df.Clusters {
				for _, w := range c.Workloads {
					if stopPID(w.PID, abs, 5*time.Second) {
						stopped++
					}
					if stopPID(w.AppPID, w.Instance, 5*time.Second) {
						stopped++
					}
				}
			}
			for _, c := range df.Clusters {
				if c.Gateway != nil && stopPID(c.Gateway.PID, abs, 5*time.Second) {
					stopped++
				}
			}
			for _, c := range df.Clusters {
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
