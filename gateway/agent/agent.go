// Package agent runs a cluster's gateway against its control plane: it
// keeps the gateway's SVID (renewed at half life, or early when a snapshot
// asks for a reissue), follows the control plane's gateway snapshots
// (links, exports and their endpoints, bundle), runs a control stream to
// every linked peer (catalog deltas, heartbeats with RTT, addresses, and
// the rotation relay: signed bundles, re-signed intermediates, rotation
// reports), relays join requests to the control plane, and reports each
// link's health, what each peer exports and relayed, and the bundle and
// SVID issuer the gateway holds back to it.
package agent

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"runtime/metrics"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/client"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/federation/join"
	"github.com/straitmesh/strait/federation/wire"
	"github.com/straitmesh/strait/gateway"
	"github.com/straitmesh/strait/internal/atomicfile"
)

// Credentials are the gateway's SVID and bundle (proxy.Credentials).
type Credentials interface {
	gateway.Credentials
	client.Credentials
	Bundle() *bundle.Bundle
}

// Config configures Run.
type Config struct {
	Cluster      string
	TrustDomain  spiffeid.TrustDomain
	ControlPlane string // host:port
	Creds        Credentials
	// DataDir holds svid.pem and svid-key.pem (from `strait controlplane
	// gateway-credentials`, then renewed here).
	DataDir     string
	Node        string // default "gateway"
	PeerListen  string // UDP
	EntryListen string // TCP
	// Advertise are the QUIC addresses peers should dial; empty means the
	// bound peer address.
	Advertise []string
	Limits    gateway.Limits
	// Heartbeat is the control stream's heartbeat period (default 1s);
	// reports to the control plane go every two heartbeats and on change.
	Heartbeat  time.Duration
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	Clock      func() time.Time
	// Ready, if set, is called with the bound addresses once serving.
	Ready func(peer, entry string)
}

type agent struct {
	cfg   Config
	log   *slog.Logger
	id    *client.Identity
	gw    *gateway.Gateway
	cat   *catalog
	out   *outRelay // what the control plane gives to relay to peers
	clock func() time.Time
	addrs []string // advertised

	mu    sync.Mutex
	peers map[string]*peerState
	wake  chan struct{} // a report is due
	// resend makes the next report go even if unchanged: the control plane
	// keeps a gateway's report only while its WatchGateway stream is open,
	// so a new stream starts without one.
	resend atomic.Bool
}

// peerState is what this gateway knows of one peer's link.
type peerState struct {
	outUp, inUp    bool
	lastAck        time.Time // the last heartbeat ack on our stream
	rtt            time.Duration
	peerDigest     string
	peerVersion    uint64 // catalog version received from the peer
	peerHave       uint64 // our catalog version the peer has applied
	sentVersion    uint64 // our latest catalog version for the peer
	lastHeard      time.Time
	lastErr        string
	catalogErr     string             // why the peer's last catalog delta was refused, until one applies
	outCtx         context.Context    // the outgoing control stream's life: the agent's, until unlinked
	cancel         context.CancelFunc // ends outCtx
	outgoingActive bool
	inStreams      int     // control streams the peer has open to us
	in             inRelay // the rotation messages the peer relayed
	// back is signalled when the peer opens its control stream to us: if
	// ours is down, the peer is back and ours is retried now.
	back chan struct{}
}

