package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/registry"
	"github.com/straitmesh/strait/controlplane/store"
	"github.com/straitmesh/strait/internal/clock"
)

// Config configures a Server. Zero values mean what each field says.
type Config struct {
	// Cluster is this control plane's cluster name. Required.
	Cluster string
	// TrustDomain of the mesh. Required.
	TrustDomain spiffeid.TrustDomain
	// Issuer signs SVIDs with the cluster's intermediate. Required.
	Issuer Issuer
	// Bundle returns the current trust bundle. Required.
	Bundle func() *bundle.Bundle
	// Store holds resources, tokens and instances. Required.
	Store *store.Store
	// Registry is the local service registry. Required.
	Registry *registry.Local
	// RootAuthority, set on the root authority's cluster only, signs the
	// intermediates of clusters that join pending.
	RootAuthority IntermediateSigner
	// Trust is the cluster's changing trust material during root
	// rotations; nil takes no part in them (the bundle still comes from
	// Bundle).
	Trust Trust
	// RootCA, on the root authority's cluster only, takes rotation steps.
	RootCA RootCA
	// ReissueWindow spreads nodes' re-issuance after the cluster's
	// intermediate changes; zero means 30s.
	ReissueWindow time.Duration
	// Authenticators check first-contact credentials; nil means the
	// registration-token authenticator on Store.
	Authenticators []Authenticator
	// IntermediateExpiry is shown in Status.
	IntermediateExpiry time.Time
	// SVIDTTL is the lifetime of SVIDs issued to workloads; zero means the
	// CA's default (1h).
	SVIDTTL time.Duration
	// Debounce gathers changes before snapshots are pushed; zero means 100ms.
	Debounce time.Duration
	// FederationGrace is how long after a start, with links stored, the
	// control plane waits for a gateway's report before it sends sidecars
	// snapshots (without it, they would lose their peers' endpoints until
	// the gateway reconnects); zero means 10s.
	FederationGrace time.Duration
	// Clock; nil means time.Now.
	Clock func() time.Time
	// Logger; nil discards.
	Logger *slog.Logger
	// Registerer receives the metrics; nil means none are exported.
	Registerer prometheus.Registerer
}

// Server is a cluster's control plane API.
type Server struct {
	cfg      Config
	log      *slog.Logger
	verifier *svid.Verifier
	metrics  *metrics
	grpc     *grpc.Server
	cert     atomic.Pointer[tls.Certificate]
	// ownIssuer is the fingerprint of the certificate that signed cert's
	// leaf; renewOwn asks ownSVIDLoop to renew now.
	ownIssuer atomic.Pointer[string]
	renewOwn  chan struct{}
	selfID    spiffeid.ID

	mu      sync.Mutex
	world   *world
	version uint64
	nodes   map[string]*node
	// gateways are this cluster's live gateways, by node name.
	gateways map[string]*gatewayNode
	// rttKept is the RTT failover tiers are ordered by, per peer (see
	// steadyRTT).
	rttKept map[string]time.Duration
	fedWake chan struct{}
	// logged is the last message of each logOnce key.
	logged map[string]string
	// started is when Run began (see federationWarmLocked).
	started time.Time
	// gone: when each node's last stream closed, until one reopens; by
	// nodeKey (name and identity).
	gone map[string]time.Time
	// autoMu serializes changes to the automatic rotation's record: the
	// loop's step (read, step, write) and AutoRotate's start and cancel.
	autoMu sync.Mutex
}

// maxGone bounds the closed nodes remembered.
const maxGone = 65536

type metrics struct {
	authFailures *prometheus.CounterVec
	issued       *prometheus.CounterVec
	pushes       prometheus.Counter
	watchers     prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "strait_controlplane_auth_failures_total", Help: "Callers whose SVID did not verify, by reason."}, []string{"reason"}),
		issued:       prometheus.NewCounterVec(prometheus.CounterOpts{Name: "strait_controlplane_svids_issued_total", Help: "SVIDs issued, by how the caller proved its identity (token, svid)."}, []string{"proof"}),
		pushes:       prometheus.NewCounter(prometheus.CounterOpts{Name: "strait_controlplane_snapshot_pushes_total", Help: "Snapshots sent to sidecars."}),
		watchers:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "strait_controlplane_watchers", Help: "Open configuration streams."}),
	}
	if reg != nil {
		reg.MustRegister(m.authFailures, m.issued, m.pushes, m.watchers)
	}
	return m
}

