package server

import (
	"context"
	"crypto/sha256"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/registry"
	"github.com/straitmesh/strait/controlplane/resource"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// world is everything snapshots are cut from, at one version.
type world struct {
	version   uint64
	digest    [32]byte
	instances []registry.Instance
	traffic   map[string]*controlplanev1.TrafficPolicy // "namespace/service"
	authz     map[string][]*resource.AuthorizationPolicy
	bundle    *controlplanev1.TrustBundle
	fed       fedWorld
	// Rotation: the issuer nodes' SVIDs should come from, the bundle as
	// the root authority signed it, peers' re-signed intermediates (root
	// authority only), and this cluster's progress.
	reissue       *controlplanev1.Reissue
	signedBundle  *federationv1.SignedBundle
	intermediates []*federationv1.IntermediateUpdate
	rotation      *federationv1.RotationReport
}

// node is one sidecar's configuration streams and last report. Nodes are
// keyed by name and identity, so one workload cannot take over another's
// stream by naming its node; each stream has its own wake-up channel.
type node struct {
	name        string
	id          spiffeid.ID
	streams     map[chan struct{}]struct{}
	sentVersion uint64
	// upTo is the latest world version the node's snapshot was cut from
	// (sent, or equal to the one it holds).
	upTo   uint64
	digest string
	issuer string // fingerprint of the certificate that signed its SVID
	health controlplanev1.Health
	// ejections the sidecar reported, and when.
	ejections []*controlplanev1.Ejection
	reported  time.Time
}

func nodeKey(name string, id spiffeid.ID) string { return name + "\x00" + id.String() }

// maxUpstreams bounds what one Watch may ask for.
const maxUpstreams = 256

func bundleProto(b *bundle.Bundle) *controlplanev1.TrustBundle {
	if b == nil {
		return nil
	}
	tb := &controlplanev1.TrustBundle{TrustDomain: b.TrustDomain().Name(), Sequence: b.Sequence(), Digest: b.Digest()}
	for _, r := range b.Roots() {
		tb.Roots = append(tb.Roots, r.Raw)
	}
	return tb
}

// rebuild reads the registry, the resources and the bundle; if anything
// differs from the current world, it becomes the next version and every
// watcher is woken to cut its snapshot.
func (s *Server) rebuild(ctx context.Context) error {
	insts, err := s.cfg.Registry.Instances(ctx)
	if err != nil {
		return fmt.Errorf("server: read registry: %w", err)
	}
	slices.SortFunc(insts, func(a, b registry.Instance) int { return strings.Compare(a.Name, b.Name) })
	s.markGone(insts)
	w := &world{instances: insts, traffic: map[string]*controlplanev1.TrafficPolicy{}, authz: map[string][]*resource.AuthorizationPolicy{}, bundle: bundleProto(s.cfg.Bundle())}
	h := sha256.New()
	for _, in := range insts {
		fmt.Fprintf(h, "i\x00%s\x00%s\x00%s\x00%s\x00%d\x00%s\x00%s\x00%s\x00%d\n", in.Name, in.Service, in.Namespace, in.Address, in.Protocol, in.Region, in.Zone, in.SPIFFEID, in.Health)
	}
	exports := map[string]*resource.ServiceExport{}
	rs, err := s.cfg.Store.List("", "", "")
	if err != nil {
		return fmt.Errorf("server: read resources: %w", err)
	}
	for _, r := range rs {
		fmt.Fprintf(h, "r\x00%s\x00%s\x00%s\x00%d\n", r.Kind, r.Namespace, r.Name, r.Generation)
		obj, err := resource.FromProto(&controlplanev1.Resource{ApiVersion: r.APIVersion, Kind: r.Kind, Namespace: r.Namespace, Name: r.Name, SpecJson: r.Spec})
		if err != nil {
			s.log.Warn("stored resource unreadable; ignored", "kind", r.Kind, "namespace", r.Namespace, "name", r.Name, "err", err)
			continue
		}
		typed, err := resource.Validate(obj, s.cfg.TrustDomain)
		if err != nil {
			s.log.Warn("stored resource no longer valid; ignored", "kind", r.Kind, "namespace", r.Namespace, "name", r.Name, "err", err)
			continue
		}
		ns, svc := resource.ServiceKey(typed)
		key := ns + "/" + svc
		switch t := typed.(type) {
		case *resource.TrafficPolicy:
			if _, dup := w.traffic[key]; dup {
				s.log.Warn("more than one TrafficPolicy for a service; the first by name wins", "service", key, "ignored", r.Name)
				continue
			}
			w.traffic[key] = t.Proto()
		case *resource.AuthorizationPolicy:
			w.authz[key] = append(w.authz[key], t)
		case *resource.ServiceExport:
			exports[key] = t
		}
	}
	if w.fed, err = s.readFederation(h, exports); err != nil {
		return err
	}
	w.fed.markStale(h, w.traffic, s.cfg.Clock())
	if w.bundle != nil {
		fmt.Fprintf(h, "b\x00%s\x00%d\n", w.bundle.GetDigest(), w.bundle.GetSequence())
	}
	s.rotationWorld(w, h)

	s.mu.Lock()
	defer s.mu.Unlock()
	w.rotation = s.ownRotationLocked(s.cfg.Bundle(), s.intermediate())
	rb, _ := proto.MarshalOptions{Deterministic: true}.Marshal(w.rotation)
	fmt.Fprintf(h, "o\x00%x\n", sha256.Sum256(rb))
	copy(w.digest[:], h.Sum(nil))
	if s.world != nil && s.world.digest == w.digest {
		return nil
	}
	v, err := s.cfg.Store.BumpRevision()
	if err != nil {
		return fmt.Errorf("server: bump revision: %w", err)
	}
	w.version = max(v, s.version+1)
	s.version = w.version
	s.world = w
	s.log.Debug("configuration changed", "version", w.version, "instances", len(w.instances), "bundle", w.bundle.GetDigest(), "watchers", len(s.nodes))
	for _, n := range s.nodes {
		for wake := range n.streams {
			select {
			case wake <- struct{}{}:
			default:
			}
		}
	}
	return nil
}

// pushLoop rebuilds the world after changes, debounced.
func (s *Server) pushLoop(ctx context.Context) error {
	storeCh, unsubscribe := s.cfg.Store.Subscribe()
	defer unsubscribe()
	tick := time.NewTicker(time.Second) // the bundle is polled
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-storeCh:
		case <-s.cfg.Registry.Changed():
		case <-s.fedWake:
		case <-tick.C:
			// Every second: the bundle may have changed, and peers'
			// endpoints expire with time. rebuild compares digests, so an
			// unchanged world pushes nothing.
		}
		t := time.NewTimer(s.cfg.Debounce)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		if err := s.rebuild(ctx); err != nil {
			s.log.Error("rebuilding configuration failed; sidecars keep the last one", "err", err)
		}
	}
}

