package server

import (
	"cmp"
	"context"
	"crypto/sha256"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/resource"
	"github.com/straitmesh/strait/controlplane/store"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/federation/catalog"
)

// MeshPort is the logical port of every service in local mode, where each
// instance has its own inbound address: a tunnel header names it, and the
// receiving gateway maps it to the instances' inbound listeners.
const MeshPort = 443

// Bounds on what a gateway may report.
const (
	maxPeers         = 64
	maxImportsOfPeer = 4096
	maxGatewayAddrs  = 8
)

// gatewayNode is a live gateway of this cluster and what it last reported.
type gatewayNode struct {
	name      string
	entry     string
	peerAddrs []string
	streams   int
	reports   map[string]*controlplanev1.PeerReport
	reported  time.Time
}

// fedWorld is the federation part of the world.
type fedWorld struct {
	links     []store.Link                               // by creation, then peer
	exports   map[string]*resource.ServiceExport         // "namespace/name"
	imports   map[string][]*federationv1.ExportedService // by peer
	rtt       map[string]time.Duration                   // by peer, as its gateway measured it
	heard     map[string]time.Time                       // by peer: its last heartbeat here
	down      map[string]bool                            // by peer: its control stream is not up both ways
	stale     map[string]bool                            // "peer\x00namespace/name": expired by the service's staleness
	entry     string                                     // a live gateway's entry address
	gatewayID string
	conflicts map[string][]string // by peer: "namespace/name: why"
	lost      map[string]bool     // "peer\x00namespace/name": an export that lost a conflict
	// rotations are peers' rotation reports as their gateways relayed them.
	rotations map[string]*federationv1.RotationReport
	// reported: a live gateway has reported (imports and link health are
	// known, not just empty).
	reported bool
}

