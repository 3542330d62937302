package server

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/store"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// Trust is a cluster's trust material as it changes during a root
// rotation: the intermediate in force, the bundle as the root authority
// signed it, and how what peers relay is installed.
type Trust interface {
	// Intermediate is the cluster's current intermediate certificate.
	Intermediate() *x509.Certificate
	// SignedBundle is the bundle in force as the root authority signed it
	// (a JWS), or "" if none is known.
	SignedBundle() string
	// OfferBundle installs a signed bundle a peer relayed if it verifies
	// against the bundle in force and is newer. It reports whether it
	// installed it; an older or equal sequence is no error.
	OfferBundle(jws string) (bool, error)
	// OfferIntermediate installs this cluster's intermediate as the root
	// authority re-signed it (DER, intermediate first) if it is for this
	// cluster and its key, verifies and is not older than the one in
	// force; it reports whether anything changed.
	OfferIntermediate(chain [][]byte) (bool, error)
}

// RootInfo describes one root of the mesh CA.
type RootInfo struct {
	ID          string
	State       string // active, prepared, old, tainted, retired, revoked
	InBundle    bool
	Fingerprint string // "sha256:<hex>"
	NotAfter    time.Time
}

// RootCA is the mesh CA, held by the root authority's control plane only.
// Errors wrapping ErrFailedPrecondition say a step is not possible now.
type RootCA interface {
	Roots() []RootInfo
	Prepare(ctx context.Context, ttl time.Duration) error
	// Activate makes the prepared root the signing root and re-signs every
	// cluster's intermediate under it (this cluster's is installed).
	Activate(ctx context.Context) error
	// Retire removes the old root; acknowledged says every node of every
	// cluster presents a chain to the active root.
	Retire(ctx context.Context, acknowledged, force bool) error
	Taint(ctx context.Context, rootID string) error
	Revoke(ctx context.Context, rootID string) error
	// Intermediates are the current intermediates by cluster.
	Intermediates() map[string]*x509.Certificate
	// Sync puts the CA's bundle and this cluster's intermediate in force
	// here if they are not yet (a step whose own attempt failed).
	Sync() error
}

// ErrFailedPrecondition says a step cannot be taken now (a gate is closed).
var ErrFailedPrecondition = errors.New("server: failed precondition")

// Rotation steps.
const (
	stepPrepare  = "prepare"
	stepActivate = "activate"
	stepRetire   = "retire"
	stepTaint    = "taint"
	stepRevoke   = "revoke"
)

// maxBehind bounds the nodes named in a rotation report.
const maxBehind = 20

// maxDigestLen bounds the digests and fingerprints nodes report.
const maxDigestLen = 128

// ownRotation is this cluster's rotation report, from what its nodes
// (sidecars and gateways) connected now last reported. The caller holds
// s.mu.
func (s *Server) ownRotationLocked(b *bundle.Bundle, inter *x509.Certificate) *federationv1.RotationReport {
	r := &federationv1.RotationReport{Cluster: s.cfg.Cluster}
	if b != nil {
		r.BundleSequence, r.BundleDigest = b.Sequence(), b.Digest()
		r.IntermediateRoot = rootOf(b, inter)
	}
	r.Intermediate = svid.Fingerprint(inter)
	for _, n := range s.sortedNodes() {
		if len(n.streams) == 0 {
			continue
		}
		r.Nodes++
		var why []string
		switch {
		case n.digest == "":
			why = append(why, "no report yet")
		case n.digest != r.BundleDigest:
			why = append(why, "holds bundle "+short(n.digest))
		default:
			r.NodesBundleCurrent++
		}
		switch {
		case n.digest == "":
		case r.Intermediate != "" && n.issuer != r.Intermediate:
			why = append(why, "SVID from intermediate "+short(n.issuer))
		default:
			r.NodesSvidCurrent++
		}
		if len(why) > 0 && len(r.Behind) < maxBehind {
			r.Behind = append(r.Behind, n.name+": "+strings.Join(why, ", "))
		}
	}
	// The control plane's own serving SVID, which every node verifies on
	// each new connection, counts when it is not from the intermediate in
	// force; ownSVIDLoop is asked to renew it now.
	if own := s.ownIssuer.Load(); own != nil && *own != "" && r.Intermediate != "" && *own != r.Intermediate {
		r.Nodes++
		r.Behind = append([]string{"control plane: serving SVID from intermediate " + short(*own)}, r.Behind...)
		r.Behind = r.Behind[:min(len(r.Behind), maxBehind)]
		select {
		case s.renewOwn <- struct{}{}:
		default:
		}
	}
	// Just started: the nodes attached so far are not all there are. The
	// control plane counts as one more node behind until they had time to
	// reconnect, so that no gate opens on a partial count.
	if !s.started.IsZero() && s.cfg.Clock().Sub(s.started) < rotationSettle {
		r.Nodes++
		r.Behind = append([]string{fmt.Sprintf("control plane: started less than %s ago, its nodes may still be reconnecting", rotationSettle)}, r.Behind...)
		r.Behind = r.Behind[:min(len(r.Behind), maxBehind)]
	}
	return r
}

