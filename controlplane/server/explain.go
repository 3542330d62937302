package server

import (
	"context"

	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/resource"
	"github.com/straitmesh/strait/controlplane/store"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// maxEjections bounds what one sidecar reports.
const maxEjections = 256

// noteEjections records the endpoints a sidecar's outlier detection ejects.
func (s *Server) noteEjections(name string, id spiffeid.ID, ej []*controlplanev1.Ejection) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.nodes[nodeKey(name, id)]; n != nil {
		n.ejections, n.reported = ej, s.cfg.Clock()
	}
}

// Explain says where traffic for a service goes and why, from the same
// view the sidecars get: tiers by failover priority with their health, the
// failover policy, and the peers left out.
func (a adminServer) Explain(ctx context.Context, req *controlplanev1.ExplainRequest) (*controlplanev1.ExplainResponse, error) {
	s := a.s
	ns := req.GetNamespace()
	if ns == "" {
		ns = "default"
	}
	for what, v := range map[string]string{"service": req.GetService(), "namespace": ns} {
		if err := identity.ValidateClusterName(v); err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrBadRequest, what, err)
		}
	}
	now := s.cfg.Clock()
	s.mu.Lock()
	w := s.world
	var from *controlplanev1.ExplainFrom
	ejected := map[string]bool{}
	if req.GetFrom() != "" {
		from = &controlplanev1.ExplainFrom{Node: req.GetFrom(), CurrentVersion: w.version}
		for _, n := range s.sortedNodes() {
			if n.name != req.GetFrom() || (from.Connected && len(n.streams) == 0) {
				continue
			}
			from.Connected, from.SnapshotVersion = len(n.streams) > 0, n.sentVersion
			if n.upTo == w.version {
				from.CurrentVersion = n.sentVersion // nothing newer for it
			}
			from.Ejected = nil
			if !n.reported.IsZero() {
				from.Reported = timestamppb.New(n.reported)
			}
			for _, e := range n.ejections {
				if e.GetUntil() != nil && !e.GetUntil().AsTime().After(now) {
					continue // over: the sidecar sends to it again
				}
				if e.GetService() == req.GetService() || e.GetService() == req.GetService()+"."+ns {
					from.Ejected = append(from.Ejected, e)
					ejected[e.GetEndpoint()] = true
				}
			}
		}
	}
	s.mu.Unlock()
	if from != nil && from.SnapshotVersion == 0 && !from.Connected {
		return nil, status.Errorf(codes.NotFound, "no sidecar named %q is connected to this control plane (--from takes a workload instance name, as in dev.json)", req.GetFrom())
	}
	snap := snapshotFor(w, s.cfg.Cluster, ns, &controlplanev1.WatchRequest{Node: "explain", Upstreams: []string{req.GetService()}})
	svc := snap.GetServices()[0]
	resp := &controlplanev1.ExplainResponse{Service: req.GetService(), Namespace: ns, Protocol: svc.GetProtocol(), Policy: svc.GetPolicy(), From: from}
	byPrio := map[uint32]*controlplanev1.ExplainTier{}
	for _, ep := range svc.GetEndpoints() {
		p := ep.GetPriority()
		if ep.GetTunnel() != nil && p == 0 {
			p = 1
		}
		t := byPrio[p]
		if t == nil {
			t = &controlplanev1.ExplainTier{Priority: p}
			byPrio[p] = t
		}
		cl := "local"
		if ep.GetTunnel() != nil {
			cl = ep.GetCluster()
		}
		if !slices.Contains(t.Clusters, cl) {
			t.Clusters = append(t.Clusters, cl)
		}
		n := max(ep.GetWeight(), 1)
		t.Total += n
		if ejected[ep.GetInstance()] {
			// The sidecar asked about ejects it: unhealthy in its view.
			ep = proto.Clone(ep).(*controlplanev1.Endpoint)
			ep.Health = controlplanev1.Health_HEALTH_UNHEALTHY
		}
		if ep.GetHealth() == controlplanev1.Health_HEALTH_HEALTHY {
			t.Healthy += n
		}
		t.Endpoints = append(t.Endpoints, ep)
	}
	f := svc.GetPolicy().GetFailover()
	prios := slices.Sorted(maps.Keys(byPrio))
	for i, p := range prios {
		t := byPrio[p]
		switch {
		case p == 0:
			t.Reason = "the local cluster comes first"
		case len(f.GetPeers()) > 0:
			t.Reason = fmt.Sprintf("listed %d in the policy's failover peers", p)
		case f.GetByRtt():
			t.Reason = fmt.Sprintf("peer %d by the RTT its gateway measures", p)
		default:
			t.Reason = "peers that export the service, after the local cluster"
		}
		if i > 0 {
			if th := f.GetSpillThresholdPercent(); th > 0 {
				t.Reason += fmt.Sprintf("; gets traffic when the tiers before it are below %d%% healthy", th)
			} else {
				t.Reason += "; gets traffic when no tier before it has a healthy endpoint"
			}
		}
		resp.Tiers = append(resp.Tiers, t)
	}
	// Peers that export the service but are left out.
	tiers := failoverTiers(f, &w.fed)
	haveLocal := slices.ContainsFunc(svc.GetEndpoints(), func(ep *controlplanev1.Endpoint) bool { return ep.GetTunnel() == nil })
	for _, l := range w.fed.links {
		var exported *federationv1.ExportedService
		for _, es := range w.fed.imports[l.Peer] {
			if es.GetNamespace() == ns && es.GetName() == req.GetService() {
				exported = es
			}
		}
		switch {
		case exported == nil:
		case exported.GetTotal() == 0:
			resp.Excluded = append(resp.Excluded, l.Peer+": exports it, but no instance of it runs there")
		case w.fed.entry == "":
			resp.Excluded = append(resp.Excluded, l.Peer+": no gateway of this cluster is connected")
		case w.fed.conflicted(l.Peer, ns, req.GetService()):
			resp.Excluded = append(resp.Excluded, l.Peer+": its export conflicts with an earlier link's (see federation status)")
		case w.fed.stale[l.Peer+"\x00"+ns+"/"+req.GetService()]:
			resp.Excluded = append(resp.Excluded, fmt.Sprintf("%s: not heard from for longer than the service's staleness (%s): its endpoints expired", l.Peer, staleness(svc.GetPolicy())))
		case haveLocal && protocolOf(exported.GetProtocol()) != svc.GetProtocol():
			resp.Excluded = append(resp.Excluded, fmt.Sprintf("%s: exports it as %s, but it runs here as %s", l.Peer, exported.GetProtocol(), protocolName(svc.GetProtocol())))
		default:
			if _, ok := tiers[l.Peer]; !ok {
				resp.Excluded = append(resp.Excluded, l.Peer+": not in the policy's failover peers")
			}
		}
	}
	// Peers the policy names that are not linked (a typo, or a link not
	// made yet) get no traffic either.
	for _, peer := range f.GetPeers() {
		if !slices.ContainsFunc(w.fed.links, func(l store.Link) bool { return l.Peer == peer }) {
			resp.Excluded = append(resp.Excluded, peer+": named in the policy's failover peers, but not linked to this cluster")
		}
	}
	resp.Summary = explainSummary(resp)
	if from != nil {
		resp.Summary += " (as " + from.GetNode() + " sees it"
		if n := len(from.GetEjected()); n > 0 {
			resp.Summary += fmt.Sprintf(", with %d endpoint(s) its outlier detection ejects", n)
		}
		resp.Summary += ")"
	}
	return resp, nil
}