// Run serves the gateway until ctx ends.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Node == "" {
		cfg.Node = "gateway"
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = time.Second
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Limits.MaxJoinConns == 0 {
		cfg.Limits.MaxJoinConns = 64 // joins are short: a burst of them is fine
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	a := &agent{cfg: cfg, log: cfg.Logger, clock: cfg.Clock, cat: newCatalog(), out: newOutRelay(), peers: map[string]*peerState{}, wake: make(chan struct{}, 1)}
	a.id = &client.Identity{ControlPlane: cfg.ControlPlane, Creds: cfg.Creds, DataDir: cfg.DataDir, Log: cfg.Logger, Clock: cfg.Clock}
	if !a.id.LoadSaved() {
		return fmt.Errorf("no valid gateway credentials in %s (issue them with `strait controlplane gateway-credentials --dir <control-plane dir> --out %s`)", cfg.DataDir, cfg.DataDir)
	}
	if err := a.id.Connect(); err != nil {
		return err
	}
	defer a.id.Close()
	resetKey, err := loadResetKey(cfg.DataDir)
	if err != nil {
		return err
	}
	gw, err := gateway.New(gateway.Config{
		StatelessResetKey: resetKey,
		Cluster:           cfg.Cluster, TrustDomain: cfg.TrustDomain, Credentials: cfg.Creds,
		PeerListen: cfg.PeerListen, EntryListen: cfg.EntryListen, Catalog: a.cat, Limits: cfg.Limits,
		Logger: cfg.Logger, Registerer: cfg.Registerer, Clock: cfg.Clock,
		ControlHandler: a.serveControl, JoinHandler: a.serveJoin,
		EntryIssuer: func() []byte {
			if s := cfg.Creds.SVID(); s != nil && len(s.Certificates) > 0 {
				return s.Certificates[0].AuthorityKeyId // this cluster's intermediate
			}
			return nil
		},
	})
	if err != nil {
		return err
	}
	a.gw = gw
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 4)
	var wg sync.WaitGroup
	// Everything started here ends before the connection is closed.
	defer wg.Wait()
	defer cancel()
	wg.Go(func() { errc <- gw.Run(ctx) })
	select {
	case <-gw.Ready():
	case err := <-errc:
		return err
	}
	peer, entry := gw.Addrs()
	a.addrs = cfg.Advertise
	if len(a.addrs) == 0 {
		a.addrs = []string{peer.String()}
	}
	entryAddr := ""
	if entry != nil {
		entryAddr = entry.String()
	}
	if cfg.Ready != nil {
		cfg.Ready(peer.String(), entryAddr)
	}
	wg.Go(func() { errc <- a.id.RenewLoop(ctx) })
	wg.Go(func() { errc <- a.watchLoop(ctx, entryAddr) })
	wg.Go(func() { errc <- a.reportLoop(ctx) })
	wg.Go(func() { a.credentialsLoop(ctx) })
	wg.Go(func() { releaseLoop(ctx, 2*time.Second, 32<<20) })
	return <-errc
}

// credentialsLoop pokes the report loop whenever the SVID or the bundle
// changes: the control plane gates a rotation on what the gateway holds.
func (a *agent) credentialsLoop(ctx context.Context) {
	for {
		ch := a.cfg.Creds.Changed()
		select {
		case <-ctx.Done():
			return
		case <-ch:
		}
		a.poke()
	}
}

// watchLoop follows the control plane's gateway snapshots.
func (a *agent) watchLoop(ctx context.Context, entry string) error {
	backoff := client.NewBackoff(100*time.Millisecond, 2*time.Second)
	for ctx.Err() == nil {
		err := a.watchOnce(ctx, entry, backoff)
		if ctx.Err() != nil {
			return nil
		}
		a.log.Info("gateway configuration stream ended; keeping the last snapshot", "err", err)
		if !backoff.Wait(ctx) {
			return nil
		}
	}
	return nil
}

// watchOnce follows one WatchGateway stream (moved to each renewed
// connection without a gap). The control streams it starts belong to ctx,
// the agent's life: they outlive the stream.
func (a *agent) watchOnce(ctx context.Context, entry string, backoff *client.Backoff) error {
	req := &controlplanev1.WatchGatewayRequest{Node: a.cfg.Node, EntryAddress: entry, PeerAddresses: a.addrs}
	open := func(sctx context.Context, conn *grpc.ClientConn) (func() (*controlplanev1.WatchGatewayResponse, error), error) {
		stream, err := controlplanev1.NewFederationServiceClient(conn).WatchGateway(sctx, req)
		if err != nil {
			return nil, err
		}
		return stream.Recv, nil
	}
	return client.Follow(ctx, a.id, open, func(resp *controlplanev1.WatchGatewayResponse, first bool) {
		backoff.Reset()
		if first {
			a.resend.Store(true) // the control plane may hold no report of this gateway yet
			a.poke()
		}
		snap := resp.GetSnapshot()
		if snap == nil {
			return
		}
		if tb := snap.GetBundle(); tb != nil {
			b, err := client.BundleFromProto(a.cfg.TrustDomain, tb)
			if err != nil {
				a.log.Error("bundle refused; keeping the current one", "err", err)
			} else if _, err := a.cfg.Creds.SetBundle(b); err != nil {
				a.log.Error("bundle refused; keeping the current one", "err", err)
			}
		}
		a.id.Reissue(snap.GetReissue())
		a.out.set(snap, a.log) // control streams wake on a change
		switch linksChanged, exportsChanged := a.cat.setSnapshot(snap); {
		case linksChanged:
			a.gw.Recheck() // a removed peer loses its open sessions at once
		case exportsChanged:
			a.gw.RecheckExports() // and a peer a service is no longer exported to, its streams to it
		}
		a.syncPeers(ctx) // pokes the report loop
	})
}