// rotationSettle is how long after a start a control plane's rotation
// report holds its cluster behind: nodes reconnect within their backoff
// (at most 2s for configuration streams).
const rotationSettle = 5 * time.Second

// rootOf is the fingerprint of the root in b that signed c, or "".
func rootOf(b *bundle.Bundle, c *x509.Certificate) string {
	if c == nil {
		return ""
	}
	for _, r := range b.Roots() {
		if c.CheckSignatureFrom(r) == nil {
			return svid.Fingerprint(r)
		}
	}
	return ""
}

// short abbreviates a "sha256:<hex>" digest for messages.
func short(d string) string {
	if d == "" {
		return "(none)"
	}
	// What a node reports reaches operators' terminals: anything but a
	// "sha256:<hex>" digest is not repeated.
	if !strings.HasPrefix(d, "sha256:") || strings.Trim(d[len("sha256:"):], "0123456789abcdef") != "" {
		return "(malformed)"
	}
	if len(d) > 19 {
		// On a character boundary: what nodes report is any UTF-8, and a
		// report that is not valid UTF-8 does not marshal.
		i := 19
		for i > 0 && !utf8.RuneStart(d[i]) {
			i--
		}
		return d[:i] + "…"
	}
	return d
}

func (s *Server) intermediate() *x509.Certificate {
	if s.cfg.Trust == nil {
		return nil
	}
	return s.cfg.Trust.Intermediate()
}

// activeRoot is the fingerprint of the CA's active root, or "".
func activeRoot(roots []RootInfo) string {
	for _, r := range roots {
		if r.State == "active" {
			return r.Fingerprint
		}
	}
	return ""
}

// rotationStatus is every cluster's progress and what comes next.
// gateStatus is the rotation status a gate is judged by. The last
// rebuild's world may be a debounce or a tick old: when it says the next
// gate is open, the world is rebuilt and judged again, so that a node
// that reconnected since with old credentials holds the gate shut. One
// that caught up since opens it at the next rebuild.
func (s *Server) gateStatus(ctx context.Context) (*controlplanev1.RotationStatusResponse, error) {
	if st := s.rotationStatus(); !st.GetReady() {
		return st, nil
	}
	if err := s.rebuild(ctx); err != nil {
		return nil, err
	}
	return s.rotationStatus(), nil
}