// readFederation collects links, exports and what the gateways reported,
// and writes what identifies them into h.
func (s *Server) readFederation(h interface{ Write([]byte) (int, error) }, exports map[string]*resource.ServiceExport) (fedWorld, error) {
	links, err := s.cfg.Store.Links()
	if err != nil {
		return fedWorld{}, fmt.Errorf("server: read links: %w", err)
	}
	slices.SortFunc(links, func(a, b store.Link) int {
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		return strings.Compare(a.Peer, b.Peer)
	})
	gw, _ := identity.Gateway(s.cfg.TrustDomain, s.cfg.Cluster)
	f := fedWorld{links: links, exports: exports, imports: map[string][]*federationv1.ExportedService{}, rtt: map[string]time.Duration{}, heard: map[string]time.Time{}, down: map[string]bool{}, stale: map[string]bool{}, gatewayID: gw.String(), conflicts: map[string][]string{}, lost: map[string]bool{}, rotations: map[string]*federationv1.RotationReport{}}
	for _, l := range links {
		fmt.Fprintf(h, "l\x00%s\x00%s\x00%s\n", l.Peer, l.ID, strings.Join(l.PeerGateways, ","))
	}
	s.mu.Lock()
	names := make([]string, 0, len(s.gateways))
	for n := range s.gateways {
		names = append(names, n)
	}
	slices.Sort(names)
	var at time.Time
	rotationHeard := map[string]time.Time{} // when the gateway whose report is kept heard from the peer
	for _, n := range names {
		g := s.gateways[n]
		if g.streams == 0 {
			continue
		}
		if f.entry == "" {
			f.entry = g.entry
		}
		// The latest report of a live gateway says what peers export.
		if g.reported.After(at) {
			at = g.reported
			clear(f.imports)
			clear(f.rtt)
			clear(f.heard)
			clear(f.down)
			for peer, r := range g.reports {
				f.imports[peer] = r.GetImports()
				f.down[peer] = !r.GetControlStreamUp()
				if r.GetLastHeard() != nil {
					f.heard[peer] = r.GetLastHeard().AsTime()
				}
				f.rtt[peer] = max(r.GetRtt().AsDuration(), 0) // made steady below
			}
		}
		// Rotation reports: from the gateway that heard from the peer
		// last (another keeps what it got before the peer's streams moved
		// away from it).
		for peer, r := range g.reports {
			rr := r.GetRotation()
			if rr == nil {
				continue
			}
			heard := r.GetLastHeard().AsTime()
			if old, ok := rotationHeard[peer]; !ok || heard.After(old) {
				f.rotations[peer], rotationHeard[peer] = rr, heard
			}
		}
	}
	// RTT orders failover tiers: held steady (steadyRTT, fed the kept
	// report only) and kept to 1ms steps so that jitter neither reorders
	// tiers nor rebuilds every snapshot. A measured RTT under half a
	// millisecond is 1ms, not 0 (unmeasured, which would put the nearest
	// peer last).
	for peer, d := range f.rtt {
		if d > 0 {
			f.rtt[peer] = max(s.steadyRTT(peer, d).Round(time.Millisecond), time.Millisecond)
		}
	}
	s.mu.Unlock()
	f.reported = !at.IsZero()
	fmt.Fprintf(h, "g\x00%s\x00%t\n", f.entry, f.reported)
	for _, peer := range slices.Sorted(maps.Keys(f.rtt)) {
		fmt.Fprintf(h, "t\x00%s\x00%d\x00%t\n", peer, f.rtt[peer], f.down[peer])
	}
	linked := map[string]bool{}
	for _, l := range links {
		linked[l.Peer] = true
	}
	for peer := range f.imports {
		if !linked[peer] {
			delete(f.imports, peer) // a report about a peer no longer linked
		}
	}
	for _, peer := range slices.Sorted(maps.Keys(f.rotations)) {
		if !linked[peer] {
			delete(f.rotations, peer)
			continue
		}
		b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(f.rotations[peer])
		fmt.Fprintf(h, "q\x00%s\x00%x\n", peer, sha256.Sum256(b))
	}
	// Conflicts: one service exported by several peers with different
	// protocols or ports. The oldest link's export wins; the others are
	// reported and not used.
	type first struct {
		peer  string
		proto string
		ports string
	}
	seen := map[string]first{}
	for _, l := range links {
		for _, es := range f.imports[l.Peer] {
			b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(es)
			fmt.Fprintf(h, "x\x00%s\x00%x\n", l.Peer, sha256.Sum256(b))
			key := es.GetNamespace() + "/" + es.GetName()
			ports := fmt.Sprint(es.GetPorts())
			if fst, ok := seen[key]; !ok {
				seen[key] = first{l.Peer, es.GetProtocol(), ports}
			} else if fst.proto != es.GetProtocol() || fst.ports != ports {
				f.lost[l.Peer+"\x00"+key] = true
				f.conflicts[l.Peer] = append(f.conflicts[l.Peer], fmt.Sprintf("%s: %s exports protocol %s ports %s, but %s (linked earlier) exports protocol %s ports %s; %s's export is not used",
					key, l.Peer, es.GetProtocol(), ports, fst.peer, fst.proto, fst.ports, l.Peer))
			}
		}
	}
	return f, nil
}

// markStale flags the imports of peers not heard from for longer than
// their service's failover staleness, as of now, and writes the flags into
// h (so that expiry changes the world's version).
func (f *fedWorld) markStale(h interface{ Write([]byte) (int, error) }, traffic map[string]*controlplanev1.TrafficPolicy, now time.Time) {
	for _, l := range f.links {
		heard, ok := f.heard[l.Peer]
		if !ok {
			continue
		}
		for _, es := range f.imports[l.Peer] {
			key := es.GetNamespace() + "/" + es.GetName()
			bound := resource.DefaultStaleness
			if p := traffic[key]; p != nil && p.GetFailover().GetStaleness() != nil {
				bound = p.GetFailover().GetStaleness().AsDuration()
			}
			if now.Sub(heard) > bound {
				f.stale[l.Peer+"\x00"+key] = true
				fmt.Fprintf(h, "s\x00%s\x00%s\n", l.Peer, key)
			}
		}
	}
}

