package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/client"
)

// agent is the sidecar's side of the control-plane API: it proves the
// workload's identity, renews its SVID at half life, registers the instance
// and reports its health, and streams configuration snapshots.
type agent struct {
	cfg     *Config
	creds   *Credentials
	metrics *Metrics
	log     *slog.Logger
	apply   func(*controlplanev1.Snapshot) error
	// id obtains and renews the SVID and holds the mTLS connection to the
	// control plane.
	id *client.Identity

	lastSnap      atomic.Pointer[controlplanev1.Snapshot]
	registered    atomic.Bool
	firstSnapshot chan struct{}
	firstOnce     sync.Once
}

func newAgent(cfg *Config, creds *Credentials, metrics *Metrics, apply func(*controlplanev1.Snapshot) error) *agent {
	return &agent{cfg: cfg, creds: creds, metrics: metrics, log: cfg.Logger, apply: apply, firstSnapshot: make(chan struct{}),
		id: &client.Identity{
			ControlPlane: cfg.ControlPlane, Creds: creds, DataDir: cfg.DataDir, Log: cfg.Logger, Clock: cfg.Clock,
			Issued: func(s *x509svid.SVID) { metrics.svidExpiry.Set(float64(s.Certificates[0].NotAfter.Unix())) },
		}}
}

// bootstrap gets the first SVID: from disk, else with the token.
func (a *agent) bootstrap(ctx context.Context) error {
	if a.id.LoadSaved() {
		a.log.Info("restored saved SVID", "spiffe_id", a.creds.SVID().ID.String())
	} else {
		token, err := a.cfg.token()
		if err != nil {
			return err
		}
		conn, err := a.id.Dial(false)
		if err != nil {
			return err
		}
		defer conn.Close()
		backoff := client.NewBackoff(200*time.Millisecond, 5*time.Second)
		for {
			err := a.id.Certify(ctx, conn, token)
			if err == nil {
				break
			}
			if c := status.Code(errors.Unwrap(err)); c == codes.PermissionDenied || c == codes.InvalidArgument || c == codes.Unauthenticated {
				return fmt.Errorf("the control plane refused the registration token (use a fresh one from `strait workload token`): %w", err)
			}
			a.log.Warn("control plane not reachable yet", "err", err)
			if !backoff.Wait(ctx) {
				return ctx.Err()
			}
		}
	}
	return a.id.Connect()
}

// healthLoop registers the instance, then reports its health periodically.
func (a *agent) healthLoop(ctx context.Context, inboundAddr string) error {
	// Peers are only told about this instance once it has the policy to
	// accept them: until the first snapshot, every caller is refused.
	select {
	case <-a.firstSnapshot:
	case <-ctx.Done():
		return nil
	}
	registered := false
	backoff := client.NewBackoff(200*time.Millisecond, 5*time.Second)
	ticker := time.NewTicker(a.cfg.HealthInterval)
	defer ticker.Stop()
	for {
		disc := controlplanev1.NewDiscoveryServiceClient(a.id.Conn())
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		var err error
		if !registered {
			_, err = disc.Register(rctx, &controlplanev1.RegisterRequest{Instance: &controlplanev1.Instance{
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
			_, err = disc.ReportHealth(rctx, &controlplanev1.ReportHealthRequest{Instance: a.cfg.Instance, Health: a.appHealth(ctx), BundleDigest: digest})
			if status.Code(err) == codes.NotFound {
				registered = false
			}
		}
		cancel()
		if err != nil {
			a.log.Debug("health report failed", "err", err)
			if !backoff.Wait(ctx) {
				return nil
			}
			continue
		}
		backoff.Reset()
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
	_, _ = controlplanev1.NewDiscoveryServiceClient(a.id.Conn()).Deregister(ctx, &controlplanev1.DeregisterRequest{Instance: a.cfg.Instance})
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
	backoff := client.NewBackoff(100*time.Millisecond, 2*time.Second)
	for ctx.Err() == nil {
		err := a.watchOnce(ctx, backoff)
		a.metrics.cpConnected.Set(0)
		if ctx.Err() != nil {
			return nil
		}
		a.log.Info("configuration stream ended; keeping the last snapshot", "err", err)
		if !backoff.Wait(ctx) {
			return nil
		}
	}
	return nil
}

func (a *agent) watchOnce(ctx context.Context, backoff *client.Backoff) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := controlplanev1.NewDiscoveryServiceClient(a.id.Conn()).Watch(ctx, &controlplanev1.WatchRequest{
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
		backoff.Reset()
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
