package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"

	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/internal/atomicfile"
	"github.com/straitmesh/strait/internal/clock"
)

// agent is the sidecar's side of the control-plane API: it proves the
// workload's identity, renews its SVID at half life, registers the instance
// and reports its health, and streams configuration snapshots.
type agent struct {
	cfg     *Config
	creds   *Credentials
	metrics *Metrics
	log     *slog.Logger
	clock   func() time.Time
	apply   func(*controlplanev1.Snapshot) error

	conn          atomic.Pointer[grpc.ClientConn]
	lastSnap      atomic.Pointer[controlplanev1.Snapshot]
	registered    atomic.Bool
	firstSnapshot chan struct{}
	firstOnce     sync.Once
}

// controlPlaneVerifier accepts any control plane of the trust domain.
func (a *agent) controlPlaneVerifier() func(tls.ConnectionState) error {
	return a.creds.Verifier().VerifyConnection(svid.RoleServer, func(id spiffeid.ID) error {
		if k := identity.Classify(id).Kind; k != identity.KindControlPlane {
			return fmt.Errorf("%s is a %s, not a control plane", id, k)
		}
		return nil
	})
}

func (a *agent) dial(withCert bool) (*grpc.ClientConn, error) {
	tc := a.creds.ClientTLS(nil, a.controlPlaneVerifier())
	if !withCert {
		tc.GetClientCertificate = nil
	}
	// Reconnect within seconds when the control plane comes back, not on
	// grpc's default schedule (up to two minutes).
	return grpc.NewClient(a.cfg.ControlPlane, grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
			MinConnectTimeout: 5 * time.Second,
		}))
}

// svidPaths are where the current SVID and key are kept across restarts.
func (a *agent) svidPaths() (cert, key string) {
	return filepath.Join(a.cfg.DataDir, "svid.pem"), filepath.Join(a.cfg.DataDir, "svid-key.pem")
}

// loadSaved restores an SVID saved by an earlier run if it is still valid,
// so a restarted sidecar renews instead of needing a new token.
func (a *agent) loadSaved() bool {
	if a.cfg.DataDir == "" {
		return false
	}
	cp, kp := a.svidPaths()
	s, err := x509svid.Load(cp, kp)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			a.log.Warn("ignoring saved SVID", "err", err)
		}
		return false
	}
	if _, _, err := a.creds.Verifier().Verify(s.Certificates, svid.RoleAny); err != nil {
		a.log.Info("saved SVID no longer usable", "err", err)
		return false
	}
	if err := a.creds.SetSVID(s); err != nil {
		return false
	}
	return true
}

func (a *agent) save(s *x509svid.SVID) error {
	if a.cfg.DataDir == "" {
		return nil
	}
	certPEM, keyPEM, err := s.Marshal()
	if err != nil {
		return err
	}
	cp, kp := a.svidPaths()
	if err := atomicfile.WriteFile(kp, keyPEM, 0o600); err != nil {
		return err
	}
	return atomicfile.WriteFile(cp, certPEM, 0o644)
}

// certify obtains a new SVID: with the registration token on conn when
// token is set, otherwise over mTLS with the current SVID.
func (a *agent) certify(ctx context.Context, conn *grpc.ClientConn, token string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return err
	}
	req := &controlplanev1.CertifyRequest{Csr: csr}
	if token != "" {
		req.Credential = &controlplanev1.Credential{Kind: &controlplanev1.Credential_RegistrationToken{RegistrationToken: token}}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := controlplanev1.NewIdentityServiceClient(conn).Certify(ctx, req)
	if err != nil {
		return fmt.Errorf("certify: %w", err)
	}
	b, err := bundleFromProto(a.creds.TrustDomain(), resp.GetBundle())
	if err != nil {
		return err
	}
	if _, err := a.creds.SetBundle(b); err != nil {
		return err
	}
	chain := make([]*x509.Certificate, 0, len(resp.GetCertificateChain()))
	for i, der := range resp.GetCertificateChain() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("certify: certificate %d: %w", i, err)
		}
		chain = append(chain, c)
	}
	id, _, err := a.creds.Verifier().Verify(chain, svid.RoleAny)
	if err != nil {
		return fmt.Errorf("certify: the control plane returned an SVID that does not verify: %w", err)
	}
	if id.String() != resp.GetSpiffeId() {
		return fmt.Errorf("certify: SVID names %s, response says %s", id, resp.GetSpiffeId())
	}
	if !publicKeyMatches(chain[0], key) {
		return errors.New("certify: SVID is not for the key we sent")
	}
	s := &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
	if err := a.creds.SetSVID(s); err != nil {
		return err
	}
	a.metrics.svidExpiry.Set(float64(chain[0].NotAfter.Unix()))
	if err := a.save(s); err != nil {
		a.log.Warn("could not save SVID", "err", err)
	}
	a.log.Info("SVID issued", "spiffe_id", id.String(), "expires", chain[0].NotAfter.UTC().Format(time.RFC3339))
	return nil
}