// conflicted reports whether peer's export of ns/name lost a conflict.
func (f *fedWorld) conflicted(peer, ns, name string) bool { return f.lost[peer+"\x00"+ns+"/"+name] }

func protocolName(p controlplanev1.Protocol) string {
	if p == controlplanev1.Protocol_PROTOCOL_TCP {
		return "tcp"
	}
	return "http"
}

func protocolOf(name string) controlplanev1.Protocol {
	if name == "tcp" {
		return controlplanev1.Protocol_PROTOCOL_TCP
	}
	return controlplanev1.Protocol_PROTOCOL_HTTP
}

// remoteEndpoints appends to svc one endpoint per linked peer that exports
// the service to this cluster: the local gateway's entry, tunnelling to the
// peer, weighted by the peer's healthy instances.
func remoteEndpoints(w *world, svc *controlplanev1.Service, ns, name string, haveLocal bool) {
	f := &w.fed
	if f.entry == "" {
		return // no gateway: peers are out of reach
	}
	tiers := failoverTiers(svc.GetPolicy().GetFailover(), f)
	for _, l := range f.links {
		if f.conflicted(l.Peer, ns, name) {
			continue
		}
		for _, es := range f.imports[l.Peer] {
			if es.GetNamespace() != ns || es.GetName() != name || len(es.GetSpiffeIds()) == 0 {
				continue
			}
			if f.stale[l.Peer+"\x00"+ns+"/"+name] {
				continue // the peer stopped reporting longer ago than the service allows
			}
			p := protocolOf(es.GetProtocol())
			if haveLocal && p != svc.Protocol {
				continue // local instances define the protocol
			}
			if !haveLocal && len(svc.Endpoints) == 0 {
				svc.Protocol = p
			}
			port := uint32(MeshPort)
			if len(es.GetPorts()) > 0 {
				port = es.GetPorts()[0]
			}
			health := controlplanev1.Health_HEALTH_HEALTHY
			if es.GetHealthy() == 0 || f.down[l.Peer] {
				// No healthy instance there, or the link is down as the
				// gateway sees it: chosen only if nothing healthy is left.
				health = controlplanev1.Health_HEALTH_UNHEALTHY
			}
			prio, ok := tiers[l.Peer]
			if !ok {
				continue // the service's failover policy leaves this peer out
			}
			svc.Endpoints = append(svc.Endpoints, &controlplanev1.Endpoint{
				Instance: l.Peer + "/" + name, Address: f.entry, Cluster: l.Peer, Health: health,
				SpiffeId: es.GetSpiffeIds()[0], Weight: max(es.GetHealthy(), 1), Priority: prio,
				Tunnel: &controlplanev1.Tunnel{GatewayAddress: f.entry, GatewaySpiffeId: f.gatewayID, Cluster: l.Peer, Port: port},
			})
		}
	}
}

// steadyRTT is the RTT peer's failover tiers are ordered by: the one kept
// before, until a measurement moves from it by more than a millisecond and
// by more than a quarter of it. Two peers about as far away would
// otherwise swap tiers whenever their RTTs cross a rounding step, moving
// traffic between them and rebuilding every sidecar's snapshot each time.
// Called with s.mu held.
func (s *Server) steadyRTT(peer string, d time.Duration) time.Duration {
	if kept, ok := s.rttKept[peer]; ok {
		if diff := d - kept; max(diff, -diff) <= max(time.Millisecond, kept/4) {
			return kept
		}
	}
	s.rttKept[peer] = d
	return d
}