func (s *Server) rotationStatus() *controlplanev1.RotationStatusResponse {
	resp := &controlplanev1.RotationStatusResponse{Cluster: s.cfg.Cluster, RootAuthority: s.cfg.RootCA != nil}
	if s.cfg.RootCA != nil {
		// A step the CA committed but whose bundle this cluster failed to
		// put in force is caught up here; until it is, no gate opens on
		// the old bundle.
		if err := s.cfg.RootCA.Sync(); err != nil {
			s.log.Warn("putting the CA's bundle in force failed; retrying", "err", err)
		}
	}
	b := s.cfg.Bundle()
	if b != nil {
		resp.BundleSequence, resp.BundleDigest = b.Sequence(), b.Digest()
	}
	var roots []RootInfo
	if s.cfg.RootCA != nil {
		roots = s.cfg.RootCA.Roots()
	} else if b != nil {
		for _, r := range b.Roots() {
			roots = append(roots, RootInfo{ID: svid.RootID(r), State: "trusted", InBundle: true, Fingerprint: svid.Fingerprint(r), NotAfter: r.NotAfter})
		}
	}
	for _, r := range roots {
		resp.Roots = append(resp.Roots, &controlplanev1.RootInfo{Id: r.ID, State: r.State, InBundle: r.InBundle, Fingerprint: r.Fingerprint, NotAfter: timestamppb.New(r.NotAfter)})
	}
	active := activeRoot(roots)
	s.mu.Lock()
	w := s.world
	s.mu.Unlock()
	clusters := []*federationv1.RotationReport{w.rotation}
	waitingFor := map[string]string{}
	for _, l := range w.fed.links {
		r := w.fed.rotations[l.Peer]
		if r == nil {
			r = &federationv1.RotationReport{Cluster: l.Peer}
			waitingFor[l.Peer] = "no rotation report from " + l.Peer + " yet"
			if w.fed.down[l.Peer] || w.fed.entry == "" {
				waitingFor[l.Peer] += " (link down)"
			}
		}
		clusters = append(clusters, r)
	}
	// Every cluster that holds an intermediate of the mesh CA takes part,
	// linked here or not: one this root authority cannot see (or reach
	// with its re-signed intermediate) holds the gates shut rather than
	// being cut off at retire.
	if s.cfg.RootCA != nil {
		linked := map[string]bool{s.cfg.Cluster: true}
		for _, l := range w.fed.links {
			linked[l.Peer] = true
		}
		ims := s.cfg.RootCA.Intermediates()
		for _, c := range slices.Sorted(maps.Keys(ims)) {
			if !linked[c] {
				clusters = append(clusters, &federationv1.RotationReport{Cluster: c})
				waitingFor[c] = fmt.Sprintf("holds an intermediate of the mesh CA but is not linked to %s: its progress cannot be seen nor its re-signed intermediate delivered; link it with a join token (or pass --force, and it fails verification after retire)", s.cfg.Cluster)
			}
		}
	}
	for _, r := range clusters {
		cr := &controlplanev1.ClusterRotation{Report: r}
		cr.BundleInSync = r.GetBundleDigest() == resp.BundleDigest && r.GetNodesBundleCurrent() == r.GetNodes()
		cr.SvidsOnActiveRoot = (active == "" || r.GetIntermediateRoot() == active) && r.GetNodesSvidCurrent() == r.GetNodes()
		cr.Waiting = waitingFor[r.GetCluster()]
		if cr.Waiting == "" {
			cr.Waiting = waitingText(r, resp.BundleDigest, active, cr)
			if cr.Waiting != "" && w.fed.down[r.GetCluster()] {
				cr.Waiting += " (link down: this report may be old)"
			}
		}
		resp.Clusters = append(resp.Clusters, cr)
	}
	var inForce []string
	if b != nil {
		for _, r := range b.Roots() {
			inForce = append(inForce, svid.Fingerprint(r))
		}
	}
	resp.Next, resp.Ready = nextStep(roots, inForce, resp.Clusters, s.cfg.RootCA != nil)
	if a, err := s.cfg.Store.GetAutoRotation(); err == nil && !a.Started.IsZero() {
		resp.Auto = autoProto(a)
	}
	return resp
}

func waitingText(r *federationv1.RotationReport, digest, active string, cr *controlplanev1.ClusterRotation) string {
	var parts []string
	if r.GetBundleDigest() != digest {
		parts = append(parts, fmt.Sprintf("its control plane holds bundle %s (sequence %d), not %s", short(r.GetBundleDigest()), r.GetBundleSequence(), short(digest)))
	} else if !cr.BundleInSync {
		parts = append(parts, fmt.Sprintf("%d of %d nodes hold bundle %s", r.GetNodesBundleCurrent(), r.GetNodes(), short(digest)))
	}
	if active != "" && r.GetIntermediateRoot() != active {
		parts = append(parts, "its intermediate is not yet signed by the active root")
	} else if r.GetNodesSvidCurrent() != r.GetNodes() {
		parts = append(parts, fmt.Sprintf("%d of %d nodes present an SVID from the current intermediate", r.GetNodesSvidCurrent(), r.GetNodes()))
	}
	if len(parts) == 0 {
		return ""
	}
	out := strings.Join(parts, "; ")
	if len(r.GetBehind()) > 0 {
		out += " [" + strings.Join(r.GetBehind(), "; ") + "]"
	}
	return out
}