func publicKeyMatches(c *x509.Certificate, key *ecdsa.PrivateKey) bool {
	pub, ok := c.PublicKey.(*ecdsa.PublicKey)
	return ok && pub.Equal(&key.PublicKey)
}

// bootstrap gets the first SVID: from disk, else with the token.
func (a *agent) bootstrap(ctx context.Context) error {
	if a.loadSaved() {
		a.log.Info("restored saved SVID", "spiffe_id", a.creds.SVID().ID.String())
	} else {
		token, err := a.cfg.token()
		if err != nil {
			return err
		}
		conn, err := a.dial(false)
		if err != nil {
			return err
		}
		defer conn.Close()
		backoff := newBackoff(200*time.Millisecond, 5*time.Second)
		for {
			err := a.certify(ctx, conn, token)
			if err == nil {
				break
			}
			if c := status.Code(errors.Unwrap(err)); c == codes.PermissionDenied || c == codes.InvalidArgument || c == codes.Unauthenticated {
				return fmt.Errorf("the control plane refused the registration token (use a fresh one from `strait workload token`): %w", err)
			}
			a.log.Warn("control plane not reachable yet", "err", err)
			if !backoff.wait(ctx) {
				return ctx.Err()
			}
		}
	}
	conn, err := a.dial(true)
	if err != nil {
		return err
	}
	a.conn.Store(conn)
	return nil
}

// renewLoop renews the SVID at half its life; on failure it retries with
// backoff until the SVID expires (and keeps trying after).
func (a *agent) renewLoop(ctx context.Context) error {
	backoff := newBackoff(time.Second, 30*time.Second)
	for {
		leaf := a.creds.SVID().Certificates[0]
		if !clock.SleepUntil(ctx, a.clock, svid.RenewAt(leaf, a.clock())) {
			return nil
		}
		for {
			err := a.certify(ctx, a.conn.Load(), "")
			if err == nil {
				break
			}
			a.log.Warn("SVID renewal failed; retrying", "err", err, "expires", leaf.NotAfter)
			if !backoff.wait(ctx) {
				return nil
			}
		}
		backoff.reset()
		// New connections present the new SVID: move the control-plane
		// channel to one, so streams do not outlive the old SVID.
		if conn, err := a.dial(true); err == nil {
			old := a.conn.Swap(conn)
			old.Close()
		}
	}
}

