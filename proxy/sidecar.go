package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/client"
	"github.com/straitmesh/strait/internal/exepages"
	"github.com/straitmesh/strait/internal/profiling"
	"github.com/straitmesh/strait/proxy/balance"
	"github.com/straitmesh/strait/proxy/workloadapi"
)

// Config configures a sidecar. Zero values mean what each field says.
type Config struct {
	// TrustDomain of the mesh. Required.
	TrustDomain spiffeid.TrustDomain
	// ControlPlane is the control plane's host:port. Required.
	ControlPlane string
	// TrustBundle verifies the control plane before the first Certify.
	// Required; later bundles come from the control plane.
	TrustBundle *bundle.Bundle
	// Token is the single-use registration token; TokenFile names a file
	// holding it. One is required unless DataDir holds a valid SVID.
	Token, TokenFile string
	// DataDir keeps the SVID across restarts. Empty keeps nothing.
	DataDir string
	// Instance, Service and Namespace name the workload. Required.
	Instance, Service, Namespace string
	// Protocol the service speaks; unspecified means HTTP.
	Protocol controlplanev1.Protocol
	// Region and Zone place the instance.
	Region, Zone string
	// Inbound is the mTLS listen address. Required.
	Inbound string
	// Advertise is the address registered for peers; empty means the
	// inbound listener's address.
	Advertise string
	// App is the application's host:port. Required.
	App string
	// Upstreams maps an upstream service to its local listen address.
	Upstreams map[string]string
	// Admin is the admin listen address (/metrics, /ready, /config_dump);
	// empty disables it.
	Admin string
	// WorkloadAPI is the Unix socket path of the SPIFFE Workload API;
	// empty disables it.
	WorkloadAPI string
	// HealthInterval is how often the app is probed and health reported;
	// zero means 5s.
	HealthInterval time.Duration
	// Clock is the time source; nil means time.Now.
	Clock func() time.Time
	// Logger; nil discards.
	Logger *slog.Logger
	// Registry receives the metrics and is served on /metrics; nil means a
	// new registry with the Go and process collectors.
	Registry *prometheus.Registry
	// ReleaseBinaryPages unmaps the binary's code and read-only data once
	// start-up is over (the first quiet spell), so that its resident set
	// stops counting the pages only initialisation used, and again after
	// each quiet spell that outlasts the connection pools' idle timeout:
	// see idleReleases and internal/exepages. Linux only.
	ReleaseBinaryPages bool
	// Profiling serves CPU, heap and goroutine profiles on the admin port
	// (see package profiling).
	Profiling bool
}

