package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// Rotation relay: the three control messages a gateway passes between its
// control plane and its peers during a trust-root rotation (SignedBundle,
// IntermediateUpdate, RotationReport). The gateway judges none of them: it
// bounds them, keeps the latest of each per peer, and hands them on; the
// control planes verify signatures and chains against their own bundle.

// Bounds on what a peer may relay (docs/gateway-protocol.md).
const (
	maxSignedBundleJWS  = 64 << 10
	maxIntermediateLen  = 4        // certificates in an IntermediateUpdate chain
	maxIntermediateCert = 16 << 10 // bytes of one of them
	maxBehind           = 20       // RotationReport.behind entries kept
	maxBehindEntry      = 256      // bytes of one, longer ones are cut
	maxRelayString      = 256      // digests, fingerprints and other short strings
	// maxReportRelayBytes bounds the relayed messages one ReportPeers
	// carries over all peers, well inside the control plane's 4 MiB limit.
	maxReportRelayBytes = 2 << 20
	// maxReportBytes is the control plane's limit on a ReportPeers.
	maxReportBytes = 4 << 20
)

var errNotOurs = errors.New("for another cluster")

// checkSignedBundle bounds a SignedBundle. Its JWS is not verified here.
func checkSignedBundle(sb *federationv1.SignedBundle) error {
	switch {
	case sb.GetJws() == "":
		return errors.New("signed bundle without a JWS")
	case len(sb.GetJws()) > maxSignedBundleJWS:
		return fmt.Errorf("signed bundle JWS of %d bytes, more than %d", len(sb.GetJws()), maxSignedBundleJWS)
	case len(sb.GetDigest()) > maxRelayString:
		return fmt.Errorf("signed bundle digest of %d bytes, more than %d", len(sb.GetDigest()), maxRelayString)
	}
	return nil
}

// checkIntermediate bounds an IntermediateUpdate meant for cluster: a
// chain of 1 to 4 certificates of at most 16 KiB each. It returns
// errNotOurs if the update names another cluster. The chain is not parsed
// or verified here.
func checkIntermediate(iu *federationv1.IntermediateUpdate, cluster string) error {
	if iu.GetCluster() != cluster {
		return fmt.Errorf("intermediate update %w %q", errNotOurs, truncate(iu.GetCluster(), 64))
	}
	return checkChain(iu)
}

func checkChain(iu *federationv1.IntermediateUpdate) error {
	chain := iu.GetChain()
	if len(chain) == 0 || len(chain) > maxIntermediateLen {
		return fmt.Errorf("intermediate update with %d certificates, want 1 to %d", len(chain), maxIntermediateLen)
	}
	for i, der := range chain {
		if len(der) == 0 || len(der) > maxIntermediateCert {
			return fmt.Errorf("intermediate update certificate %d of %d bytes, want 1 to %d", i, len(der), maxIntermediateCert)
		}
	}
	return nil
}

// sanitizeRotation checks a RotationReport comes from the cluster it
// describes (peer) and bounds it: a copy with at most maxBehind entries
// of at most maxBehindEntry bytes each. Over-long short strings refuse it.
func sanitizeRotation(rr *federationv1.RotationReport, peer string) (*federationv1.RotationReport, error) {
	if rr.GetCluster() != peer {
		return nil, fmt.Errorf("rotation report %w %q", errNotOurs, truncate(rr.GetCluster(), 64))
	}
	for name, v := range map[string]string{"bundle digest": rr.GetBundleDigest(), "intermediate": rr.GetIntermediate(), "intermediate root": rr.GetIntermediateRoot()} {
		if len(v) > maxRelayString {
			return nil, fmt.Errorf("rotation report %s of %d bytes, more than %d", name, len(v), maxRelayString)
		}
	}
	// A copy of the known fields only: unknown ones (at any depth) are not
	// passed on.
	out := &federationv1.RotationReport{
		Cluster: rr.GetCluster(), BundleSequence: rr.GetBundleSequence(), BundleDigest: rr.GetBundleDigest(),
		Intermediate: rr.GetIntermediate(), IntermediateRoot: rr.GetIntermediateRoot(),
		Nodes: rr.GetNodes(), NodesBundleCurrent: rr.GetNodesBundleCurrent(), NodesSvidCurrent: rr.GetNodesSvidCurrent(),
	}
	if g := rr.GetGenerated(); g != nil {
		out.Generated = &timestamppb.Timestamp{Seconds: g.GetSeconds(), Nanos: g.GetNanos()}
	}
	for _, b := range rr.GetBehind()[:min(len(rr.GetBehind()), maxBehind)] {
		out.Behind = append(out.Behind, truncate(b, maxBehindEntry))
	}
	return out, nil
}

// truncate cuts s to at most n bytes on a character boundary, so the
// result stays valid UTF-8 (proto3 strings must be).
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	i := n
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i]
}

// outRelay is what this gateway relays to its peers from its control
// plane's latest snapshot. Control streams wait on changed.
type outRelay struct {
	mu            sync.Mutex
	signed        *federationv1.SignedBundle
	intermediates map[string]*federationv1.IntermediateUpdate // by the cluster they are for
	rotation      *federationv1.RotationReport
	changed       chan struct{} // closed at the next change
}

func newOutRelay() *outRelay { return &outRelay{changed: make(chan struct{})} }