// failoverTiers gives each linked peer its failover priority for one
// service (the local cluster is 0): the policy's peers in their order
// (unlisted peers get nothing), or all peers by measured RTT, nearest
// first, or by default every peer in one tier.
func failoverTiers(p *controlplanev1.Failover, f *fedWorld) map[string]uint32 {
	out := map[string]uint32{}
	switch {
	case len(p.GetPeers()) > 0:
		for i, peer := range p.GetPeers() {
			out[peer] = uint32(i + 1)
		}
	case p.GetByRtt():
		peers := make([]string, 0, len(f.links))
		for _, l := range f.links {
			peers = append(peers, l.Peer)
		}
		// Unmeasured peers go last, in link order.
		slices.SortStableFunc(peers, func(a, b string) int {
			ra, oka := f.rtt[a]
			rb, okb := f.rtt[b]
			switch {
			case oka && okb && ra > 0 && rb > 0:
				return cmp.Compare(ra, rb)
			case oka && ra > 0:
				return -1
			case okb && rb > 0:
				return 1
			}
			return 0
		})
		for i, peer := range peers {
			out[peer] = uint32(i + 1)
		}
	default:
		for _, l := range f.links {
			out[l.Peer] = 1
		}
	}
	return out
}

// gatewaySnapshot is what this cluster's gateways get from w.
func gatewaySnapshot(w *world, cluster string) *controlplanev1.GatewaySnapshot {
	snap := &controlplanev1.GatewaySnapshot{Cluster: cluster, Bundle: w.bundle, Reissue: w.reissue,
		SignedBundle: w.signedBundle, Intermediates: w.intermediates, Rotation: w.rotation}
	for _, l := range w.fed.links {
		snap.Links = append(snap.Links, linkProto(l))
	}
	keys := make([]string, 0, len(w.fed.exports))
	for k := range w.fed.exports {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		e := w.fed.exports[k]
		ns, name := resource.ServiceKey(e)
		es := &federationv1.ExportedService{Namespace: ns, Name: name, Ports: []uint32{MeshPort}, Protocol: "http"}
		ge := &controlplanev1.GatewayExport{Service: es, ToClusters: slices.Clone(e.Spec.ToClusters)}
		zones := map[[2]string]uint32{}
		for _, in := range w.instances {
			if in.Service != name || in.Namespace != ns {
				continue
			}
			es.Protocol = protocolName(in.Protocol)
			es.Total++
			if !slices.Contains(es.SpiffeIds, in.SPIFFEID) {
				es.SpiffeIds = append(es.SpiffeIds, in.SPIFFEID)
			}
			if in.Health != controlplanev1.Health_HEALTH_HEALTHY {
				continue
			}
			es.Healthy++
			zones[[2]string{in.Region, in.Zone}]++
			ge.Endpoints = append(ge.Endpoints, in.Address)
		}
		slices.Sort(es.SpiffeIds)
		for _, z := range slices.SortedFunc(maps.Keys(zones), func(a, b [2]string) int { return strings.Compare(a[0]+"/"+a[1], b[0]+"/"+b[1]) }) {
			es.Localities = append(es.Localities, &federationv1.LocalityCount{Region: z[0], Zone: z[1], Healthy: zones[z]})
		}
		snap.Exports = append(snap.Exports, ge)
	}
	return snap
}

func linkProto(l store.Link) *controlplanev1.Link {
	return &controlplanev1.Link{Id: l.ID, Peer: l.Peer, PeerGatewayAddresses: slices.Clone(l.PeerGateways), Role: l.Role, Created: timestamppb.New(l.Created)}
}

// federationServer serves FederationService.
type federationServer struct {
	controlplanev1.UnimplementedFederationServiceServer
	s *Server
}

func checkHostPort(what, a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil || host == "" || port == "" || len(a) > 262 {
		return fmt.Errorf("%w: %s %q is not host:port", ErrBadRequest, what, a)
	}
	return nil
}

