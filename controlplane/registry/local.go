package registry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/store"
)

// DefaultLease is how long an instance stays healthy without a health report
// when LocalConfig.Lease is zero. Sidecars report well within it.
const DefaultLease = 15 * time.Second

// DefaultReap is how long an instance stays HEALTH_UNKNOWN, after its lease
// lapsed, before it is removed (a crashed sidecar never deregisters) when
// LocalConfig.Reap is zero.
const DefaultReap = 2 * time.Minute

// LocalConfig configures NewLocal.
type LocalConfig struct {
	// Store holds the instances. Required.
	Store *store.Store
	// Cluster is the name of this cluster, reported on every instance.
	// Required; a DNS label (identity.ValidateClusterName).
	Cluster string
	// Lease is how long an instance stays as reported after its last
	// registration or health report; then it is HEALTH_UNKNOWN. Zero means
	// DefaultLease.
	Lease time.Duration
	// Reap is how long an instance whose lease lapsed stays listed (as
	// HEALTH_UNKNOWN, so failover sees it gone) before it is removed, so
	// that a crashed instance does not count in its service's capacity
	// for ever. Zero means DefaultReap.
	Reap time.Duration
	// Clock returns the current time. Nil means time.Now. Run sleeps with
	// real timers for the durations this clock reports, so a fake clock
	// should move with them (testing/synctest does this).
	Clock func() time.Time
	// Logger receives registrations, deregistrations and lapses. Nil
	// discards them.
	Logger *slog.Logger
}

// Local is the registry of local mode: instances registered by their own
// sidecars and kept in the store. It is safe for concurrent use.
type Local struct {
	st      *store.Store
	cluster string
	lease   time.Duration
	reap    time.Duration
	clock   func() time.Time
	log     *slog.Logger

	changed chan struct{} // Changed; buffer 1, coalescing
	wake    chan struct{} // tells Run to look again; buffer 1, coalescing
}

var _ Source = (*Local)(nil)

// NewLocal returns a Local on cfg.Store. It does no I/O; call Run to have
// lease lapses reported on Changed.
func NewLocal(cfg LocalConfig) (*Local, error) {
	if cfg.Store == nil {
		return nil, errors.New("registry: LocalConfig.Store is required")
	}
	if err := identity.ValidateClusterName(cfg.Cluster); err != nil {
		return nil, fmt.Errorf("registry: LocalConfig.Cluster: %w", err)
	}
	if cfg.Lease < 0 {
		return nil, fmt.Errorf("registry: LocalConfig.Lease %s is negative", cfg.Lease)
	}
	l := &Local{
		st:      cfg.Store,
		cluster: cfg.Cluster,
		lease:   cfg.Lease,
		reap:    cfg.Reap,
		clock:   cfg.Clock,
		log:     cfg.Logger,
		changed: make(chan struct{}, 1),
		wake:    make(chan struct{}, 1),
	}
	if l.lease == 0 {
		l.lease = DefaultLease
	}
	if l.reap <= 0 {
		l.reap = DefaultReap
	}
	if l.clock == nil {
		l.clock = time.Now
	}
	if l.log == nil {
		l.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return l, nil
}

// Lease returns the lease: how long an instance stays as reported without a
// health report. The discovery API tells sidecars.
func (l *Local) Lease() time.Duration { return l.lease }

// Changed returns a channel that receives after every registration,
// deregistration, change of effective health (a reported change, a lease
// lapse noticed by Run, or a lapsed instance reporting again) and change of
// locality or address. Receives coalesce; the channel is shared, so it
// serves one consumer.
func (l *Local) Changed() <-chan struct{} { return l.changed }

// Register records inst as registered by callerID, or refreshes it. The
// caller must be a workload ID whose namespace is inst.Namespace; the
// instance's SPIFFE ID is the caller's (inst.SPIFFEID is ignored), and its
// Cluster is this registry's. A name taken by another identity's instance
// fails with store.ErrInstanceOwned. Registering marks the instance healthy
// and starts a new lease. An unspecified protocol means HTTP.
func (l *Local) Register(ctx context.Context, inst Instance, callerID spiffeid.ID) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	caller, err := workloadCaller(callerID)
	if err != nil {
		return err
	}
	for _, f := range []struct{ name, value string }{{"name", inst.Name}, {"service", inst.Service}, {"namespace", inst.Namespace}} {
		if err := checkLabel(f.name, f.value); err != nil {
			return err
		}
	}
	if err := checkAddress(inst.Address); err != nil {
		return err
	}
	proto := inst.Protocol
	if proto == controlplanev1.Protocol_PROTOCOL_UNSPECIFIED {
		proto = controlplanev1.Protocol_PROTOCOL_HTTP
	}
	if _, ok := controlplanev1.Protocol_name[int32(proto)]; !ok {
		return fieldErr("protocol", "unknown protocol %d", proto)
	}
	if err := checkLocality("region", inst.Region); err != nil {
		return err
	}
	if err := checkLocality("zone", inst.Zone); err != nil {
		return err
	}
	if inst.Namespace != caller.Namespace {
		return fmt.Errorf("%w: namespace %q is not the caller's namespace %q", ErrPermissionDenied, inst.Namespace, caller.Namespace)
	}
	err = l.st.PutInstance(store.Instance{
		Name: inst.Name, Service: inst.Service, Namespace: inst.Namespace, Address: inst.Address,
		Protocol: proto, Region: inst.Region, Zone: inst.Zone, SPIFFEID: callerID.String(),
		Health: controlplanev1.Health_HEALTH_HEALTHY, LastSeen: l.clock(),
	})
	if err != nil {
		return fmt.Errorf("registry: register %s: %w", inst.Name, err)
	}
	l.log.Info("instance registered", "instance", inst.Name, "service", inst.Service, "namespace", inst.Namespace,
		"address", inst.Address, "spiffe_id", callerID.String())
	l.changedNow()
	return nil
}