// syncPeers starts a control stream to every linked peer with addresses
// and stops those of peers no longer linked. ctx is the agent's life, not
// a configuration stream's: control streams outlive the WatchGateway
// stream they were started from (it ends at every reconnect).
func (a *agent) syncPeers(ctx context.Context) {
	linked := a.cat.linkedPeers()
	a.mu.Lock()
	defer a.mu.Unlock()
	for name, ps := range a.peers {
		if !slices.Contains(linked, name) {
			if ps.cancel != nil {
				ps.cancel()
			}
			delete(a.peers, name)
			a.cat.dropImports(name)
		}
	}
	for _, name := range linked {
		ps := a.peer(name)
		if !ps.outgoingActive {
			ps.outgoingActive = true
			pctx, cancel := context.WithCancel(ctx)
			ps.outCtx, ps.cancel = pctx, cancel
			go a.controlLoop(pctx, name)
		}
	}
	a.poke()
}

func (a *agent) poke() {
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

func (a *agent) peer(name string) *peerState {
	ps := a.peers[name]
	if ps == nil {
		ps = &peerState{back: make(chan struct{}, 1)}
		a.peers[name] = ps
	}
	return ps
}

// controlLoop keeps this gateway's control stream to peer open: catalog
// deltas of what is exported to it, and heartbeats.
func (a *agent) controlLoop(ctx context.Context, peer string) {
	backoff := client.NewBackoff(200*time.Millisecond, 5*time.Second)
	for ctx.Err() == nil {
		err := a.controlOnce(ctx, peer, backoff)
		a.mu.Lock()
		ps := a.streamPeer(peer, ctx)
		if ps != nil {
			ps.outUp = false
			if err != nil {
				ps.lastErr = err.Error()
			}
		}
		a.mu.Unlock()
		a.poke()
		if ps == nil {
			return
		}
		a.log.Debug("control stream to peer ended", "peer", peer, "err", err)
		if !backoff.WaitOr(ctx, ps.back) {
			return
		}
	}
}

// streamPeer returns peer's state for an outgoing control stream that
// lives under owner (its controlLoop's context), or nil once that stream
// is stale: owner ended (the peer was unlinked, or the agent stops), or
// the peer has a newer outgoing stream (unlinked and linked again). A stale
// stream's last acks and its end must not touch the newer one's state, nor
// bring back a peer that was unlinked. The caller holds a.mu.
func (a *agent) streamPeer(peer string, owner context.Context) *peerState {
	if owner.Err() != nil {
		return nil
	}
	ps := a.peer(peer)
	if ps.outCtx != nil && ps.outCtx != owner {
		return nil
	}
	return ps
}

func (a *agent) controlOnce(ctx context.Context, peer string, backoff *client.Backoff) error {
	if p, ok := a.cat.Peer(peer); !ok || len(p.Addrs) == 0 {
		return fmt.Errorf("no address known for %s yet (it announces them when its gateway connects)", peer)
	}
	s, err := a.gw.OpenControl(ctx, peer)
	if err != nil {
		return err
	}
	return a.runControl(ctx, peer, s, backoff)
}

// runControl speaks this gateway's side of its control stream s to peer:
// Hello, then catalog deltas, the rotation relay messages (each when the
// stream starts and whenever it changes) and heartbeats.
func (a *agent) runControl(ctx context.Context, peer string, s io.ReadWriteCloser, backoff *client.Backoff) error {
	owner := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { <-ctx.Done(); s.Close() }()
	b := a.cfg.Creds.Bundle()
	hello := &federationv1.Hello{Cluster: a.cfg.Cluster, GatewayAddresses: a.addrs}
	if b != nil {
		hello.BundleDigest, hello.BundleSequence = b.Digest(), b.Sequence()
	}
	if err := writeControl(s, &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_Hello{Hello: hello}}); err != nil {
		return err
	}
	// Acks come back on this stream. The RTT is measured with this
	// gateway's clock only: the time the acked heartbeat was sent is looked
	// up here, not taken from the peer's echo.
	pg := &pings{}
	errc := make(chan error, 1)
	go func() {
		for {
			var m federationv1.ControlMessage
			if err := readControl(s, &m); err != nil {
				errc <- err
				return
			}
			if ack := m.GetHeartbeatAck(); ack != nil {
				sentAt, ok := pg.acked(ack.GetSeq())
				if !ok {
					continue // not a heartbeat of ours, or acked already
				}
				rtt := a.clock().Sub(sentAt)
				a.mu.Lock()
				if ps := a.streamPeer(peer, owner); ps != nil {
					ps.rtt, ps.outUp, ps.lastErr, ps.lastAck = rtt, true, "", a.clock()
				}
				a.mu.Unlock()
			}
		}
	}()
	var sent map[string]*federationv1.ExportedService
	var version, seq uint64
	var relayed relaySent
	t := time.NewTicker(a.cfg.Heartbeat)
	defer t.Stop()
	changed := a.cat.resubscribe()
	relayChanged := a.out.subscribe()
	for {
		cur := a.cat.exportsFor(peer)
		if sent == nil || !sameExports(sent, cur) {
			version++
			delta := catalogDelta(sent, cur, version)
			if err := writeControl(s, &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_Catalog{Catalog: delta}}); err != nil {
				return err
			}
			sent = cur
			a.mu.Lock()
			if ps := a.streamPeer(peer, owner); ps != nil {
				ps.sentVersion = version
			}
			a.mu.Unlock()
		}
		for _, m := range relayed.next(a.out.forPeer(peer)) {
			if err := writeControl(s, m); err != nil {
				return err
			}
		}
		seq++
		now := a.clock()
		pg.sent(seq, now)
		hb := &federationv1.Heartbeat{Seq: seq, SentUnixNano: now.UnixNano()}
		if b := a.cfg.Creds.Bundle(); b != nil {
			hb.BundleDigest = b.Digest()
		}
		a.mu.Lock()
		if ps := a.streamPeer(peer, owner); ps != nil {
			hb.HaveCatalogVersion = ps.peerVersion
		}
		a.mu.Unlock()
		if err := writeControl(s, &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_Heartbeat{Heartbeat: hb}}); err != nil {
			return err
		}
		backoff.Reset()
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return err
		case <-t.C:
		case <-changed:
			changed = a.cat.resubscribe()
		case <-relayChanged:
			relayChanged = a.out.subscribe()
		}
	}
}