// set takes a snapshot's relay messages (a snapshot is whole: what it
// lacks is gone); it reports whether anything changed. Messages that peers
// would refuse are dropped here.
func (o *outRelay) set(snap *controlplanev1.GatewaySnapshot, log *slog.Logger) bool {
	signed := snap.GetSignedBundle()
	if signed != nil {
		if err := checkSignedBundle(signed); err != nil {
			log.Warn("not relaying the control plane's signed bundle", "err", err)
			signed = nil
		}
	}
	im := map[string]*federationv1.IntermediateUpdate{}
	for _, iu := range snap.GetIntermediates() {
		if err := checkChain(iu); err != nil || iu.GetCluster() == "" {
			log.Warn("not relaying an intermediate from the control plane", "peer", iu.GetCluster(), "err", err)
			continue
		}
		im[iu.GetCluster()] = iu
	}
	rotation := snap.GetRotation()
	o.mu.Lock()
	defer o.mu.Unlock()
	changed := !proto.Equal(o.signed, signed) || !proto.Equal(o.rotation, rotation) || len(im) != len(o.intermediates)
	for c, iu := range im {
		if !proto.Equal(o.intermediates[c], iu) {
			changed = true
		}
	}
	o.signed, o.intermediates, o.rotation = signed, im, rotation
	if changed {
		close(o.changed)
		o.changed = make(chan struct{})
	}
	return changed
}

// forPeer is what to relay to peer: the signed bundle, the intermediate
// the root authority re-signed for that peer, and this cluster's rotation
// report (each nil if none).
func (o *outRelay) forPeer(peer string) (*federationv1.SignedBundle, *federationv1.IntermediateUpdate, *federationv1.RotationReport) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.signed, o.intermediates[peer], o.rotation
}

// subscribe returns a channel closed at the next change.
func (o *outRelay) subscribe() <-chan struct{} {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.changed
}

// relaySent is what one control stream has carried of the relay messages:
// each is sent when the stream starts and again only when it changes.
type relaySent struct {
	signed       *federationv1.SignedBundle
	intermediate *federationv1.IntermediateUpdate
	rotation     *federationv1.RotationReport
}

// next returns the messages to send for the current sb, iu and rr, and
// counts them as sent.
func (r *relaySent) next(sb *federationv1.SignedBundle, iu *federationv1.IntermediateUpdate, rr *federationv1.RotationReport) []*federationv1.ControlMessage {
	var out []*federationv1.ControlMessage
	if sb != nil && !proto.Equal(sb, r.signed) {
		out = append(out, &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_SignedBundle{SignedBundle: sb}})
		r.signed = sb
	}
	if iu != nil && !proto.Equal(iu, r.intermediate) {
		out = append(out, &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_Intermediate{Intermediate: iu}})
		r.intermediate = iu
	}
	if rr != nil && !proto.Equal(rr, r.rotation) {
		out = append(out, &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_Rotation{Rotation: rr}})
		r.rotation = rr
	}
	return out
}

// inRelay is the latest of each relay message one peer sent.
type inRelay struct {
	signed       *federationv1.SignedBundle
	intermediate *federationv1.IntermediateUpdate
	rotation     *federationv1.RotationReport
	// warned is set once a misaddressed intermediate was logged at warn.
	warned bool
}

// gotRelay takes a relay message (SignedBundle, IntermediateUpdate or
// RotationReport) from peer's control stream: bounded, and kept if newer
// (a SignedBundle with a higher sequence, or the same one signed anew) or
// different (the others). A
// message out of bounds is dropped; the stream carries on. It reports
// whether what the peer relayed changed.
func (a *agent) gotRelay(peer string, m *federationv1.ControlMessage) bool {
	var (
		sb  = m.GetSignedBundle()
		iu  = m.GetIntermediate()
		rr  = m.GetRotation()
		err error
	)
	// What is kept is a copy of the known fields: unknown ones are not
	// passed on to the control plane.
	switch {
	case sb != nil:
		if err = checkSignedBundle(sb); err == nil {
			sb = &federationv1.SignedBundle{Jws: sb.GetJws(), Sequence: sb.GetSequence(), Digest: sb.GetDigest()}
		}
	case iu != nil:
		if err = checkIntermediate(iu, a.cfg.Cluster); err == nil {
			iu = &federationv1.IntermediateUpdate{Cluster: iu.GetCluster(), Chain: iu.GetChain()}
		}
	case rr != nil:
		rr, err = sanitizeRotation(rr, peer)
	default:
		return false
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	in := &a.peer(peer).in
	if err != nil {
		if iu != nil && errors.Is(err, errNotOurs) && !in.warned {
			in.warned = true
			a.log.Warn("dropping an intermediate update a peer sent for another cluster (logged once per peer)", "peer", peer, "err", err)
		} else {
			a.log.Debug("dropping a relay message out of bounds", "peer", peer, "err", err)
		}
		return false
	}
	switch {
	case sb != nil:
		// The same sequence signed again (the handover to the next root at
		// activate) replaces it too: the control plane follows signers.
		if in.signed != nil && (sb.GetSequence() < in.signed.GetSequence() || sb.GetSequence() == in.signed.GetSequence() && sb.GetJws() == in.signed.GetJws()) {
			return false
		}
		in.signed = sb
	case iu != nil:
		if proto.Equal(in.intermediate, iu) {
			return false
		}
		in.intermediate = iu
	default:
		if proto.Equal(in.rotation, rr) {
			return false
		}
		in.rotation = rr
	}
	return true
}

// relayBudget hands out the bytes of relayed messages a report may carry.
type relayBudget int

// take reports whether m (nil fits) fits in what is left, and takes it.
func (b *relayBudget) take(m proto.Message) bool {
	n := proto.Size(m)
	if n > int(*b) {
		return false
	}
	*b -= relayBudget(n)
	return true
}