// New validates cfg and returns a Server. It does no I/O.
func New(cfg Config) (*Server, error) {
	switch {
	case cfg.Cluster == "":
		return nil, errors.New("server: cluster name required")
	case cfg.TrustDomain.IsZero():
		return nil, errors.New("server: trust domain required")
	case cfg.Issuer == nil:
		return nil, errors.New("server: issuer required")
	case cfg.Bundle == nil:
		return nil, errors.New("server: bundle source required")
	case cfg.Store == nil:
		return nil, errors.New("server: store required")
	case cfg.Registry == nil:
		return nil, errors.New("server: registry required")
	}
	selfID, err := identity.ControlPlane(cfg.TrustDomain, cfg.Cluster)
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Debounce <= 0 {
		cfg.Debounce = 100 * time.Millisecond
	}
	if cfg.FederationGrace <= 0 {
		cfg.FederationGrace = 10 * time.Second
	}
	if cfg.Authenticators == nil {
		cfg.Authenticators = []Authenticator{&TokenAuthenticator{Store: cfg.Store, TrustDomain: cfg.TrustDomain, Log: cfg.Logger}}
	}
	s := &Server{cfg: cfg, log: cfg.Logger, metrics: newMetrics(cfg.Registerer), selfID: selfID,
		nodes: map[string]*node{}, gateways: map[string]*gatewayNode{}, rttKept: map[string]time.Duration{}, fedWake: make(chan struct{}, 1), renewOwn: make(chan struct{}, 1)}
	s.verifier, err = svid.NewVerifier(svid.VerifierConfig{TrustDomain: cfg.TrustDomain, Bundles: bundleSource{cfg.Bundle}, Clock: cfg.Clock})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// bundleSource reads the current bundle on every verification.
type bundleSource struct{ get func() *bundle.Bundle }

func (b bundleSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	cur := b.get()
	if cur == nil {
		return nil, errors.New("server: no trust bundle")
	}
	return cur.GetX509BundleForTrustDomain(td)
}

// renewOwnSVID issues the control plane's serving SVID.
func (s *Server) renewOwnSVID() (*x509svid.SVID, error) {
	ttl := s.cfg.SVIDTTL
	if ttl <= 0 {
		ttl = defaultSVIDTTL
	}
	sv, err := s.cfg.Issuer.MintSVID(s.selfID, ttl)
	if err != nil {
		return nil, fmt.Errorf("server: issue own SVID: %w", err)
	}
	chain := make([][]byte, 0, len(sv.Certificates))
	for _, c := range sv.Certificates {
		chain = append(chain, c.Raw)
	}
	s.cert.Store(&tls.Certificate{Certificate: chain, PrivateKey: sv.PrivateKey, Leaf: sv.Certificates[0]})
	issuer := svid.IssuerFingerprint(sv.Certificates)
	s.ownIssuer.Store(&issuer)
	s.pokeFederation() // the cluster's rotation report counts the serving SVID
	return sv, nil
}

func (s *Server) tlsConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// A first Certify comes without a client certificate; everything
		// else is refused per RPC unless a valid SVID was presented. The
		// chain is verified per RPC against the current bundle.
		ClientAuth: tls.RequestClientCert,
		NextProtos: []string{"h2"},
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return s.cert.Load(), nil
		},
	}
}