// snapshotFor cuts the snapshot of one node from w (version left zero).
func snapshotFor(w *world, cluster string, ns string, req *controlplanev1.WatchRequest) *controlplanev1.Snapshot {
	snap := &controlplanev1.Snapshot{Bundle: w.bundle, Cluster: cluster, Authorization: &controlplanev1.Authorization{}, Reissue: w.reissue}
	ups := slices.Clone(req.GetUpstreams())
	slices.Sort(ups)
	ups = slices.Compact(ups)
	for _, up := range ups {
		name, upNS := up, ns
		if i := strings.IndexByte(up, '.'); i >= 0 {
			name, upNS = up[:i], up[i+1:]
		}
		svc := &controlplanev1.Service{Name: up, Namespace: upNS, Protocol: controlplanev1.Protocol_PROTOCOL_HTTP}
		for _, in := range w.instances {
			if in.Service != name || in.Namespace != upNS {
				continue
			}
			svc.Protocol = in.Protocol
			svc.Endpoints = append(svc.Endpoints, registry.ToEndpoint(in))
		}
		if p := w.traffic[upNS+"/"+name]; p != nil {
			svc.Policy = p
		} else {
			svc.Policy = resource.DefaultTrafficPolicy()
		}
		remoteEndpoints(w, svc, upNS, name, len(svc.Endpoints) > 0)
		snap.Services = append(snap.Services, svc)
	}
	if req.GetService() != "" {
		snap.Authorization = resource.BuildAuthorization(w.authz[ns+"/"+req.GetService()])
	}
	return snap
}