func (c *Config) token() (string, error) {
	if c.Token != "" && c.TokenFile != "" {
		return "", errors.New("proxy: give the registration token once: --token (or $STRAIT_TOKEN) or --token-file, not both")
	}
	if c.Token != "" {
		return c.Token, nil
	}
	if c.TokenFile == "" {
		return "", errors.New("proxy: no SVID saved and no registration token given (--token or --token-file)")
	}
	b, err := os.ReadFile(c.TokenFile)
	if err != nil {
		return "", fmt.Errorf("proxy: read token: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

func (c *Config) protocol() controlplanev1.Protocol {
	if c.Protocol == controlplanev1.Protocol_PROTOCOL_UNSPECIFIED {
		return controlplanev1.Protocol_PROTOCOL_HTTP
	}
	return c.Protocol
}

func (c *Config) upstreamNames() []string {
	var names []string
	for n := range c.Upstreams {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

func (c *Config) validate() error {
	var missing []string
	for name, v := range map[string]string{"control plane address": c.ControlPlane, "instance": c.Instance, "service": c.Service,
		"namespace": c.Namespace, "inbound address": c.Inbound, "application address": c.App} {
		if v == "" {
			missing = append(missing, name)
		}
	}
	if c.TrustDomain.IsZero() {
		missing = append(missing, "trust domain")
	}
	if c.TrustBundle == nil {
		missing = append(missing, "trust bundle")
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		return fmt.Errorf("proxy: missing %s", strings.Join(missing, ", "))
	}
	if c.TrustBundle.TrustDomain() != c.TrustDomain {
		return fmt.Errorf("proxy: trust bundle is for %s, not %s", c.TrustBundle.TrustDomain(), c.TrustDomain)
	}
	for name, addr := range c.Upstreams {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return fmt.Errorf("proxy: upstream %s: listen address %q: %w", name, addr, err)
		}
	}
	return nil
}

// Sidecar is one workload's proxy.
type Sidecar struct {
	cfg      Config
	creds    *Credentials
	metrics  *Metrics
	registry *prometheus.Registry
	log      *slog.Logger
	in       *inbound
	out      *outbound
	agent    *agent
	wl       *workloadapi.Store
	ready    atomic.Bool
	addrs    atomic.Pointer[Addrs]
	started  chan struct{}
}

// Addrs are the sidecar's bound addresses, known once Run has bound them.
type Addrs struct {
	Inbound   string            `json:"inbound"`
	Admin     string            `json:"admin,omitempty"`
	Upstreams map[string]string `json:"upstreams,omitempty"`
}

// New validates cfg and returns a sidecar; it does no I/O.
func New(cfg Config) (*Sidecar, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.HealthInterval <= 0 {
		cfg.HealthInterval = 5 * time.Second
	}
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
		cfg.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	creds, err := NewCredentials(cfg.TrustDomain, cfg.Clock)
	if err != nil {
		return nil, err
	}
	if _, err := creds.SetBundle(cfg.TrustBundle); err != nil {
		return nil, err
	}
	s := &Sidecar{cfg: cfg, creds: creds, registry: cfg.Registry, log: cfg.Logger, wl: workloadapi.NewStore(), started: make(chan struct{})}
	s.metrics = NewMetrics(cfg.Registry)
	s.in = newInbound(creds, s.metrics, cfg.Logger, cfg.Service, cfg.App, cfg.protocol() == controlplanev1.Protocol_PROTOCOL_TCP)
	s.out = newOutbound(creds, s.metrics, cfg.Logger, cfg.Clock)
	s.agent = newAgent(&s.cfg, creds, s.metrics, s.applySnapshot)
	s.agent.ejections = s.ejections
	return s, nil
}

// Started is closed once the listeners are bound (Addrs is then valid).
func (s *Sidecar) Started() <-chan struct{} { return s.started }

// Addrs returns the bound addresses (nil before Started).
func (s *Sidecar) Addrs() *Addrs { return s.addrs.Load() }

// Ready reports whether the sidecar has an SVID and a snapshot, and its
// instance is registered.
func (s *Sidecar) Ready() bool {
	return s.ready.Load() && s.agent.registered.Load() && s.cfg.Clock().Before(s.creds.Expiry())
}

// Snapshot returns the configuration in force (nil before the first).
func (s *Sidecar) Snapshot() *controlplanev1.Snapshot { return s.agent.lastSnap.Load() }

// Credentials exposes the current SVID and bundle (for tests and tools).
func (s *Sidecar) Credentials() *Credentials { return s.creds }

// applySnapshot checks a snapshot whole, then installs it.
func (s *Sidecar) applySnapshot(snap *controlplanev1.Snapshot) error {
	var b *bundle.Bundle
	if snap.GetBundle() != nil {
		var err error
		if b, err = client.BundleFromProto(s.cfg.TrustDomain, snap.GetBundle()); err != nil {
			return err
		}
		// Trust is taken even if the routing below is refused: a root
		// removed from the mesh must stop being trusted here, and one
		// added must be trusted before SVIDs under it arrive, whatever
		// a policy this sidecar cannot take says.
		if _, err := s.creds.SetBundle(b); err != nil {
			return err
		}
	}
	for _, svc := range snap.GetServices() {
		if err := lbConfig(svc.GetPolicy(), nil).Validate(); err != nil {
			return &routingRefused{fmt.Errorf("service %s: traffic policy: %w", svc.GetName(), err)}
		}
		for _, ep := range svc.GetEndpoints() {
			if _, err := spiffeid.FromString(ep.GetSpiffeId()); err != nil {
				return &routingRefused{fmt.Errorf("service %s endpoint %s: SPIFFE ID %q: %w", svc.GetName(), ep.GetInstance(), ep.GetSpiffeId(), err)}
			}
			if _, _, err := net.SplitHostPort(ep.GetAddress()); err != nil {
				return &routingRefused{fmt.Errorf("service %s endpoint %s: address %q: %w", svc.GetName(), ep.GetInstance(), ep.GetAddress(), err)}
			}
		}
	}
	z := compileAuthorization(snap.GetAuthorization())
	s.out.apply(snap.GetServices())
	s.in.setPolicy(z)
	s.ready.Store(true)
	return nil
}

// routingRefused is a snapshot refused for its services (a policy or an
// endpoint this sidecar cannot take) after its trust bundle was taken: the
// last good routing and authorization stay in force.
type routingRefused struct{ err error }

func (e *routingRefused) Error() string { return e.err.Error() }
func (e *routingRefused) Unwrap() error { return e.err }

// Run binds the listeners, obtains the SVID, and serves until ctx ends.
func (s *Sidecar) Run(ctx context.Context) error {
	inLn, err := net.Listen("tcp", s.cfg.Inbound)
	if err != nil {
		return fmt.Errorf("proxy: inbound listener: %w", err)
	}
	addrs := &Addrs{Inbound: inLn.Addr().String(), Upstreams: map[string]string{}}
	var closers []net.Listener
	closers = append(closers, inLn)
	closeAll := func() {
		for _, l := range closers {
			l.Close()
		}
	}
	upLns := map[*upstream]net.Listener{}
	for _, name := range s.cfg.upstreamNames() {
		ln, err := net.Listen("tcp", s.cfg.Upstreams[name])
		if err != nil {
			closeAll()
			return fmt.Errorf("proxy: listener for upstream %s: %w", name, err)
		}
		closers = append(closers, ln)
		u, err := s.out.addUpstream(name)
		if err != nil {
			closeAll()
			return err
		}
		upLns[u] = ln
		addrs.Upstreams[name] = ln.Addr().String()
	}
	var adminLn net.Listener
	if s.cfg.Admin != "" {
		if adminLn, err = net.Listen("tcp", s.cfg.Admin); err != nil {
			closeAll()
			return fmt.Errorf("proxy: admin listener: %w", err)
		}
		closers = append(closers, adminLn)
		addrs.Admin = adminLn.Addr().String()
	}
	s.addrs.Store(addrs)
	close(s.started)

	var wlSrv *workloadapi.Server
	if s.cfg.WorkloadAPI != "" {
		if wlSrv, err = workloadapi.New(workloadapi.Config{Source: s.wl, Logger: s.log, Path: s.cfg.WorkloadAPI}); err != nil {
			closeAll()
			return fmt.Errorf("proxy: workload API: %w", err)
		}
	}
	g, ctx := errgroup.WithContext(ctx)
	if adminLn != nil {
		g.Go(func() error {
			return serveUntil(ctx, &http.Server{Handler: s.adminHandler(), ReadHeaderTimeout: 10 * time.Second}, adminLn)
		})
	}
	if err := s.agent.bootstrap(ctx); err != nil {
		closeAll()
		g.Wait()
		return err
	}
	s.syncWorkloadAPI()
	advertise := s.cfg.Advertise
	if advertise == "" {
		advertise = addrs.Inbound
	}
	g.Go(func() error { return s.in.run(ctx, inLn) })
	for u, ln := range upLns {
		g.Go(func() error { return u.run(ctx, ln) })
	}
	g.Go(func() error { return s.agent.id.RenewLoop(ctx) })
	g.Go(func() error { return s.agent.watchLoop(ctx) })
	g.Go(func() error { return s.agent.healthLoop(ctx, advertise) })
	g.Go(func() error { return s.credentialsLoop(ctx) })
	g.Go(func() error { return s.idleLoop(ctx) })
	if wlSrv != nil {
		g.Go(func() error { return wlSrv.Run(ctx) })
	}
	err = g.Wait()
	s.agent.id.Close()
	return err
}

// credentialsLoop reacts to SVID and bundle changes: the Workload API
// store is updated, open inbound connections are re-checked, and the
// control plane is told soon (a rotation waits for every node to report).
func (s *Sidecar) credentialsLoop(ctx context.Context) error {
	prev := s.creds.Bundle()
	issuer := ""
	if sv := s.creds.SVID(); sv != nil {
		issuer = svid.IssuerFingerprint(sv.Certificates)
	}
	ch := s.creds.Changed()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-ch:
		}
		// Re-armed before the state is read: a change that lands during
		// the work below wakes the next round instead of waiting for
		// another one.
		ch = s.creds.Changed()
		s.agent.kickReport()
		s.syncWorkloadAPI()
		s.in.recheck()
		if sv := s.creds.SVID(); sv != nil {
			if cur := svid.IssuerFingerprint(sv.Certificates); cur != issuer {
				// Re-issued from another intermediate (a root rotation):
				// pooled connections move to the new chain before retire.
				if issuer != "" {
					s.out.svidMoved()
				}
				issuer = cur
			}
		}
		if cur := s.creds.Bundle(); rootRemoved(prev, cur) {
			// Upstream connections were verified against a root that is
			// gone: pooled ones are replaced, opaque relays re-checked.
			s.out.trustShrank()
			prev = cur
		} else if cur != nil {
			prev = cur
		}
	}
}

// idleLoop hands memory back to the OS once traffic stops: after a burst
// the Go heap keeps what it grew to, and a sidecar sits idle most of its
// life (see idleReleases for when).
func (s *Sidecar) idleLoop(ctx context.Context) error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	r := idleReleases{last: s.metrics.activity.Load(), pages: s.cfg.ReleaseBinaryPages,
		longQuiet: int(poolIdleTimeout/time.Second) + 1}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		heap, pages := r.tick(s.metrics.activity.Load())
		if pages {
			switch rel, err := exepages.Release(); {
			case err != nil:
				s.log.Warn("release the binary's start-up pages", "err", err)
			case rel.Mappings == 0 && runtime.GOOS == "linux":
				s.log.Info("release the binary's start-up pages: no read-only mapping of the binary found to release")
			default:
				s.log.Debug("released the binary's start-up pages", "mappings", rel.Mappings, "resident_bytes", rel.Resident)
			}
		}
		if heap {
			debug.FreeOSMemory()
		}
	}
}

