// Command strait-proxy is the Strait sidecar: one per workload. It is lean
// on purpose (no client-go, no smallstep, no QUIC; deps_test.go keeps it
// so) and is configured with flags only.
//
//	strait-proxy --trust-domain strait.example --control-plane 127.0.0.1:7400 \
//	  --trust-bundle bundle.pem --token-file token --instance backend-0 \
//	  --service backend --inbound 127.0.0.1:0 --app 127.0.0.1:8080 \
//	  --upstream payments=127.0.0.1:15001 --admin 127.0.0.1:0
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/internal/atomicfile"
	"github.com/straitmesh/strait/internal/sysmonwake"
	"github.com/straitmesh/strait/proxy"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr, sysmonwake.Reexec))
}

type upstreams map[string]string

func (u upstreams) String() string { return fmt.Sprint(map[string]string(u)) }
func (u upstreams) Set(v string) error {
	name, addr, ok := strings.Cut(v, "=")
	if !ok || name == "" || addr == "" {
		return fmt.Errorf("want SERVICE=HOST:PORT, got %q", v)
	}
	if _, dup := u[name]; dup {
		return fmt.Errorf("upstream %s given twice", name)
	}
	u[name] = addr
	return nil
}

// run is the command; startOver, when not nil, is called once the flags are
// known good and --keep-sysmon-awake is set, before anything is started
// (main passes sysmonwake.Reexec).
func run(ctx context.Context, args []string, stdout, stderr io.Writer, startOver func() error) int {
	fs := flag.NewFlagSet("strait-proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		td          = fs.String("trust-domain", "", "trust domain of the mesh (required)")
		cp          = fs.String("control-plane", "", "control plane host:port (required)")
		bundlePath  = fs.String("trust-bundle", "", "PEM file of the mesh roots, to verify the control plane on first contact (required)")
		token       = fs.String("token", os.Getenv("STRAIT_TOKEN"), "single-use registration token (default $STRAIT_TOKEN)")
		tokenFile   = fs.String("token-file", "", "file holding the registration token")
		dataDir     = fs.String("data-dir", "", "directory keeping the SVID across restarts")
		instance    = fs.String("instance", "", "instance name, unique in the cluster (required)")
		service     = fs.String("service", "", "service this workload serves (required)")
		namespace   = fs.String("namespace", "default", "namespace of the workload")
		protocol    = fs.String("protocol", "http", "protocol of the service: http or tcp")
		region      = fs.String("region", "", "locality region")
		zone        = fs.String("zone", "", "locality zone")
		inbound     = fs.String("inbound", "127.0.0.1:15006", "inbound mTLS listen address")
		advertise   = fs.String("advertise", "", "address peers use to reach the inbound listener (default: the bound inbound address)")
		app         = fs.String("app", "", "the application's host:port (required)")
		admin       = fs.String("admin", "127.0.0.1:15000", "admin listen address (/metrics, /ready, /config_dump); empty disables")
		workloadAPI = fs.String("workload-api", "", "Unix socket path for the SPIFFE Workload API; empty disables")
		addrFile    = fs.String("addresses-file", "", "write the bound addresses as JSON to this file once listening")
		logLevel    = fs.String("log-level", "info", "debug, info, warn or error")
		showVersion = fs.Bool("version", false, "print the version and exit")
		concurrency = fs.Int("concurrency", 1, "OS threads running Go code at once (GOMAXPROCS); one is fastest per request for a sidecar beside its app (make bench), 0 means one per CPU")
		releasePgs  = fs.Bool("release-binary-pages", true, "once start-up is over, and again after each quiet spell longer than the connection pools' 60s idle timeout, unmap the binary's code and read-only data, so the resident set stops counting pages not in use; they stay in the page cache (Linux only)")
		keepAwake   = fs.Bool("keep-sysmon-awake", true, "keep the Go runtime's monitor thread out of its deep sleep (GODEBUG=schedtrace, set by starting over at once): about half the CPU per request under load, for ~100 wake-ups/s when idle; see internal/sysmonwake")
		profiling   = fs.Bool("profiling", os.Getenv("STRAIT_PROXY_PROFILING") == "1", "serve CPU and heap profiles on the admin port (/debug/pprof/profile, /debug/pprof/heap)")
	)
	ups := upstreams{}
	fs.Var(ups, "upstream", "SERVICE=HOST:PORT: a local listener for an upstream service (repeatable)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *showVersion {
		v := "devel"
		if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
			v = bi.Main.Version
		}
		fmt.Fprintln(stdout, "strait-proxy", v)
		return 0
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "strait-proxy: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if *concurrency < 0 {
		fmt.Fprintln(stderr, "strait-proxy: --concurrency must be 0 or more")
		return 2
	}
	if *concurrency > 0 && os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(*concurrency)
	}
	if !*profiling {
		// No heap profile is served: the runtime need not sample one (its
		// bucket table alone is over a megabyte of address space).
		runtime.MemProfileRate = 0
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(stderr, "strait-proxy: --log-level: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "strait-proxy: "+format+"\n", a...)
		return 2
	}
	if *td == "" {
		return fail("--trust-domain is required")
	}
	trustDomain, err := identity.ParseTrustDomain(*td)
	if err != nil {
		return fail("--trust-domain: %v", err)
	}
	if *bundlePath == "" {
		return fail("--trust-bundle is required")
	}
	pemBytes, err := os.ReadFile(*bundlePath)
	if err != nil {
		return fail("--trust-bundle: %v", err)
	}
	b, err := bundle.ParsePEM(trustDomain, 0, pemBytes)
	if err != nil {
		return fail("--trust-bundle %s: %v", *bundlePath, err)
	}
	var proto controlplanev1.Protocol
	switch *protocol {
	case "http":
		proto = controlplanev1.Protocol_PROTOCOL_HTTP
	case "tcp":
		proto = controlplanev1.Protocol_PROTOCOL_TCP
	default:
		return fail("--protocol: want http or tcp, got %q", *protocol)
	}
	// A signal caught so far would be lost with the process image.
	if *keepAwake && startOver != nil && ctx.Err() == nil {
		if err := startOver(); err != nil {
			log.Warn("keep-sysmon-awake: running on without it", "err", err)
		}
	}
	sc, err := proxy.New(proxy.Config{
		TrustDomain: trustDomain, ControlPlane: *cp, TrustBundle: b, Token: *token, TokenFile: *tokenFile,
		DataDir: *dataDir, Instance: *instance, Service: *service, Namespace: *namespace, Protocol: proto,
		Region: *region, Zone: *zone, Inbound: *inbound, Advertise: *advertise, App: *app, Upstreams: ups,
		Admin: *admin, WorkloadAPI: *workloadAPI, Logger: log, Profiling: *profiling,
		ReleaseBinaryPages: *releasePgs,
	})
	if err != nil {
		return fail("%v", err)
	}
	if *addrFile != "" {
		go func() {
			select {
			case <-sc.Started():
			case <-ctx.Done():
				return
			}
			data, _ := json.Marshal(sc.Addrs())
			if err := atomicfile.WriteFile(*addrFile, data, 0o644); err != nil {
				log.Error("write addresses file", "err", err)
			}
		}()
	}
	if err := sc.Run(ctx); err != nil {
		fmt.Fprintf(stderr, "strait-proxy: %v\n", err)
		return 1
	}
	return 0
}