// staleness is how long a peer's endpoints of a service outlive its last
// heartbeat (as markStale applies it).
func staleness(p *controlplanev1.TrafficPolicy) time.Duration {
	if d := p.GetFailover().GetStaleness(); d != nil {
		return d.AsDuration()
	}
	return resource.DefaultStaleness
}

func explainSummary(r *controlplanev1.ExplainResponse) string {
	name := r.GetNamespace() + "/" + r.GetService()
	for i, t := range r.GetTiers() {
		if t.GetHealthy() == 0 {
			continue
		}
		where := "to the local cluster"
		if t.GetPriority() > 0 {
			where = "to " + strings.Join(t.GetClusters(), ", ") + " through this cluster's gateway"
			if r.GetTiers()[0].GetPriority() == 0 {
				where += " (the local cluster has no healthy endpoint)"
			}
		}
		spill := ""
		// The balancer spills only to a later tier with a healthy endpoint.
		next := slices.ContainsFunc(r.GetTiers()[i+1:], func(n *controlplanev1.ExplainTier) bool { return n.GetHealthy() > 0 })
		if th := r.GetPolicy().GetFailover().GetSpillThresholdPercent(); th > 0 && next && t.GetHealthy()*100 < t.GetTotal()*th {
			spill = fmt.Sprintf("; %d of %d healthy is below the %d%% spill threshold, so part of it moves to the next tier", t.GetHealthy(), t.GetTotal(), th)
		}
		return fmt.Sprintf("traffic for %s goes %s%s", name, where, spill)
	}
	if len(r.GetTiers()) == 0 {
		if len(r.GetExcluded()) > 0 {
			return "no endpoint anywhere for " + name + ": nothing runs it here, and the peers that export it are left out (see below)"
		}
		return "no endpoint anywhere for " + name + ": nothing runs it here and no linked peer exports it to this cluster"
	}
	return "no healthy endpoint for " + name + " in any tier: sidecars fall back to unhealthy ones (panic mode)"
}
