package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/gateway/agent"
	"github.com/straitmesh/strait/internal/atomicfile"
	"github.com/straitmesh/strait/internal/profiling"
	"github.com/straitmesh/strait/proxy"
)

func newGatewayCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "gateway", Short: "Run a cluster's east-west gateway"}
	cmd.AddCommand(newGatewayRunCmd(g))
	return cmd
}

// gatewayAddrs is what --addresses-file receives.
type gatewayAddrs struct {
	Peer  string `json:"peer"`
	Entry string `json:"entry"`
	Admin string `json:"admin,omitempty"`
}

func newGatewayRunCmd(g *globals) *cobra.Command {
	var cluster, tdName, cp, dir, peerListen, entryListen, addrFile, level, admin string
	var advertise []string
	var serveProfiles, keepAwake bool
	var concurrency int
	cmd := &cobra.Command{
		Use:   "run --cluster NAME --trust-domain TD --control-plane ADDR --data-dir DIR",
		Short: "Serve the gateway: QUIC to peer gateways, TLS entry for local sidecars",
		Long: `Serve the cluster's east-west gateway until interrupted.

It takes its first credentials from DIR (svid.pem, svid-key.pem, bundle.pem, as
written by ` + "`strait controlplane gateway-credentials`" + `) and renews them from the
control plane, from which it also learns links and exports. Peers reach it over
QUIC on --peer-listen; local sidecars reach peers through it on --entry-listen.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cluster == "" || tdName == "" || cp == "" || dir == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--cluster, --trust-domain, --control-plane and --data-dir are required")}
			}
			if err := identity.ValidateClusterName(cluster); err != nil {
				return usageError{cmd: cmd.CommandPath(), err: err}
			}
			td, err := identity.ParseTrustDomain(tdName)
			if err != nil {
				return usageError{cmd: cmd.CommandPath(), err: err}
			}
			var lv slog.Level
			if err := lv.UnmarshalText([]byte(level)); err != nil {
				return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("--log-level: %w", err)}
			}
			if concurrency < 0 {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--concurrency must be 0 or more")}
			}
			if serveProfiles && admin == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--profiling needs --admin")}
			}
			log := slog.New(slog.NewTextHandler(g.stderr, &slog.HandlerOptions{Level: lv}))
			// A signal caught so far would be lost with the process image.
			if keepAwake && startOver != nil && cmd.Context().Err() == nil {
				if err := startOver(); err != nil {
					log.Warn("keep-sysmon-awake: running on without it", "err", err)
				}
			}
			if env := os.Getenv("GOMAXPROCS"); concurrency > 0 && env != "" {
				log.Info("GOMAXPROCS in the environment overrides --concurrency", "GOMAXPROCS", env, "concurrency", concurrency)
			} else if concurrency > 0 {
				runtime.GOMAXPROCS(concurrency)
			}
			creds, err := proxy.NewCredentials(td, nil)
			if err != nil {
				return err
			}
			raw, err := os.ReadFile(filepath.Join(dir, "bundle.pem"))
			if err != nil {
				return fmt.Errorf("trust bundle: %w", err)
			}
			b, err := bundle.ParsePEM(td, 0, raw)
			if err != nil {
				return fmt.Errorf("trust bundle %s: %w", filepath.Join(dir, "bundle.pem"), err)
			}
			if _, err := creds.SetBundle(b); err != nil {
				return err
			}
			reg := prometheus.NewRegistry()
			reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
			var ready atomic.Bool
			adminAddr := ""
			if admin != "" {
				ln, err := net.Listen("tcp", admin)
				if err != nil {
					return fmt.Errorf("--admin: %w", err)
				}
				adminAddr = ln.Addr().String()
				mux := http.NewServeMux()
				mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
				mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
					if !ready.Load() {
						http.Error(w, "not ready", http.StatusServiceUnavailable)
						return
					}
					fmt.Fprintln(w, "ready")
				})
				if serveProfiles {
					profiling.Register(mux)
				}
				srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
				go srv.Serve(ln)
				defer srv.Close()
			}
			return agent.Run(cmd.Context(), agent.Config{
				Cluster: cluster, TrustDomain: td, ControlPlane: cp, Creds: creds, DataDir: dir,
				PeerListen: peerListen, EntryListen: entryListen, Advertise: advertise, Logger: log, Registerer: reg,
				Ready: func(peer, entry string) {
					ready.Store(true)
					if addrFile == "" {
						return
					}
					out, _ := json.Marshal(gatewayAddrs{Peer: peer, Entry: entry, Admin: adminAddr})
					if err := atomicfile.WriteFile(addrFile, out, 0o644); err != nil {
						log.Error("writing the addresses file failed", "err", err)
					}
				},
			})
		},
	}
	cmd.Flags().StringVar(&cluster, "cluster", "", "this cluster's name")
	cmd.Flags().StringVar(&tdName, "trust-domain", "", "the mesh's trust domain")
	cmd.Flags().StringVar(&cp, "control-plane", "", "this cluster's control plane (host:port)")
	cmd.Flags().StringVar(&dir, "data-dir", "", "the gateway's credentials directory")
	cmd.Flags().StringVar(&peerListen, "peer-listen", "127.0.0.1:15443", "UDP address for QUIC from peer gateways")
	cmd.Flags().StringVar(&entryListen, "entry-listen", "127.0.0.1:15444", "TCP address for local sidecars")
	cmd.Flags().StringSliceVar(&advertise, "advertise", nil, "QUIC addresses peers should dial (default: the bound --peer-listen)")
	cmd.Flags().StringVar(&addrFile, "addresses-file", "", "write the bound addresses here as JSON once serving")
	cmd.Flags().StringVar(&level, "log-level", "info", "debug, info, warn or error")
	cmd.Flags().StringVar(&admin, "admin", "", "admin listen address (/metrics, /ready, and with --profiling /debug/pprof/profile, /heap and /goroutine); empty: none")
	cmd.Flags().IntVar(&concurrency, "concurrency", 0, "OS threads running Go code at once (GOMAXPROCS); 0: Go's default (the CPUs, or the container's CPU limit); "+
		"a GOMAXPROCS environment variable wins; strait dev up sets 1")
	cmd.Flags().BoolVar(&keepAwake, "keep-sysmon-awake", true, "keep the Go runtime's monitor thread out of its deep sleep (GODEBUG=schedtrace, set by starting over at once): less CPU per tunnelled request, for ~100 wake-ups/s when idle; see internal/sysmonwake")
	cmd.Flags().BoolVar(&serveProfiles, "profiling", false, "serve CPU, heap and goroutine profiles on --admin, without authentication: keep --admin on loopback")
	return cmd
}