func (f federationServer) WatchGateway(req *controlplanev1.WatchGatewayRequest, stream controlplanev1.FederationService_WatchGatewayServer) error {
	s := f.s
	ctx := stream.Context()
	if err := identity.ValidateClusterName(req.GetNode()); err != nil {
		return toStatus(fmt.Errorf("%w: node: %w", ErrBadRequest, err))
	}
	if err := checkHostPort("entry address", req.GetEntryAddress()); err != nil {
		return toStatus(err)
	}
	if len(req.GetPeerAddresses()) == 0 || len(req.GetPeerAddresses()) > maxGatewayAddrs {
		return toStatus(fmt.Errorf("%w: 1 to %d peer addresses required, got %d", ErrBadRequest, maxGatewayAddrs, len(req.GetPeerAddresses())))
	}
	for _, a := range req.GetPeerAddresses() {
		if err := checkHostPort("peer address", a); err != nil {
			return toStatus(err)
		}
	}
	c, _ := callerFrom(ctx)
	s.mu.Lock()
	g := s.gateways[req.GetNode()]
	if g == nil {
		g = &gatewayNode{name: req.GetNode(), reports: map[string]*controlplanev1.PeerReport{}}
		s.gateways[req.GetNode()] = g
	}
	g.entry, g.peerAddrs = req.GetEntryAddress(), slices.Clone(req.GetPeerAddresses())
	g.streams++
	s.mu.Unlock()
	s.pokeFederation()
	defer func() {
		s.mu.Lock()
		g.streams--
		s.mu.Unlock()
		s.pokeFederation()
	}()
	n, wake := s.attach("gateway/"+req.GetNode(), c.id)
	defer s.detach(n, wake)
	expiry := time.NewTimer(time.Until(c.leaf.NotAfter))
	defer expiry.Stop()
	var last *controlplanev1.GatewaySnapshot
	for {
		if _, err := s.authenticate(ctx); err != nil {
			return toStatus(err)
		}
		s.mu.Lock()
		w := s.world
		s.mu.Unlock()
		snap := gatewaySnapshot(w, s.cfg.Cluster)
		if last == nil || !proto.Equal(last, snap) {
			last = snap
			out := proto.Clone(snap).(*controlplanev1.GatewaySnapshot)
			out.Version = w.version
			if err := stream.Send(&controlplanev1.WatchGatewayResponse{Snapshot: out}); err != nil {
				return err
			}
			s.metrics.pushes.Inc()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-expiry.C:
			return toStatus(fmt.Errorf("%w: the SVID this stream was opened with expired; reconnect with the renewed one", ErrUnauthenticated))
		case <-wake:
		}
	}
}