// pings remembers when the latest heartbeats of a control stream were
// sent, by sequence number.
type pings struct {
	mu sync.Mutex
	at map[uint64]time.Time
}

// maxPings bounds the heartbeats awaiting an ack.
const maxPings = 64

func (p *pings) sent(seq uint64, t time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.at == nil {
		p.at = map[uint64]time.Time{}
	}
	p.at[seq] = t
	if seq > maxPings {
		delete(p.at, seq-maxPings)
	}
}

// acked returns when heartbeat seq was sent, once.
func (p *pings) acked(seq uint64) (time.Time, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	t, ok := p.at[seq]
	delete(p.at, seq)
	return t, ok
}

func sameExports(a, b map[string]*federationv1.ExportedService) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !proto.Equal(v, w) {
			return false
		}
	}
	return true
}

// catalogDelta is what changed from prev (nil: nothing sent yet) to cur.
func catalogDelta(prev, cur map[string]*federationv1.ExportedService, version uint64) *federationv1.CatalogDelta {
	d := &federationv1.CatalogDelta{Version: version, BaseVersion: version - 1, Full: prev == nil}
	if prev == nil {
		d.BaseVersion = 0
	}
	for _, k := range sortedKeys(cur) {
		if p, ok := prev[k]; !ok || !proto.Equal(p, cur[k]) {
			d.Upserts = append(d.Upserts, cur[k])
		}
	}
	for _, k := range sortedKeys(prev) {
		if _, ok := cur[k]; !ok {
			d.Removals = append(d.Removals, &federationv1.ServiceRef{Namespace: prev[k].GetNamespace(), Name: prev[k].GetName()})
		}
	}
	return d
}

// helloTimeout bounds the wait for a control stream's hello.
var helloTimeout = 10 * time.Second