// idleReleases decides, one tick a second, when the sidecar hands memory
// back. Three quiet ticks after activity, or after start-up, release the
// free heap. The binary's pages (when pages is set) go back twice:
//
//   - at the first such release, which drops what only start-up used;
//   - once in each quiet spell that outlasts the connection pools' idle
//     timeout (longQuiet ticks). By then the pooled connections are closed
//     and the next request dials them again, TLS handshakes included,
//     which dwarfs the few dozen page faults (about 65 µs a sidecar,
//     measured) that map the pages it uses back in. Releasing them after
//     every burst instead would add those faults to requests that reuse
//     warm connections.
type idleReleases struct {
	last      uint64 // activity counter at the last tick
	quiet     int    // ticks without activity
	pages     bool   // release the binary's pages
	startedUp bool   // the first quiet spell after start-up came
	longQuiet int    // ticks of quiet before the second release; 0: none
}

func (r *idleReleases) tick(activity uint64) (heap, pages bool) {
	if activity != r.last {
		r.last, r.quiet = activity, 0
		return false, false
	}
	r.quiet++
	switch {
	case r.quiet == 3:
		pages = r.pages && !r.startedUp
		r.startedUp = true
		return true, pages
	case r.quiet == r.longQuiet && r.startedUp:
		return false, r.pages
	}
	return false, false
}