func (f federationServer) ReportPeers(ctx context.Context, req *controlplanev1.ReportPeersRequest) (*controlplanev1.ReportPeersResponse, error) {
	s := f.s
	if err := identity.ValidateClusterName(req.GetNode()); err != nil {
		return nil, fmt.Errorf("%w: node: %w", ErrBadRequest, err)
	}
	if len(req.GetPeers()) > maxPeers {
		return nil, fmt.Errorf("%w: %d peers, more than %d", ErrBadRequest, len(req.GetPeers()), maxPeers)
	}
	if len(req.GetBundleDigest()) > maxDigestLen || len(req.GetSvidIssuer()) > maxDigestLen {
		return nil, fmt.Errorf("%w: bundle digest or SVID issuer longer than %d bytes", ErrBadRequest, maxDigestLen)
	}
	reports := map[string]*controlplanev1.PeerReport{}
	for _, p := range req.GetPeers() {
		if err := identity.ValidateClusterName(p.GetPeer()); err != nil {
			return nil, fmt.Errorf("%w: peer: %w", ErrBadRequest, err)
		}
		if len(p.GetImports()) > maxImportsOfPeer {
			return nil, fmt.Errorf("%w: peer %s: %d imports, more than %d", ErrBadRequest, p.GetPeer(), len(p.GetImports()), maxImportsOfPeer)
		}
		for _, es := range p.GetImports() {
			if err := catalog.Validate(es); err != nil {
				return nil, fmt.Errorf("%w: peer %s: %w", ErrBadRequest, p.GetPeer(), err)
			}
		}
		if len(p.GetGatewayAddresses()) > maxGatewayAddrs {
			return nil, fmt.Errorf("%w: peer %s: more than %d gateway addresses", ErrBadRequest, p.GetPeer(), maxGatewayAddrs)
		}
		for _, a := range p.GetGatewayAddresses() {
			if err := checkHostPort("peer gateway address", a); err != nil {
				return nil, err
			}
		}
		reports[p.GetPeer()] = p
	}
	// A peer's announced gateway addresses update its link (a cluster that
	// joined pending had none to give at the join).
	links, err := s.cfg.Store.Links()
	if err != nil {
		return nil, err
	}
	for _, l := range links {
		if r := reports[l.Peer]; r != nil && len(r.GetGatewayAddresses()) > 0 && !slices.Equal(l.PeerGateways, r.GetGatewayAddresses()) {
			changed, err := s.cfg.Store.UpdateLinkGateways(l.Peer, r.GetGatewayAddresses())
			if err != nil {
				return nil, err
			}
			if changed {
				s.log.Info("peer gateway addresses updated", "peer", l.Peer, "addresses", r.GetGatewayAddresses())
			}
		}
	}
	s.mu.Lock()
	g := s.gateways[req.GetNode()]
	if g == nil {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: gateway %s has no WatchGateway stream open", ErrBadRequest, req.GetNode())
	}
	changed := len(g.reports) != len(reports)
	for peer, r := range reports {
		if old := g.reports[peer]; old == nil || !importsEqual(old.GetImports(), r.GetImports()) || !proto.Equal(old.GetRotation(), r.GetRotation()) {
			changed = true
		}
	}
	if g.reported.IsZero() {
		changed = true // the first report: sidecars may get the peers now
	}
	g.reports, g.reported = reports, s.cfg.Clock()
	s.mu.Unlock()
	c, _ := callerFrom(ctx)
	s.noteDigest("gateway/"+req.GetNode(), c.id, req.GetBundleDigest(), req.GetSvidIssuer(), controlplanev1.Health_HEALTH_HEALTHY)
	if s.offerRotation(reports) {
		changed = true
	}
	if changed {
		s.pokeFederation()
	}
	return &controlplanev1.ReportPeersResponse{}, nil
}

// offerRotation hands what peers relayed (signed bundles, this cluster's
// re-signed intermediate) to Trust, which installs what verifies and is
// newer. It reports whether anything was installed.
func (s *Server) offerRotation(reports map[string]*controlplanev1.PeerReport) bool {
	if s.cfg.Trust == nil || s.cfg.RootCA != nil {
		return false // the root authority's bundle and intermediate come from its CA
	}
	installed := false
	// The newest bundle first: an older one is then simply not newer.
	peers := slices.SortedFunc(maps.Keys(reports), func(a, b string) int {
		return cmp.Compare(reports[b].GetSignedBundle().GetSequence(), reports[a].GetSignedBundle().GetSequence())
	})
	for _, peer := range peers {
		r := reports[peer]
		if jws := r.GetSignedBundle().GetJws(); jws != "" {
			// Newer, or the bundle held when its signed form is not (kept
			// to be relayed on). The sequence is the relayer's word only:
			// Trust checks the signed one.
			seq := r.GetSignedBundle().GetSequence()
			if b := s.cfg.Bundle(); b == nil || seq > b.Sequence() || seq == b.Sequence() && jws != s.cfg.Trust.SignedBundle() {
				ok, err := s.cfg.Trust.OfferBundle(jws)
				if err != nil {
					s.logOnce("bundle-"+peer, "a trust bundle relayed by a peer was refused", "peer", peer, "err", err)
				} else if ok {
					installed = true
					s.log.Info("trust bundle installed from the root authority, relayed by a peer", "peer", peer, "sequence", s.cfg.Bundle().Sequence(), "digest", s.cfg.Bundle().Digest())
				}
			}
		}
	}
	for _, peer := range peers {
		im := reports[peer].GetIntermediate()
		if im == nil || im.GetCluster() != s.cfg.Cluster || len(im.GetChain()) == 0 {
			continue
		}
		ok, err := s.cfg.Trust.OfferIntermediate(im.GetChain())
		if err != nil {
			s.logOnce("intermediate-"+peer, "an intermediate relayed by a peer was refused", "peer", peer, "err", err)
		} else if ok {
			installed = true
			s.log.Info("intermediate re-signed by the root authority installed", "peer", peer)
		}
	}
	return installed
}