// serveControl serves a control stream a peer opened: its catalog,
// heartbeats (answered with acks) and rotation relay messages. Messages
// of kinds it does not know are skipped; one that does not decode ends
// this stream only.
func (a *agent) serveControl(ctx context.Context, peer string, s io.ReadWriteCloser) {
	defer s.Close()
	// A stream that never says hello does not hold its goroutine.
	dl, _ := s.(interface{ SetReadDeadline(time.Time) error })
	if dl != nil {
		dl.SetReadDeadline(time.Now().Add(helloTimeout))
	}
	var first federationv1.ControlMessage
	if err := readControl(s, &first); err != nil || first.GetHello() == nil {
		a.log.Debug("control stream without a hello", "peer", peer, "err", err)
		return
	}
	if dl != nil {
		dl.SetReadDeadline(time.Time{})
	}
	hello := first.GetHello()
	if hello.GetCluster() != peer {
		a.log.Warn("control stream hello names another cluster than the peer's identity", "peer", peer, "hello", hello.GetCluster())
		return
	}
	a.cat.learnAddrs(peer, hello.GetGatewayAddresses())
	a.mu.Lock()
	ps := a.peer(peer)
	ps.inStreams++
	ps.inUp, ps.peerDigest, ps.lastHeard = true, hello.GetBundleDigest(), a.clock()
	if !ps.outUp {
		select {
		case ps.back <- struct{}{}:
		default:
		}
	}
	a.mu.Unlock()
	a.poke()
	defer func() {
		a.mu.Lock()
		if cur := a.peers[peer]; cur == ps {
			ps.inStreams--
			ps.inUp = ps.inStreams > 0
		}
		a.mu.Unlock()
		a.poke()
	}()
	for {
		var m federationv1.ControlMessage
		if err := readControl(s, &m); err != nil {
			if ctx.Err() == nil {
				a.log.Debug("control stream from peer ended", "peer", peer, "err", err)
			}
			return
		}
		now := a.clock()
		switch {
		case m.GetCatalog() != nil:
			d := m.GetCatalog()
			if err := a.cat.applyDelta(peer, d); err != nil {
				a.log.Warn("catalog delta refused; the peer resends in full", "peer", peer, "err", err)
				a.mu.Lock()
				a.peer(peer).catalogErr = "catalog refused: " + err.Error()
				a.mu.Unlock()
				a.poke()
				return // the peer reopens its stream and starts over
			}
			a.mu.Lock()
			ps := a.peer(peer)
			ps.peerVersion, ps.catalogErr = d.GetVersion(), ""
			a.mu.Unlock()
			a.poke()
		case m.GetHeartbeat() != nil:
			hb := m.GetHeartbeat()
			a.mu.Lock()
			ps := a.peer(peer)
			ps.lastHeard, ps.peerHave, ps.peerDigest = now, hb.GetHaveCatalogVersion(), hb.GetBundleDigest()
			a.mu.Unlock()
			ack := &federationv1.HeartbeatAck{Seq: hb.GetSeq(), SentUnixNano: hb.GetSentUnixNano()}
			if err := writeControl(s, &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_HeartbeatAck{HeartbeatAck: ack}}); err != nil {
				return
			}
		case m.GetSignedBundle() != nil, m.GetIntermediate() != nil, m.GetRotation() != nil:
			if a.gotRelay(peer, &m) {
				a.poke()
			}
		}
	}
}

// serveJoin relays a join to the control plane, which judges it.
func (a *agent) serveJoin(ctx context.Context, s io.ReadWriteCloser, cs tls.ConnectionState) {
	defer s.Close()
	b := a.cfg.Creds.Bundle()
	if b == nil {
		return
	}
	offer := &federationv1.JoinOffer{BundlePem: b.MarshalPEM(), BundleSequence: b.Sequence(), Cluster: a.cfg.Cluster}
	remote := ""
	if ra := gateway.RemoteAddr(ctx); ra != nil {
		remote = ra.String()
	}
	redeem := func(ctx context.Context, req *federationv1.JoinRequest, binding []byte) (*federationv1.JoinResult, error) {
		ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		resp, err := controlplanev1.NewFederationServiceClient(a.id.Conn()).RedeemJoin(ctx, &controlplanev1.RedeemJoinRequest{Join: req, ChannelBinding: binding, Remote: remote})
		if err != nil {
			return nil, err
		}
		return resp.GetResult(), nil
	}
	// What the exchange refuses before the control plane is asked is
	// audited there all the same: every attempt is in the audit log.
	refused := func(ctx context.Context, r join.Refusal) {
		a.log.Warn("join refused", "token", r.TokenID, "joiner", r.Cluster, "remote", remote, "reason", r.Reason, "err", r.Err)
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_, err := controlplanev1.NewFederationServiceClient(a.id.Conn()).AuditJoinRefusal(ctx, &controlplanev1.AuditJoinRefusalRequest{
			TokenId: r.TokenID, Cluster: r.Cluster, Remote: remote, Reason: r.Reason, Detail: r.Err.Error()})
		if err != nil {
			a.log.Error("audit a refused join", "err", err)
		}
	}
	if err := join.Serve(ctx, s, cs, offer, redeem, refused); err != nil {
		a.log.Info("join exchange ended", "remote", remote, "err", err)
	}
}