// rootRemoved reports whether next lacks a root that prev had.
func rootRemoved(prev, next *bundle.Bundle) bool {
	if prev == nil || next == nil {
		return false
	}
	for _, r := range prev.Roots() {
		if !next.Contains(r) {
			return true
		}
	}
	return false
}

// syncWorkloadAPI puts the SVID and bundle held into the Workload API store
// in one update: a new SVID and a new bundle seen together (a re-issue under
// a new root) never reach the app as the new SVID with the old bundle.
func (s *Sidecar) syncWorkloadAPI() {
	sv := s.creds.SVID()
	if sv != nil {
		s.in.selfID.Store(sv.ID.String())
	}
	var xb *x509bundle.Bundle
	if b := s.creds.Bundle(); b != nil {
		xb, _ = b.GetX509BundleForTrustDomain(s.cfg.TrustDomain)
	}
	s.wl.Set(sv, xb)
}

func (s *Sidecar) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, r *http.Request) {
		if !s.Ready() {
			msg := "not ready: waiting for an SVID, a configuration snapshot and registration"
			if exp := s.creds.Expiry(); !exp.IsZero() && !s.cfg.Clock().Before(exp) {
				msg = "not ready: the SVID expired at " + exp.UTC().Format(time.RFC3339) + " and could not be renewed (control plane unreachable?); if it stays away, restart with a new registration token"
			}
			http.Error(w, msg, http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ready\n")
	})
	if s.cfg.Profiling {
		profiling.Register(mux)
	}
	mux.HandleFunc("GET /config_dump", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(s.configDump())
	})
	return mux
}