// Run serves on ln until ctx ends, renewing the serving SVID at half life
// and pushing snapshots as the world changes.
func (s *Server) Run(ctx context.Context, ln net.Listener) error {
	s.mu.Lock()
	s.started = s.cfg.Clock()
	s.mu.Unlock()
	sv, err := s.renewOwnSVID()
	if err != nil {
		return err
	}
	if err := s.rebuild(ctx); err != nil {
		return err
	}
	s.grpc = grpc.NewServer(
		grpc.Creds(credentials.NewTLS(s.tlsConfig())),
		grpc.UnaryInterceptor(s.unaryInterceptor),
		grpc.StreamInterceptor(s.streamInterceptor),
		grpc.MaxRecvMsgSize(4<<20),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	controlplanev1.RegisterIdentityServiceServer(s.grpc, identityServer{s: s})
	controlplanev1.RegisterDiscoveryServiceServer(s.grpc, discoveryServer{s: s})
	controlplanev1.RegisterAdminServiceServer(s.grpc, adminServer{s: s})
	controlplanev1.RegisterFederationServiceServer(s.grpc, federationServer{s: s})
	controlplanev1.RegisterRotationServiceServer(s.grpc, rotationServer{s: s})

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, 5)
	wg.Add(4)
	go func() { defer wg.Done(); errc <- s.cfg.Registry.Run(ctx) }()
	go func() { defer wg.Done(); errc <- s.autoLoop(ctx) }()
	go func() { defer wg.Done(); errc <- s.pushLoop(ctx) }()
	go func() { defer wg.Done(); errc <- s.ownSVIDLoop(ctx, sv) }()
	serveErr := make(chan error, 1)
	go func() { serveErr <- s.grpc.Serve(ln) }()
	s.log.Info("control plane serving", "cluster", s.cfg.Cluster, "address", ln.Addr().String(), "spiffe_id", s.selfID.String())
	select {
	case <-ctx.Done():
	case err = <-serveErr:
	case err = <-errc:
	}
	cancel()
	stopped := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		s.grpc.Stop()
	}
	wg.Wait()
	return err
}

// ownSVIDLoop renews the serving SVID at half life, and at once when the
// cluster's intermediate changes (a root rotation re-signed it: rebuild
// sees the serving SVID's issuer is not the intermediate in force and
// signals renewOwn).
func (s *Server) ownSVIDLoop(ctx context.Context, sv *x509svid.SVID) error {
	for {
		if !clock.SleepUntilOr(ctx, s.cfg.Clock, svid.RenewAt(sv.Certificates[0], s.cfg.Clock()), s.renewOwn) {
			return nil
		}
		next, err := s.renewOwnSVID()
		if err != nil {
			s.log.Error("renewing the control plane's SVID failed; retrying", "err", err)
			if !clock.SleepUntil(ctx, s.cfg.Clock, s.cfg.Clock().Add(10*time.Second)) {
				return nil
			}
			continue
		}
		sv = next
	}
}

// toStatus maps errors to gRPC status codes, once, for the whole API.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var code codes.Code
	switch {
	case errors.Is(err, ErrUnauthenticated), errors.Is(err, store.ErrTokenInvalid),
		errors.Is(err, store.ErrTokenExpired), errors.Is(err, store.ErrTokenUsed):
		code = codes.Unauthenticated
	case errors.Is(err, ErrPermissionDenied), errors.Is(err, store.ErrInstanceOwned), errors.Is(err, registry.ErrPermissionDenied):
		code = codes.PermissionDenied
	case errors.Is(err, ErrBadRequest), errors.Is(err, registry.ErrInvalid), errors.Is(err, store.ErrInvalid):
		code = codes.InvalidArgument
	case errors.Is(err, store.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, ErrUnavailable):
		code = codes.Unavailable
	case errors.Is(err, store.ErrLinkExists):
		code = codes.AlreadyExists
	case errors.Is(err, ErrFailedPrecondition):
		code = codes.FailedPrecondition
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	default:
		code = codes.Internal
	}
	// The code says what the sentinel would: the message keeps the rest.
	msg := err.Error()
	for _, sentinel := range []error{ErrUnauthenticated, ErrPermissionDenied, ErrBadRequest, ErrUnavailable, ErrFailedPrecondition,
		store.ErrInvalid, store.ErrNotFound} {
		msg = strings.TrimPrefix(msg, sentinel.Error()+": ")
	}
	return status.Error(code, msg)
}