// reportLoop tells the control plane about every link and what the
// gateway holds (bundle, SVID issuer, what peers relayed): when poked,
// every other heartbeat if it changed, every ten heartbeats regardless,
// and at once on a new WatchGateway stream.
// minReportGap is the least time between two reports to the control plane.
const minReportGap = 100 * time.Millisecond

func (a *agent) reportLoop(ctx context.Context) error {
	t := time.NewTicker(2 * a.cfg.Heartbeat)
	defer t.Stop()
	var last *controlplanev1.ReportPeersRequest
	var lastSent, lastSentWall time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-a.wake:
			// Reports are spaced by minReportGap: a peer flooding relay
			// messages cannot make this gateway flood its control plane.
			if gap := minReportGap - time.Since(lastSentWall); gap > 0 {
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(gap):
				}
			}
		}
		req := a.report()
		resend := a.resend.Swap(false)
		if !resend && last != nil && proto.Equal(last, req) && a.clock().Sub(lastSent) < 10*a.cfg.Heartbeat {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := controlplanev1.NewFederationServiceClient(a.id.Conn()).ReportPeers(rctx, req)
		cancel()
		if err != nil {
			if resend {
				a.resend.Store(true)
			}
			switch size := proto.Size(req); {
			case ctx.Err() != nil:
			case size > maxReportBytes:
				// Not a passing failure: it comes back with every report.
				a.log.Warn("report to the control plane refused: it carries every linked peer's imports and is over the control plane's limit", "bytes", size, "limit", maxReportBytes, "err", err)
			default:
				a.log.Debug("report to the control plane failed", "err", err)
			}
			continue
		}
		last, lastSent, lastSentWall = req, a.clock(), time.Now()
	}
}

func (a *agent) report() *controlplanev1.ReportPeersRequest {
	req := &controlplanev1.ReportPeersRequest{Node: a.cfg.Node}
	if b := a.cfg.Creds.Bundle(); b != nil {
		req.BundleDigest = b.Digest()
	}
	if s := a.cfg.Creds.SVID(); s != nil {
		req.SvidIssuer = svid.IssuerFingerprint(s.Certificates)
	}
	budget := relayBudget(maxReportRelayBytes)
	a.mu.Lock()
	defer a.mu.Unlock()
	// A stream that carried no heartbeat (or ack) for three periods is
	// down, even if no transport error said so yet (a partition).
	now, quiet := a.clock(), 3*a.cfg.Heartbeat
	for _, name := range sortedKeys(a.peers) {
		ps := a.peers[name]
		outUp := ps.outUp && now.Sub(ps.lastAck) <= quiet
		inUp := ps.inUp && now.Sub(ps.lastHeard) <= quiet
		r := &controlplanev1.PeerReport{
			Peer: name, ControlStreamUp: outUp && inUp, PeerBundleDigest: ps.peerDigest,
			CatalogVersion: ps.peerVersion, LastError: strings.Join(slices.DeleteFunc([]string{ps.catalogErr, ps.lastErr}, func(s string) bool { return s == "" }), "; "),
			Imports: a.cat.importsOf(name), GatewayAddresses: a.cat.learned(name),
		}
		switch {
		case outUp && inUp:
			r.State = "connected"
		case outUp || inUp:
			r.State = "connecting"
		default:
			r.State = "down"
		}
		if ps.rtt > 0 && outUp {
			// Measured on our control stream: only while it is up is it
			// the data path's RTT now, not that of a link gone down.
			r.Rtt = durationpb.New(ps.rtt)
		}
		if ps.sentVersion > ps.peerHave {
			r.CatalogLag = ps.sentVersion - ps.peerHave
		}
		if !ps.lastHeard.IsZero() {
			r.LastHeard = timestamppb.New(ps.lastHeard)
		}
		// What the peer relayed, as far as the report has room (a peer
		// sends at most about 140 KiB of it).
		if budget.take(ps.in.signed) {
			r.SignedBundle = ps.in.signed
		}
		if budget.take(ps.in.intermediate) {
			r.Intermediate = ps.in.intermediate
		}
		if budget.take(ps.in.rotation) {
			r.Rotation = ps.in.rotation
		}
		req.Peers = append(req.Peers, r)
	}
	return req
}