// nextStep says what the rotation's next step is and whether its gate is
// open: activate once every cluster holds the bundle with the prepared
// root, retire once every node presents a chain to the active root, and
// otherwise (idle) once every cluster holds the bundle in force.
func nextStep(roots []RootInfo, inForce []string, clusters []*controlplanev1.ClusterRotation, rootAuthority bool) (string, bool) {
	has := func(state string) *RootInfo {
		for i := range roots {
			if roots[i].State == state {
				return &roots[i]
			}
		}
		return nil
	}
	var bundleBehind, svidBehind []string
	for _, c := range clusters {
		if !c.GetBundleInSync() {
			bundleBehind = append(bundleBehind, c.GetReport().GetCluster())
		}
		if !c.GetSvidsOnActiveRoot() {
			svidBehind = append(svidBehind, c.GetReport().GetCluster())
		}
	}
	wait := func(step, what string, behind []string) (string, bool) {
		if len(behind) == 0 {
			return step + ": ready (" + what + " everywhere)", true
		}
		return fmt.Sprintf("%s: waiting for %s (%s)", step, strings.Join(behind, ", "), what), false
	}
	if !rootAuthority {
		return wait("in sync", "bundle held and SVIDs re-issued", slices.Concat(bundleBehind, svidBehind))
	}
	switch {
	case has("tainted") != nil:
		return fmt.Sprintf("revoke %s: ready (emergency: everything chained to it will be refused)", has("tainted").ID), true
	case has("prepared") != nil:
		if p := has("prepared"); !slices.Contains(inForce, p.Fingerprint) {
			// Every cluster may hold the bundle in force, but that one
			// does not announce the prepared root yet.
			return fmt.Sprintf("%s: waiting for this cluster to put the bundle with root %s in force", stepActivate, p.ID), false
		}
		return wait(stepActivate, "every node holds the bundle with root "+has("prepared").ID, bundleBehind)
	case has("old") != nil:
		return wait(stepRetire, "every node presents an SVID chained to root "+has("active").ID, slices.Concat(bundleBehind, svidBehind))
	default:
		if len(bundleBehind) > 0 {
			return wait("idle", "every node holds the bundle in force", bundleBehind)
		}
		return "prepare: nothing in progress; every cluster holds the bundle in force", true
	}
}

func autoProto(a store.AutoRotation) *controlplanev1.AutoRotation {
	out := &controlplanev1.AutoRotation{Running: a.Running, Started: timestamppb.New(a.Started), LastError: a.LastError, Done: a.Done}
	for _, st := range a.Steps {
		p := &controlplanev1.StepTiming{Step: st.Step, Taken: timestamppb.New(st.Taken)}
		if !st.Acknowledged.IsZero() {
			p.Acknowledged = timestamppb.New(st.Acknowledged)
		}
		out.Steps = append(out.Steps, p)
		out.Step = st.Step
	}
	return out
}

// rotate takes one step on the root authority.
func (s *Server) rotate(ctx context.Context, req *controlplanev1.RotateRequest) error {
	ca := s.cfg.RootCA
	if ca == nil {
		return fmt.Errorf("%w: cluster %s is not the root authority; run the rotation against the root authority's control plane", ErrFailedPrecondition, s.cfg.Cluster)
	}
	step := req.GetStep()
	if a, err := s.cfg.Store.GetAutoRotation(); err == nil && a.Running && (step == stepPrepare || step == stepActivate || step == stepRetire) {
		return fmt.Errorf("%w: an automatic rotation is in progress (step %s); cancel it first (strait ca rotate --auto --cancel)", ErrFailedPrecondition, autoProto(a).GetStep())
	}
	st, err := s.gateStatus(ctx)
	if err != nil {
		return err
	}
	gate := func(want string) error {
		if req.GetForce() || (st.GetReady() && strings.HasPrefix(st.GetNext(), want+":")) {
			return nil
		}
		var behind []string
		for _, c := range st.GetClusters() {
			if c.GetWaiting() != "" {
				behind = append(behind, c.GetReport().GetCluster()+": "+c.GetWaiting())
			}
		}
		msg := "next step is " + st.GetNext()
		if len(behind) > 0 {
			msg += "; behind: " + strings.Join(behind, " | ")
		}
		return fmt.Errorf("%w: %s cannot run now: %s (see strait ca rotate status, or pass --force)", ErrFailedPrecondition, want, msg)
	}
	switch step {
	case stepPrepare:
		err = ca.Prepare(ctx, req.GetRootTtl().AsDuration())
	case stepActivate:
		if err = gate(stepActivate); err == nil {
			err = ca.Activate(ctx)
		}
	case stepRetire:
		if err = gate(stepRetire); err == nil {
			err = ca.Retire(ctx, st.GetReady(), req.GetForce())
		}
	case stepTaint:
		err = ca.Taint(ctx, req.GetRootId())
	case stepRevoke:
		err = ca.Revoke(ctx, req.GetRootId())
	default:
		return fmt.Errorf("%w: step %q: want prepare, activate, retire, taint or revoke", ErrBadRequest, step)
	}
	if err != nil {
		return err
	}
	s.log.Info("rotation step taken", "step", step, "root_id", req.GetRootId(), "force", req.GetForce())
	// The new bundle and intermediates go out now, not at the next tick.
	if err := s.rebuild(ctx); err != nil {
		s.log.Warn("rebuild after a rotation step failed", "err", err)
	}
	return nil
}