// register records the instance, then reports health periodically.
func (a *agent) healthLoop(ctx context.Context, inboundAddr string) error {
	// Peers are only told about this instance once it has the policy to
	// accept them: until the first snapshot, every caller is refused.
	select {
	case <-a.firstSnapshot:
	case <-ctx.Done():
		return nil
	}
	registered := false
	backoff := newBackoff(200*time.Millisecond, 5*time.Second)
	ticker := time.NewTicker(a.cfg.HealthInterval)
	defer ticker.Stop()
	for {
		client := controlplanev1.NewDiscoveryServiceClient(a.conn.Load())
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		var err error
		if !registered {
			_, err = client.Register(rctx, &controlplanev1.RegisterRequest{Instance: &controlplanev1.Instance{
				Name: a.cfg.Instance, Service: a.cfg.Service, Namespace: a.cfg.Namespace,
				Address: inboundAddr, Protocol: a.cfg.protocol(),
				Locality: &controlplanev1.Locality{Region: a.cfg.Region, Zone: a.cfg.Zone},
			}})
			if err == nil {
				registered = true
				a.registered.Store(true)
				a.log.Info("instance registered", "instance", a.cfg.Instance, "address", inboundAddr)
			}
		}
		if registered {
			digest := ""
			if b := a.creds.Bundle(); b != nil {
				digest = b.Digest()
			}
			_, err = client.ReportHealth(rctx, &controlplanev1.ReportHealthRequest{Instance: a.cfg.Instance, Health: a.appHealth(ctx), BundleDigest: digest})
			if status.Code(err) == codes.NotFound {
				registered = false
			}
		}
		cancel()
		if err != nil {
			a.log.Debug("health report failed", "err", err)
			if !backoff.wait(ctx) {
				return nil
			}
			continue
		}
		backoff.reset()
		select {
		case <-ctx.Done():
			a.deregister()
			return nil
		case <-ticker.C:
		}
	}
}

func (a *agent) deregister() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, _ = controlplanev1.NewDiscoveryServiceClient(a.conn.Load()).Deregister(ctx, &controlplanev1.DeregisterRequest{Instance: a.cfg.Instance})
}

// appHealth probes the application with a TCP connect.
func (a *agent) appHealth(ctx context.Context) controlplanev1.Health {
	d := net.Dialer{Timeout: time.Second}
	c, err := d.DialContext(ctx, "tcp", a.cfg.App)
	if err != nil {
		return controlplanev1.Health_HEALTH_UNHEALTHY
	}
	c.Close()
	return controlplanev1.Health_HEALTH_HEALTHY
}

// watchLoop keeps the configuration stream open and applies each snapshot
// whole; while the control plane is away the last good snapshot stays.
func (a *agent) watchLoop(ctx context.Context) error {
	backoff := newBackoff(100*time.Millisecond, 2*time.Second)
	for ctx.Err() == nil {
		err := a.watchOnce(ctx, backoff)
		a.metrics.cpConnected.Set(0)
		if ctx.Err() != nil {
			return nil
		}
		a.log.Info("configuration stream ended; keeping the last snapshot", "err", err)
		if !backoff.wait(ctx) {
			return nil
		}
	}
	return nil
}

func (a *agent) watchOnce(ctx context.Context, backoff *backoff) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := controlplanev1.NewDiscoveryServiceClient(a.conn.Load()).Watch(ctx, &controlplanev1.WatchRequest{
		Node: a.cfg.Instance, Service: a.cfg.Service, Upstreams: a.cfg.upstreamNames(),
	})
	if err != nil {
		return err
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		a.metrics.cpConnected.Set(1)
		backoff.reset()
		snap := resp.GetSnapshot()
		if snap == nil {
			a.log.Error("control plane sent an empty watch response; keeping the last good snapshot")
			continue
		}
		if last := a.lastSnap.Load(); last != nil && snap.GetVersion() < last.GetVersion() {
			a.log.Warn("snapshot version went backwards (control plane state replaced?); applying it", "version", snap.GetVersion(), "previous", last.GetVersion())
		}
		if err := a.apply(snap); err != nil {
			a.log.Error("snapshot refused; keeping the last good one", "version", snap.GetVersion(), "err", err)
			continue
		}
		a.lastSnap.Store(snap)
		a.firstOnce.Do(func() { close(a.firstSnapshot) })
		a.metrics.snapshot.Set(float64(snap.GetVersion()))
	}
}

// backoff is a capped exponential backoff with jitter.
type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(min, max time.Duration) *backoff { return &backoff{min: min, max: max, cur: min} }

func (b *backoff) reset() { b.cur = b.min }

func (b *backoff) wait(ctx context.Context) bool {
	d := b.cur/2 + time.Duration(mrand.Int64N(int64(b.cur/2)+1))
	b.cur = min(b.cur*2, b.max)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