// releaseLoop hands heap memory back to the OS after a burst of streams:
// the Go runtime would otherwise keep it resident for minutes. See
// releaser for when.
func releaseLoop(ctx context.Context, every time.Duration, limit uint64) {
	t := time.NewTicker(every)
	defer t.Stop()
	samples := []metrics.Sample{
		{Name: "/memory/classes/heap/free:bytes"},
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/gc/cycles/total:gc-cycles"},
		{Name: "/sched/goroutines:goroutines"},
	}
	read := func() heapState {
		metrics.Read(samples)
		var v [4]uint64
		for i, s := range samples {
			if s.Value.Kind() == metrics.KindUint64 {
				v[i] = s.Value.Uint64()
			}
		}
		return heapState{free: v[0], objects: v[1], cycles: v[2], goroutines: v[3]}
	}
	r := releaser{limit: limit}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		before := read()
		if r.due(before) {
			debug.FreeOSMemory()
			r.freed(before, read())
		}
	}
}

// heapState is what releaser looks at: free heap bytes (held, not yet
// returned to the OS), bytes of heap objects (live or not yet found dead),
// the count of completed collections and of goroutines (each open stream
// has two).
type heapState struct{ free, objects, cycles, goroutines uint64 }

// releaser decides when to collect and return memory, one tick at a time:
//   - when more than limit bytes of the heap are free;
//   - when more than limit bytes of objects have gone a whole tick without a
//     collection: after a burst closes, the heap stops growing and no
//     collection comes to find it dead. When a forced collection finds
//     most of the objects still live (streams held open, idle), it waits
//     twice as many ticks before forcing again, up to 32; but not once the
//     goroutines have fallen under half of what they were at the last
//     collection: the streams have closed.
type releaser struct {
	limit          uint64
	lastCycles     uint64
	goroutinesAtGC uint64 // at the last collection seen or forced
	backoff        int    // ticks to wait after a fruitless forced collection
	skip           int    // ticks left to wait
}

func (r *releaser) due(h heapState) bool {
	collected := h.cycles != r.lastCycles
	r.lastCycles = h.cycles
	if collected {
		r.goroutinesAtGC = h.goroutines
	}
	switch {
	case h.free > r.limit:
		return true
	case h.objects <= r.limit || collected:
		return false
	case 2*h.goroutines < r.goroutinesAtGC:
		return true
	case r.skip > 0:
		r.skip--
		return false
	}
	return true
}

// freed takes the heap before and after a forced collection.
func (r *releaser) freed(before, after heapState) {
	r.lastCycles, r.goroutinesAtGC = after.cycles, after.goroutines
	if after.objects > r.limit && after.objects > before.objects/2 { // mostly live: back off
		r.backoff = min(max(2*r.backoff, 1), 32)
		r.skip = r.backoff
		return
	}
	r.backoff, r.skip = 0, 0
}

// loadResetKey reads the QUIC stateless reset key kept in dir, creating it
// on first use: the same key across restarts lets peers learn at once
// that this gateway lost their connections' state.
func loadResetKey(dir string) (*quic.StatelessResetKey, error) {
	path := filepath.Join(dir, "quic-reset.key")
	var k quic.StatelessResetKey
	b, err := os.ReadFile(path)
	if err == nil && len(b) == len(k) {
		copy(k[:], b)
		return &k, nil
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("stateless reset key: %w", err)
	}
	if _, err := rand.Read(k[:]); err != nil {
		return nil, err
	}
	if err := atomicfile.WriteFile(path, k[:], 0o600); err != nil {
		return nil, fmt.Errorf("stateless reset key: %w", err)
	}
	return &k, nil
}

// maxControlMessage bounds one control message: a catalog of thousands of
// services fits.
const maxControlMessage = 4 << 20

func writeControl(w io.Writer, m *federationv1.ControlMessage) error {
	return wire.Write(w, m, maxControlMessage)
}

func readControl(r io.Reader, m *federationv1.ControlMessage) error {
	return wire.Read(r, m, maxControlMessage)
}