// autoLoop drives an automatic rotation on the root authority: each step
// once the previous one is acknowledged everywhere. Its record is in the
// store, and the step reached is read from the CA's root states, so a
// restart at any point resumes where it was.
func (s *Server) autoLoop(ctx context.Context) error {
	if s.cfg.RootCA == nil {
		<-ctx.Done()
		return nil
	}
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		s.autoOnce(ctx)
	}
}

// autoOnce advances the automatic rotation, if one is running, by at most
// one step. A cancel waits for the step in progress: it is never
// overwritten by the record read before it.
func (s *Server) autoOnce(ctx context.Context) {
	s.autoMu.Lock()
	defer s.autoMu.Unlock()
	a, err := s.cfg.Store.GetAutoRotation()
	if err != nil || !a.Running {
		return
	}
	next := s.autoStep(ctx, a)
	if !autoEqual(a, next) {
		if err := s.cfg.Store.PutAutoRotation(next); err != nil {
			s.log.Error("saving the automatic rotation's progress failed", "err", err)
		}
	}
}

func autoEqual(a, b store.AutoRotation) bool {
	return a.Running == b.Running && a.Done == b.Done && a.LastError == b.LastError && slices.Equal(a.Steps, b.Steps)
}

// autoStep advances an automatic rotation by at most one step.
func (s *Server) autoStep(ctx context.Context, a store.AutoRotation) store.AutoRotation {
	a.Steps = slices.Clone(a.Steps)
	now := s.cfg.Clock()
	last := func() *store.RotationStep {
		if len(a.Steps) == 0 {
			return nil
		}
		return &a.Steps[len(a.Steps)-1]
	}
	take := func(step string, do func() error) {
		if err := do(); err != nil {
			if a.LastError != err.Error() {
				s.log.Warn("automatic rotation: step failed; retrying", "step", step, "err", err)
			}
			a.LastError = err.Error()
			return
		}
		a.LastError = ""
		a.Steps = append(a.Steps, store.RotationStep{Step: step, Taken: s.cfg.Clock()})
		s.log.Info("automatic rotation: step taken", "step", step)
		if err := s.rebuild(ctx); err != nil {
			s.log.Warn("rebuild after a rotation step failed", "err", err)
		}
	}
	st, err := s.gateStatus(ctx)
	if err != nil {
		a.LastError = err.Error()
		return a
	}
	ready := st.GetReady()
	var phase string // what the CA's roots say was taken last
	for _, r := range s.cfg.RootCA.Roots() {
		switch r.State {
		case "tainted":
			// The emergency path overrides: the operator finishes it by
			// hand (revoke), then starts a rotation again if needed.
			a.Running = false
			a.LastError = fmt.Sprintf("root %s was tainted during the automatic rotation; it stopped here: revoke it (strait ca rotate revoke %s), then start again", r.ID, r.ID)
			s.log.Warn("automatic rotation stopped: a root was tainted", "root_id", r.ID)
			return a
		case "prepared":
			phase = stepPrepare
		case "old":
			if phase == "" {
				phase = stepActivate
			}
		}
	}
	// Record a step the CA shows as taken but the record lacks (a crash
	// between the two writes).
	if l := last(); phase != "" && (l == nil || l.Step != phase) && !(phase == stepActivate && l != nil && l.Step == stepRetire) {
		if l != nil && l.Acknowledged.IsZero() {
			l.Acknowledged = now
		}
		a.Steps = append(a.Steps, store.RotationStep{Step: phase, Taken: now})
	}
	l := last()
	switch {
	case l == nil:
		take(stepPrepare, func() error { return s.cfg.RootCA.Prepare(ctx, a.RootTTL) })
	case !ready:
		// Waiting for acknowledgements.
	case l.Step == stepPrepare:
		l.Acknowledged = now
		take(stepActivate, func() error { return s.cfg.RootCA.Activate(ctx) })
	case l.Step == stepActivate && phase == "":
		// The old root is gone already: retired before a crash.
		l.Acknowledged = now
		a.Steps = append(a.Steps, store.RotationStep{Step: stepRetire, Taken: now})
	case l.Step == stepActivate:
		l.Acknowledged = now
		take(stepRetire, func() error { return s.cfg.RootCA.Retire(ctx, true, false) })
	case l.Step == stepRetire:
		l.Acknowledged = now
		a.Running, a.Done = false, true
		s.log.Info("automatic rotation done", "took", now.Sub(a.Started).Round(time.Millisecond))
	}
	return a
}

