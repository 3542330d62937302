package e2e

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	"github.com/straitmesh/strait/internal/atomicfile"
	"github.com/straitmesh/strait/internal/sysmonwake"
)

// relayEnv makes the test binary a byte relay process (see init): its value
// is the path of the relay's JSON configuration.
const relayEnv = "STRAIT_BENCH_RELAY"

// relayConfig configures one side of the Go relay pair of the proxy bench.
type relayConfig struct {
	Server      bool   // mTLS in, plain TCP out; else plain TCP in, mTLS out
	Target      string // where each accepted connection is relayed to
	AddrFile    string // the listener's address is written here
	TrustDomain string
	Cert, Key   string // the SVID presented
	Bundle      string // PEM bundle the peer's SVID is verified against
	PeerID      string // the client side's required server identity
}

func init() {
	if p := os.Getenv(relayEnv); p != "" {
		if err := runRelay(p); err != nil {
			fmt.Fprintln(os.Stderr, "relay:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
}

// runRelay is a Go mTLS proxy stripped to the bone: a goroutine pair per
// connection copying bytes (io.Copy) between a plain TCP side and an mTLS
// side, with the same SVID verification as the sidecar and the sidecar's
// default of one thread running Go code. No HTTP parsing, balancing,
// policy or metrics: it is the floor for a goroutine-per-connection Go
// proxy on this machine, against which the sidecar's HTTP work and nginx
// can be read.
func runRelay(cfgPath string) error {
	runtime.GOMAXPROCS(1)
	raw, err := os.ReadFile(cfgPath)
	if err != nil {
		return err
	}
	var cfg relayConfig
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return err
	}
	creds, err := loadCredentials(cfg.TrustDomain, cfg.Cert, cfg.Key, cfg.Bundle)
	if err != nil {
		return err
	}
	var dial func() (net.Conn, error)
	var accept func(net.Conn) (net.Conn, error)
	if cfg.Server {
		conf := creds.ServerTLS(nil, creds.Verifier().VerifyConnection(svid.RoleClient, nil))
		accept = func(c net.Conn) (net.Conn, error) {
			tc := tls.Server(c, conf)
			return tc, tc.Handshake()
		}
		dial = func() (net.Conn, error) { return net.Dial("tcp", cfg.Target) }
	} else {
		want, err := spiffeid.FromString(cfg.PeerID)
		if err != nil {
			return err
		}
		conf := creds.ClientTLS(nil, creds.Verifier().VerifyConnection(svid.RoleServer, func(id spiffeid.ID) error {
			if id != want {
				return fmt.Errorf("server presented %s, want %s", id, want)
			}
			return nil
		}))
		conf.ClientSessionCache = tls.NewLRUClientSessionCache(64)
		accept = func(c net.Conn) (net.Conn, error) { return c, nil }
		dial = func() (net.Conn, error) { return tls.Dial("tcp", cfg.Target, conf) }
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(cfg.AddrFile, []byte(ln.Addr().String()), 0o644); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute) // a bound, should the test not stop it
	defer cancel()
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			return nil
		}
		go func() {
			defer c.Close()
			in, err := accept(c)
			if err != nil {
				return
			}
			out, err := dial()
			if err != nil {
				return
			}
			defer out.Close()
			done := make(chan struct{})
			go func() {
				io.Copy(out, in)
				out.Close()
				close(done)
			}()
			io.Copy(in, out)
			in.Close()
			<-done
		}()
	}
}

// startRelayPair runs the Go relay pair (this test binary re-executed
// twice) with the same SVIDs and bundle as the nginx pair.
func startRelayPair(t *testing.T, c *cluster, app, dir string) *benchPath {
	t.Helper()
	p := &benchPath{name: "go relay pair"}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	pems := writeBenchSVIDs(t, c, dir)
	backendID, err := identity.Workload(c.td, "default", "backend")
	if err != nil {
		t.Fatal(err)
	}
	start := func(name string, cfg relayConfig) (*benchProc, string) {
		cfg.TrustDomain, cfg.Bundle = c.td.Name(), c.dir.BundlePEMPath()
		cfg.AddrFile = filepath.Join(dir, name+".addr")
		raw, _ := json.Marshal(cfg)
		cfgPath := filepath.Join(dir, name+".json")
		if err := os.WriteFile(cfgPath, raw, 0o600); err != nil {
			t.Fatal(err)
		}
		self, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		// The relay runs as the sidecar does, sysmon kept awake (see
		// internal/sysmonwake): a floor under the same runtime setting.
		prevDebug, hadDebug := os.LookupEnv("GODEBUG")
		env, _ := sysmonwake.Env(os.Environ())
		for _, kv := range env {
			if v, ok := strings.CutPrefix(kv, "GODEBUG="); ok {
				t.Setenv("GODEBUG", v)
			}
		}
		t.Setenv(relayEnv, cfgPath) // inherited by this start only: both are reset below
		pr := startProc(t, "relay "+name, filepath.Join(dir, name+".log"), self, false, "-test.run=^$")
		os.Unsetenv(relayEnv)
		if hadDebug {
			os.Setenv("GODEBUG", prevDebug)
		} else {
			os.Unsetenv("GODEBUG")
		}
		var addr string
		if err := waitFor(pr, "relay "+name+" listening", func() bool {
			b, err := os.ReadFile(cfg.AddrFile)
			addr = string(b)
			return err == nil && addr != ""
		}); err != nil {
			t.Fatalf("relay %s: %v", name, err)
		}
		return pr, addr
	}
	server, saddr := start("server", relayConfig{Server: true, Target: app, Cert: pems["backend"][0], Key: pems["backend"][1]})
	client, caddr := start("client", relayConfig{Target: saddr, Cert: pems["frontend"][0], Key: pems["frontend"][1], PeerID: backendID.String()})
	p.url = "http://" + caddr + "/"
	p.procs = [2]*benchProc{client, server}
	p.note = "a floor, not a proxy: bytes copied between TCP and mTLS (SVIDs verified as the sidecar does, one thread running Go code, sysmon kept awake), no HTTP parsing, balancing, policy or metrics"
	return p
}