// ReportHealth sets the health of the caller's instance name to h (HEALTHY
// or UNHEALTHY) and renews its lease. It fails with store.ErrNotFound for an
// unknown instance and store.ErrInstanceOwned for another identity's.
func (l *Local) ReportHealth(ctx context.Context, name string, h controlplanev1.Health, callerID spiffeid.ID) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if _, err := workloadCaller(callerID); err != nil {
		return err
	}
	if err := checkLabel("name", name); err != nil {
		return err
	}
	if h != controlplanev1.Health_HEALTH_HEALTHY && h != controlplanev1.Health_HEALTH_UNHEALTHY {
		return fieldErr("health", "must be HEALTHY or UNHEALTHY, got %s", h)
	}
	prev, err := l.st.GetInstance(name)
	if err != nil {
		return fmt.Errorf("registry: report health of %s: %w", name, err)
	}
	now := l.clock()
	if err := l.st.SetHealth(name, callerID.String(), h, now); err != nil {
		return fmt.Errorf("registry: report health of %s: %w", name, err)
	}
	if lapsed := l.lapsed(prev.LastSeen, now); lapsed || prev.Health != h {
		if lapsed {
			l.log.Info("instance reporting again", "instance", name, "health", h.String(), "spiffe_id", callerID.String())
		}
		l.changedNow()
	}
	return nil
}

// Deregister removes the caller's instance name. It fails with
// store.ErrNotFound or store.ErrInstanceOwned.
func (l *Local) Deregister(ctx context.Context, name string, callerID spiffeid.ID) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if _, err := workloadCaller(callerID); err != nil {
		return err
	}
	if err := checkLabel("name", name); err != nil {
		return err
	}
	if err := l.st.DeleteInstance(name, callerID.String()); err != nil {
		return fmt.Errorf("registry: deregister %s: %w", name, err)
	}
	l.log.Info("instance deregistered", "instance", name, "spiffe_id", callerID.String())
	l.changedNow()
	return nil
}