// watch streams snapshots to one node until the client leaves, the
// caller's SVID expires or stops verifying against the current bundle.
func (s *Server) watch(ctx context.Context, req *controlplanev1.WatchRequest, send func(*controlplanev1.WatchResponse) error) error {
	c, _ := callerFrom(ctx)
	if err := identity.ValidateClusterName(req.GetNode()); err != nil {
		return fmt.Errorf("%w: node: %w", ErrBadRequest, err)
	}
	if len(req.GetUpstreams()) > maxUpstreams {
		return fmt.Errorf("%w: %d upstreams, more than the limit of %d", ErrBadRequest, len(req.GetUpstreams()), maxUpstreams)
	}
	for _, up := range req.GetUpstreams() {
		if up == "" || len(up) > 253 {
			return fmt.Errorf("%w: upstream %q is not a service name", ErrBadRequest, up)
		}
	}
	if svc := req.GetService(); svc != "" {
		// The authorization of a service is only for its own instances.
		if ok, err := s.cfg.Store.ServiceBound(c.info.Namespace, c.info.ServiceAccount, svc); err != nil {
			return err
		} else if !ok {
			return fmt.Errorf("%w: %s does not serve %q (its registration token was minted for another service)", ErrPermissionDenied, c.id, svc)
		}
	}
	n, wake := s.attach(req.GetNode(), c.id)
	defer s.detach(n, wake)
	s.metrics.watchers.Inc()
	defer s.metrics.watchers.Dec()
	expiry := time.NewTimer(time.Until(c.leaf.NotAfter))
	defer expiry.Stop()
	var last *controlplanev1.Snapshot
	for {
		// The caller's chain is re-verified against current trust each time.
		p := ctx
		if _, err := s.authenticate(p); err != nil {
			return err
		}
		s.mu.Lock()
		w := s.world
		warm := s.federationWarmLocked(w)
		s.mu.Unlock()
		if !warm {
			// Just started: the peers' endpoints come with the gateway's
			// first report. Until then the sidecar keeps what it has.
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-wake:
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		snap := snapshotFor(w, s.cfg.Cluster, c.info.Namespace, req)
		if last == nil || !proto.Equal(last, snap) {
			last = snap
			out := proto.Clone(snap).(*controlplanev1.Snapshot)
			out.Version = w.version
			if err := send(&controlplanev1.WatchResponse{Snapshot: out}); err != nil {
				return err
			}
			s.metrics.pushes.Inc()
			s.log.Debug("snapshot sent", "node", req.GetNode(), "version", w.version)
			s.mu.Lock()
			n.sentVersion = w.version
			s.mu.Unlock()
		}
		s.mu.Lock()
		n.upTo = w.version // what it holds is this version's, sent or unchanged
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-expiry.C:
			return fmt.Errorf("%w: %s", ErrUnauthenticated, &svid.Error{Reason: svid.ReasonExpired, Err: fmt.Errorf("the SVID this stream was opened with expired; reconnect with the renewed one")})
		case <-wake:
		}
	}
}

func (s *Server) attach(name string, id spiffeid.ID) (*node, chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	key := nodeKey(name, id)
	n := s.nodes[key]
	if n == nil {
		n = &node{name: name, id: id, streams: map[chan struct{}]struct{}{}}
		s.nodes[key] = n
	}
	wake := make(chan struct{}, 1)
	n.streams[wake] = struct{}{}
	delete(s.gone, key)
	return n, wake
}

// goneAfter is how long after a sidecar's last configuration stream closed
// (and none reopened) its instance counts as unhealthy: a killed sidecar
// is seen in seconds, not when its health lease lapses. Renewals move the
// stream without a gap, so they never trigger it.
const goneAfter = 2 * time.Second

// markGone marks unhealthy the instances whose sidecar's streams all
// closed more than goneAfter ago. Streams count by node name and identity:
// a stream another identity opens under an instance's name, then closes,
// says nothing of that instance.
func (s *Server) markGone(insts []registry.Instance) {
	now := s.cfg.Clock()
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range insts {
		id, err := spiffeid.FromString(insts[i].SPIFFEID)
		if err != nil {
			continue
		}
		if at, ok := s.gone[nodeKey(insts[i].Name, id)]; ok && now.Sub(at) >= goneAfter && insts[i].Health == controlplanev1.Health_HEALTH_HEALTHY {
			insts[i].Health = controlplanev1.Health_HEALTH_UNHEALTHY
		}
	}
}

func (s *Server) detach(n *node, wake chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(n.streams, wake)
	if len(n.streams) == 0 {
		delete(s.nodes, nodeKey(n.name, n.id))
		if s.gone == nil {
			s.gone = map[string]time.Time{}
		}
		if len(s.gone) < maxGone {
			s.gone[nodeKey(n.name, n.id)] = s.cfg.Clock()
		}
	}
}

// federationWarmLocked says whether w's federation part may be sent to
// sidecars: there are no links, a gateway has reported since the start, or
// the grace period is over. The caller holds s.mu.
func (s *Server) federationWarmLocked(w *world) bool {
	return len(w.fed.links) == 0 || w.fed.reported || s.cfg.Clock().Sub(s.started) >= s.cfg.FederationGrace
}

// noteDigest records what a sidecar reported (bundle digest, SVID issuer,
// health); a change in what it holds is a change in this cluster's
// rotation progress.
func (s *Server) noteDigest(name string, id spiffeid.ID, digest, issuer string, h controlplanev1.Health) {
	s.mu.Lock()
	changed := false
	if n := s.nodes[nodeKey(name, id)]; n != nil {
		changed = n.digest != digest || n.issuer != issuer
		n.digest, n.issuer, n.health = digest, issuer, h
	}
	s.mu.Unlock()
	if changed {
		s.pokeFederation()
	}
}

func (s *Server) sortedNodes() []*node {
	out := make([]*node, 0, len(s.nodes))
	for _, n := range s.nodes {
		out = append(out, n)
	}
	slices.SortFunc(out, func(a, b *node) int { return strings.Compare(a.name, b.name) })
	return out
}
