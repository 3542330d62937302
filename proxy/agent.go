package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/client"
	"github.com/straitmesh/strait/internal/atomicfile"
)

// agent is the sidecar's side of the control-plane API: it proves the
// workload's identity, renews its SVID at half life (or earlier when a
// snapshot asks for a reissue), registers the instance and reports its
// health, bundle and SVID issuer (periodically, and promptly after they
// change), and streams configuration snapshots.
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
	// reportNow asks healthLoop for a report before its next tick.
	reportNow chan struct{}
	// ejections, if set, lists the endpoints outlier detection ejects now
	// (reported so that `strait explain --from` shows this sidecar's view).
	ejections func() []*controlplanev1.Ejection
}

// reportDebounce is how long a prompt report waits for more changes to
// come with the first (an SVID and a bundle installed together are
// reported once).
const reportDebounce = 100 * time.Millisecond

func newAgent(cfg *Config, creds *Credentials, metrics *Metrics, apply func(*controlplanev1.Snapshot) error) *agent {
	return &agent{cfg: cfg, creds: creds, metrics: metrics, log: cfg.Logger, apply: apply, firstSnapshot: make(chan struct{}), reportNow: make(chan struct{}, 1),
		id: &client.Identity{
			ControlPlane: cfg.ControlPlane, Creds: creds, DataDir: cfg.DataDir, Log: cfg.Logger, Clock: cfg.Clock,
			Issued: func(s *x509svid.SVID) { metrics.svidExpiry.Set(float64(s.Certificates[0].NotAfter.Unix())) },
		}}
}

// bootstrap gets the first SVID: from disk, else with the token.
func (a *agent) bootstrap(ctx context.Context) error {
	if a.id.LoadSaved() {
		a.log.Info("restored saved SVID", "spiffe_id", a.creds.SVID().ID.String())
		a.metrics.svidExpiry.Set(float64(a.creds.Expiry().Unix()))
		a.restoreSnapshot()
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

// kickReport asks for a report soon (after reportDebounce), not only at the
// next health interval: the control plane gates a root rotation on every
// node acknowledging the new bundle and SVID.
func (a *agent) kickReport() {
	select {
	case a.reportNow <- struct{}{}:
	default:
	}
}

// healthLoop registers the instance, then reports its health, bundle digest
// and SVID issuer every health interval and soon after a kickReport.
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
			req := &controlplanev1.ReportHealthRequest{Instance: a.cfg.Instance, Health: a.appHealth(ctx)}
			if b := a.creds.Bundle(); b != nil {
				req.BundleDigest = b.Digest()
			}
			if s := a.creds.SVID(); s != nil {
				req.SvidIssuer = svid.IssuerFingerprint(s.Certificates)
			}
			if a.ejections != nil {
				req.Ejections = a.ejections()
			}
			_, err = disc.ReportHealth(rctx, req)
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
		case <-a.reportNow:
			t := time.NewTimer(reportDebounce)
			select {
			case <-ctx.Done():
				t.Stop()
				a.deregister()
				return nil
			case <-t.C:
			}
			select { // kicks during the debounce are in this report
			case <-a.reportNow:
			default:
			}
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
	req := &controlplanev1.WatchRequest{Node: a.cfg.Instance, Service: a.cfg.Service, Upstreams: a.cfg.upstreamNames()}
	open := func(ctx context.Context, conn *grpc.ClientConn) (func() (*controlplanev1.WatchResponse, error), error) {
		stream, err := controlplanev1.NewDiscoveryServiceClient(conn).Watch(ctx, req)
		if err != nil {
			return nil, err
		}
		return stream.Recv, nil
	}
	// The stream moves to each renewed connection without a gap.
	return client.Follow(ctx, a.id, open, func(resp *controlplanev1.WatchResponse, first bool) {
		a.metrics.cpConnected.Set(1)
		backoff.Reset()
		if first {
			// The control plane keeps a node's report only while the node
			// has a stream open: a new stream may start without one.
			a.kickReport()
		}
		snap := resp.GetSnapshot()
		if snap == nil {
			a.log.Error("control plane sent an empty watch response; keeping the last good snapshot")
			return
		}
		if last := a.lastSnap.Load(); last != nil && snap.GetVersion() < last.GetVersion() {
			a.log.Warn("snapshot version went backwards (control plane state replaced?); applying it", "version", snap.GetVersion(), "previous", last.GetVersion())
		}
		if err := a.apply(snap); err != nil {
			var rr *routingRefused
			if errors.As(err, &rr) {
				// Its trust bundle was taken: so is a re-issue, which a
				// root rotation waits for.
				a.log.Error("snapshot refused; keeping the last good routing and authorization (its trust bundle was applied)", "version", snap.GetVersion(), "err", err)
				a.id.Reissue(snap.GetReissue())
				return
			}
			a.log.Error("snapshot refused; keeping the last good one", "version", snap.GetVersion(), "err", err)
			return
		}
		a.installed(snap)
		a.saveSnapshot(snap)
		a.id.Reissue(snap.GetReissue())
	})
}

// installed records snap as the snapshot in force.
func (a *agent) installed(snap *controlplanev1.Snapshot) {
	a.lastSnap.Store(snap)
	a.firstOnce.Do(func() { close(a.firstSnapshot) })
	a.metrics.snapshot.Set(float64(snap.GetVersion()))
}

// snapshotPath is where the snapshot in force is kept, so that a sidecar
// restarted while its control plane is away serves with it.
func (a *agent) snapshotPath() string { return filepath.Join(a.cfg.DataDir, "snapshot.pb") }

// saveSnapshot keeps snap in the data directory (if there is one).
func (a *agent) saveSnapshot(snap *controlplanev1.Snapshot) {
	if a.cfg.DataDir == "" {
		return
	}
	data, err := proto.Marshal(snap)
	if err == nil {
		err = atomicfile.WriteFile(a.snapshotPath(), data, 0o600)
	}
	if err != nil {
		a.log.Warn("could not save the snapshot; a restart while the control plane is away would start without routes", "err", err)
	}
}

// restoreSnapshot applies the snapshot saved before a restart: the last
// good configuration stands until the control plane sends a new one, as
// it would have had the sidecar not restarted. A saved snapshot that does
// not decode, names no version (an empty file decodes) or is refused is
// left aside.
func (a *agent) restoreSnapshot() {
	if a.cfg.DataDir == "" {
		return
	}
	data, err := os.ReadFile(a.snapshotPath())
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	snap := &controlplanev1.Snapshot{}
	if err == nil {
		err = proto.Unmarshal(data, snap)
	}
	if err == nil && snap.GetVersion() == 0 {
		// An empty file decodes too; no control plane sends version 0.
		err = fmt.Errorf("it names no version (%d bytes: empty or cut short)", len(data))
	}
	if err == nil {
		err = a.apply(snap)
	}
	if err != nil {
		a.log.Warn("not using the snapshot saved before the restart", "path", a.snapshotPath(), "err", err)
		return
	}
	a.installed(snap)
	a.log.Info("serving with the snapshot saved before the restart until the control plane sends one", "version", snap.GetVersion())
}