// Instances returns every registered instance, sorted by name, with its
// effective health: HEALTH_UNKNOWN if its lease has lapsed (computed now,
// whether or not Run is running).
func (l *Local) Instances(ctx context.Context) ([]Instance, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	stored, err := l.st.ListInstances()
	if err != nil {
		return nil, fmt.Errorf("registry: list instances: %w", err)
	}
	now := l.clock()
	out := make([]Instance, 0, len(stored))
	for _, in := range stored {
		h := in.Health
		if l.lapsed(in.LastSeen, now) {
			h = controlplanev1.Health_HEALTH_UNKNOWN
		}
		out = append(out, Instance{
			Name: in.Name, Service: in.Service, Namespace: in.Namespace, Address: in.Address,
			Cluster: l.cluster, SPIFFEID: in.SPIFFEID, Protocol: in.Protocol,
			Region: in.Region, Zone: in.Zone, Health: h,
		})
	}
	return out, nil
}

// Run reports lease lapses on Changed until ctx is done: it sleeps until the
// next lease expiry, and wakes early when this registry changes. It returns
// nil when ctx is done, or an error if the store cannot be read.
func (l *Local) Run(ctx context.Context) error {
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	noticed := map[string]time.Time{} // lapsed instance -> the LastSeen it lapsed with
	started := l.clock()
	for {
		next, err := l.sweep(noticed, started)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("registry: watch leases: %w", err)
		}
		var fire <-chan time.Time
		if !next.IsZero() {
			d := next.Sub(l.clock())
			if timer == nil {
				timer = time.NewTimer(d)
			} else {
				timer.Reset(d)
			}
			fire = timer.C
		}
		select {
		case <-ctx.Done():
			return nil
		case <-l.wake:
		case <-fire:
		}
	}
}

// sweep notes instances whose lease lapsed since the last sweep, fires
// Changed if there are any, and returns the next lease expiry (zero if no
// lease is running).
//
// An instance is removed once it has been lapsed for Reap, counted from no
// earlier than started: after a control plane's restart, sidecars get the
// time to report again before anything is removed.
func (l *Local) sweep(noticed map[string]time.Time, started time.Time) (time.Time, error) {
	stored, err := l.st.ListInstances()
	if err != nil {
		return time.Time{}, err
	}
	now := l.clock()
	var next time.Time
	lapsedNow := make(map[string]bool)
	newly := 0
	soonest := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	reaped := 0
	for _, in := range stored {
		expiry := in.LastSeen.Add(l.lease)
		if now.Before(expiry) {
			soonest(expiry)
			continue
		}
		if gone := later(expiry, started).Add(l.reap); !now.Before(gone) {
			if err := l.st.DeleteInstance(in.Name, in.SPIFFEID); err != nil && !errors.Is(err, store.ErrNotFound) {
				return time.Time{}, err
			}
			reaped++
			l.log.Warn("instance removed: no health report since its lease lapsed", "instance", in.Name, "service", in.Service,
				"spiffe_id", in.SPIFFEID, "last_seen", in.LastSeen, "after", l.reap)
			continue
		} else {
			soonest(gone)
		}
		lapsedNow[in.Name] = true
		if at, ok := noticed[in.Name]; !ok || !at.Equal(in.LastSeen) {
			noticed[in.Name] = in.LastSeen
			newly++
			l.log.Warn("instance lease lapsed", "instance", in.Name, "service", in.Service,
				"spiffe_id", in.SPIFFEID, "last_seen", in.LastSeen)
		}
	}
	for name := range noticed {
		if !lapsedNow[name] {
			delete(noticed, name)
		}
	}
	if newly > 0 || reaped > 0 {
		notify(l.changed)
	}
	return next, nil
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// lapsed reports whether a lease renewed at lastSeen has run out at now.
func (l *Local) lapsed(lastSeen, now time.Time) bool {
	return !now.Before(lastSeen.Add(l.lease))
}

// changedNow fires Changed and has Run recompute its next wake-up.
func (l *Local) changedNow() {
	notify(l.changed)
	notify(l.wake)
}

func notify(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func workloadCaller(id spiffeid.ID) (identity.Info, error) {
	if id.IsZero() {
		return identity.Info{}, fmt.Errorf("%w: no caller identity", ErrPermissionDenied)
	}
	info := identity.Classify(id)
	if info.Kind != identity.KindWorkload {
		return identity.Info{}, fmt.Errorf("%w: %s is a %s identity, not a workload", ErrPermissionDenied, id, info.Kind)
	}
	return info, nil
}