// logOnce logs at warn a message for key unless the same error was the
// last one logged for it.
func (s *Server) logOnce(key, msg string, args ...any) {
	text := fmt.Sprint(args...)
	s.mu.Lock()
	if s.logged == nil {
		s.logged = map[string]string{}
	}
	same := s.logged[key] == text
	s.logged[key] = text
	s.mu.Unlock()
	if !same {
		s.log.Warn(msg, args...)
	}
}

func importsEqual(a, b []*federationv1.ExportedService) bool {
	return slices.EqualFunc(a, b, func(x, y *federationv1.ExportedService) bool { return proto.Equal(x, y) })
}

func (f federationServer) RemoveLink(ctx context.Context, req *controlplanev1.RemoveLinkRequest) (*controlplanev1.RemoveLinkResponse, error) {
	if err := identity.ValidateClusterName(req.GetPeer()); err != nil {
		return nil, fmt.Errorf("%w: peer: %w", ErrBadRequest, err)
	}
	if err := f.s.cfg.Store.DeleteLink(req.GetPeer()); err != nil {
		return nil, err
	}
	f.s.log.Info("link removed", "peer", req.GetPeer())
	return &controlplanev1.RemoveLinkResponse{}, nil
}

func (f federationServer) FederationStatus(ctx context.Context, _ *controlplanev1.FederationStatusRequest) (*controlplanev1.FederationStatusResponse, error) {
	s := f.s
	resp := &controlplanev1.FederationStatusResponse{Cluster: s.cfg.Cluster}
	if b := s.cfg.Bundle(); b != nil {
		resp.BundleDigest = b.Digest()
	}
	s.mu.Lock()
	w := s.world
	var latest map[string]*controlplanev1.PeerReport
	var at time.Time
	for _, g := range s.gateways {
		if g.streams > 0 && g.reported.After(at) {
			latest, at = g.reports, g.reported
		}
	}
	s.mu.Unlock()
	for _, l := range w.fed.links {
		ls := &controlplanev1.LinkStatus{Link: linkProto(l), State: "down", LastError: "no gateway of this cluster has reported on this link"}
		if r := latest[l.Peer]; r != nil {
			ls.State, ls.ControlStreamUp, ls.Rtt = r.GetState(), r.GetControlStreamUp(), r.GetRtt()
			ls.PeerBundleDigest, ls.CatalogLag, ls.LastHeard, ls.LastError = r.GetPeerBundleDigest(), r.GetCatalogLag(), r.GetLastHeard(), r.GetLastError()
			ls.BundleInSync = r.GetPeerBundleDigest() != "" && r.GetPeerBundleDigest() == resp.BundleDigest
		}
		ls.Imported = uint32(len(w.fed.imports[l.Peer]))
		for _, e := range w.fed.exports {
			if e.ExportedTo(l.Peer) {
				ls.Exported++
			}
		}
		ls.Conflicts = slices.Clone(w.fed.conflicts[l.Peer])
		resp.Links = append(resp.Links, ls)
	}
	return resp, nil
}

// pokeFederation asks for a rebuild after a gateway report or stream change.
func (s *Server) pokeFederation() {
	select {
	case s.fedWake <- struct{}{}:
	default:
	}
}