// rotationServer serves RotationService.
type rotationServer struct {
	controlplanev1.UnimplementedRotationServiceServer
	s *Server
}

func (r rotationServer) Rotate(ctx context.Context, req *controlplanev1.RotateRequest) (*controlplanev1.RotateResponse, error) {
	if err := r.s.rotate(ctx, req); err != nil {
		return nil, err
	}
	return &controlplanev1.RotateResponse{Status: r.s.rotationStatus()}, nil
}

func (r rotationServer) RotationStatus(ctx context.Context, _ *controlplanev1.RotationStatusRequest) (*controlplanev1.RotationStatusResponse, error) {
	return r.s.rotationStatus(), nil
}

func (r rotationServer) AutoRotate(ctx context.Context, req *controlplanev1.AutoRotateRequest) (*controlplanev1.AutoRotateResponse, error) {
	s := r.s
	if s.cfg.RootCA == nil {
		return nil, fmt.Errorf("%w: cluster %s is not the root authority; run the rotation against the root authority's control plane", ErrFailedPrecondition, s.cfg.Cluster)
	}
	s.autoMu.Lock()
	defer s.autoMu.Unlock()
	a, err := s.cfg.Store.GetAutoRotation()
	if err != nil {
		return nil, err
	}
	switch {
	case req.GetCancel():
		if !a.Running {
			return nil, fmt.Errorf("%w: no automatic rotation is running", ErrFailedPrecondition)
		}
		a.Running = false
		a.LastError = "cancelled"
		s.log.Info("automatic rotation cancelled; the roots stay as they are", "step", autoProto(a).GetStep())
	case a.Running:
		return &controlplanev1.AutoRotateResponse{Auto: autoProto(a)}, nil // already under way: follow it
	default:
		for _, root := range s.cfg.RootCA.Roots() {
			if root.State == "tainted" {
				return nil, fmt.Errorf("%w: root %s is tainted; revoke it first (strait ca rotate revoke %s)", ErrFailedPrecondition, root.ID, root.ID)
			}
		}
		a = store.AutoRotation{Running: true, Started: s.cfg.Clock(), RootTTL: req.GetRootTtl().AsDuration()}
		s.log.Info("automatic rotation started")
	}
	if err := s.cfg.Store.PutAutoRotation(a); err != nil {
		return nil, err
	}
	return &controlplanev1.AutoRotateResponse{Auto: autoProto(a)}, nil
}

// defaultReissueWindow spreads re-issuance after the intermediate changes.
const defaultReissueWindow = 30 * time.Second

// rotationWorld fills w's rotation material and writes what identifies it
// into h.
func (s *Server) rotationWorld(w *world, h interface{ Write([]byte) (int, error) }) {
	if s.cfg.Trust == nil {
		return
	}
	window := s.cfg.ReissueWindow
	if window <= 0 {
		window = defaultReissueWindow
	}
	if inter := s.cfg.Trust.Intermediate(); inter != nil {
		w.reissue = &controlplanev1.Reissue{Issuer: svid.Fingerprint(inter), Window: durationpb.New(window)}
		fmt.Fprintf(h, "r\x00%s\n", w.reissue.GetIssuer())
	}
	if jws := s.cfg.Trust.SignedBundle(); jws != "" {
		w.signedBundle = &federationv1.SignedBundle{Jws: jws}
		if b := s.cfg.Bundle(); b != nil {
			w.signedBundle.Sequence, w.signedBundle.Digest = b.Sequence(), b.Digest()
		}
		fmt.Fprintf(h, "j\x00%x\n", sha256.Sum256([]byte(jws)))
	}
	if s.cfg.RootCA == nil {
		return
	}
	ims := s.cfg.RootCA.Intermediates()
	for _, cluster := range slices.Sorted(maps.Keys(ims)) {
		if cluster == s.cfg.Cluster || ims[cluster] == nil {
			continue
		}
		w.intermediates = append(w.intermediates, &federationv1.IntermediateUpdate{Cluster: cluster, Chain: [][]byte{ims[cluster].Raw}})
		fmt.Fprintf(h, "m\x00%s\x00%s\n", cluster, svid.Fingerprint(ims[cluster]))
	}
}