// maxReportedEjections bounds the ejections in one health report (the
// control plane refuses more than 256).
const maxReportedEjections = 256

// ejections lists the endpoints outlier detection ejects now, by upstream.
func (s *Sidecar) ejections() []*controlplanev1.Ejection {
	s.out.mu.Lock()
	names := slices.Sorted(maps.Keys(s.out.upstreams))
	ups := make([]*upstream, 0, len(names))
	for _, n := range names {
		ups = append(ups, s.out.upstreams[n])
	}
	s.out.mu.Unlock()
	var out []*controlplanev1.Ejection
	for i, u := range ups {
		for _, st := range u.lb.Stats() {
			if st.Ejected && len(out) < maxReportedEjections {
				out = append(out, &controlplanev1.Ejection{Service: names[i], Endpoint: st.Key, Until: timestamppb.New(st.EjectedUntil)})
			}
		}
	}
	return out
}

// UpstreamStats returns the live balancer state of an upstream's endpoints.
func (s *Sidecar) UpstreamStats(service string) []balance.EndpointStats {
	s.out.mu.Lock()
	u := s.out.upstreams[service]
	s.out.mu.Unlock()
	if u == nil {
		return nil
	}
	return u.lb.Stats()
}

// configDump is what /config_dump shows: identity, trust, the snapshot in
// force and the live state of every upstream's endpoints.
func (s *Sidecar) configDump() map[string]any {
	d := map[string]any{"ready": s.Ready(), "addresses": s.Addrs()}
	if sv := s.creds.SVID(); sv != nil {
		d["svid"] = map[string]any{"spiffe_id": sv.ID.String(), "not_after": sv.Certificates[0].NotAfter.UTC(), "serial": sv.Certificates[0].SerialNumber.String(),
			"issuer": svid.IssuerFingerprint(sv.Certificates)}
		if at := s.agent.id.PendingReissue(); !at.IsZero() {
			d["svid_reissue_at"] = at.UTC()
		}
	}
	if b := s.creds.Bundle(); b != nil {
		d["bundle"] = map[string]any{"sequence": b.Sequence(), "digest": b.Digest(), "roots": len(b.Roots())}
	}
	if snap := s.agent.lastSnap.Load(); snap != nil {
		raw, _ := protojson.Marshal(snap)
		d["snapshot"] = json.RawMessage(raw)
	}
	ups := map[string]any{}
	s.out.mu.Lock()
	for name, u := range s.out.upstreams {
		ups[name] = u.lb.Stats()
	}
	s.out.mu.Unlock()
	d["upstreams"] = ups
	return d
}
