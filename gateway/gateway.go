package gateway

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"

	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	"github.com/straitmesh/strait/gateway/tunnel"
	"github.com/straitmesh/strait/internal/udpgro"
)

// Log attribute keys shared with the other binaries.
const (
	logCluster  = "cluster"
	logPeer     = "peer"
	logSPIFFEID = "spiffe_id"
	logService  = "service"
)

// shutdownGrace bounds the wait for handlers once every connection is
// closed.
const shutdownGrace = 5 * time.Second

// Gateway is one cluster's east-west gateway. Create it with New and serve
// with Run.
type Gateway struct {
	cfg Config
	lim Limits
	log *slog.Logger
	m   *metrics
	now func() time.Time

	listenTLS  *tls.Config // QUIC listener: picks gwTLS or joinTLS by ALPN
	gwTLS      *tls.Config
	joinTLS    *tls.Config
	entryTLS   *tls.Config
	serverQUIC *quic.Config
	clientQUIC *quic.Config

	started   atomic.Bool
	ready     chan struct{}
	peerAddr  net.Addr // set before ready is closed
	entryAddr net.Addr

	mu       sync.Mutex
	running  bool // between Ready and shutdown; handlers may start only while set
	tr       *quic.Transport
	udp      net.PacketConn
	runCtx   context.Context
	slots    map[string]*dialSlot // outgoing connection per peer
	conns    map[*peerConn]struct{}
	perPeer  map[connKey]int
	entries  map[*entryConn]struct{}
	chains   chainTable                   // the entry connections' chains, shared
	exported map[*exportedStream]struct{} // inbound streams relayed to a local endpoint
	joins    int
	handlers sync.WaitGroup

	rr atomic.Uint64 // round robin over endpoints
	// endpointKey keys the tags an OK reply names its endpoint by (see
	// endpointTag): random for each gateway, so a tag says nothing of the
	// address behind it.
	endpointKey [32]byte
	// ownCache is what the gateway presents (see own).
	ownCache atomic.Pointer[ownState]
}

// peerConn is a QUIC connection with a peer gateway, either direction.
type peerConn struct {
	conn     *quic.Conn
	peer     string
	chain    []*x509.Certificate
	outbound bool // dialed by this gateway
	since    time.Time
	// ownIssuer is the issuer of the SVID this gateway presented on a
	// dialed connection, and peerRoot the root the peer's chain verified
	// to (see supersededBy).
	ownIssuer, peerRoot string
	// streams opened on a dialed connection and not yet ended, and
	// whether it is superseded (closed when they all end); under g.mu.
	streams  int
	draining bool
	// turns are taken by bulk writes to the connection's tunnel streams
	// (see streamWriter).
	turns sendTurns
	// trustedUntil is closed at the first change of credentials after
	// chain was last found trusted (see judgePeer); nil before.
	trustedUntil atomic.Pointer[<-chan struct{}]
}

func (pc *peerConn) dead() bool { return pc.conn.Context().Err() != nil }

func (pc *peerConn) direction() string {
	if pc.outbound {
		return "dialed"
	}
	return "accepted"
}

type connKey struct{ peer, direction string }

// entryConn is a sidecar's connection to the entry listener.
type entryConn struct {
	conn   net.Conn // the TCP connection under the TLS session
	chain  []*x509.Certificate
	id     spiffeid.ID
	target atomic.Pointer[string] // the peer cluster, once the header is read
}

// New validates cfg and fills in defaults. It does no I/O.
func New(cfg Config) (*Gateway, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg.Limits.setDefaults()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("gateway: register metrics: %w", err)
	}
	g := &Gateway{
		cfg:      cfg,
		lim:      cfg.Limits,
		log:      cfg.Logger.With(logCluster, cfg.Cluster),
		m:        m,
		now:      cfg.Clock,
		ready:    make(chan struct{}),
		slots:    map[string]*dialSlot{},
		conns:    map[*peerConn]struct{}{},
		perPeer:  map[connKey]int{},
		entries:  map[*entryConn]struct{}{},
		exported: map[*exportedStream]struct{}{},
	}
	rand.Read(g.endpointKey[:]) // never fails (crypto/rand)
	creds := cfg.Credentials

	g.gwTLS = creds.ServerTLS([]string{tunnel.ALPNPeer}, g.verifyPeerClient)
	// Ask for any certificate and let VerifyConnection judge (and count)
	// a missing one, instead of crypto/tls refusing it unseen.
	g.gwTLS.ClientAuth = tls.RequestClientCert
	g.gwTLS.SessionTicketsDisabled = true
	protos := []string{tunnel.ALPNPeer}
	if cfg.JoinHandler != nil {
		g.joinTLS = creds.ServerTLS([]string{tunnel.ALPNJoin}, nil)
		g.joinTLS.ClientAuth = tls.RequestClientCert // optional, judged by the handler
		g.joinTLS.SessionTicketsDisabled = true
		protos = append(protos, tunnel.ALPNJoin)
	}
	g.listenTLS = &tls.Config{
		MinVersion:         tls.VersionTLS13,
		NextProtos:         protos,
		GetConfigForClient: g.configForClient,
	}
	g.entryTLS = creds.ServerTLS([]string{tunnel.ALPNEntryRaw, tunnel.ALPNEntry}, g.verifyEntry)
	g.entryTLS.ClientAuth = tls.RequestClientCert

	base := quic.Config{
		HandshakeIdleTimeout:             g.lim.HandshakeTimeout / 2, // quic-go allows twice this for a whole handshake
		MaxIdleTimeout:                   g.lim.IdleTimeout,
		KeepAlivePeriod:                  g.lim.IdleTimeout / 3,
		MaxIncomingUniStreams:            -1,
		EnableStreamResetPartialDelivery: true, // a refusal's reply survives the reset that follows it
	}
	server, client := base, base
	server.MaxIncomingStreams = int64(g.lim.MaxStreamsPerConn)
	client.MaxIncomingStreams = -1 // streams flow from dialer to listener only
	g.serverQUIC, g.clientQUIC = &server, &client
	return g, nil
}

// Ready is closed once the gateway listens; Addrs is then valid.
func (g *Gateway) Ready() <-chan struct{} { return g.ready }

// Addrs returns the bound peer (UDP) and entry (TCP) addresses once Ready
// is closed, and nils before. entry is nil without an entry listener.
func (g *Gateway) Addrs() (peer, entry net.Addr) {
	select {
	case <-g.ready:
		return g.peerAddr, g.entryAddr
	default:
		return nil, nil
	}
}

// Run listens and serves until ctx ends, then stops accepting, closes every
// connection and returns. It may be called once.
func (g *Gateway) Run(ctx context.Context) error {
	if !g.started.CompareAndSwap(false, true) {
		return errors.New("gateway: Run called twice")
	}
	// GRO where the kernel has it: the peers' packets come in trains (they
	// send with GSO), read as one (see internal/udpgro).
	udp, err := udpgro.Listen("udp", g.cfg.PeerListen)
	if err != nil {
		return fmt.Errorf("gateway: listen for peers: %w", err)
	}
	tr := &quic.Transport{Conn: udp, StatelessResetKey: g.cfg.StatelessResetKey}
	ln, err := tr.Listen(g.listenTLS, g.serverQUIC)
	if err != nil {
		tr.Close()
		udp.Close()
		return fmt.Errorf("gateway: listen for peers: %w", err)
	}
	var eln net.Listener
	if g.cfg.EntryListen != "" {
		if eln, err = net.Listen("tcp", g.cfg.EntryListen); err != nil {
			ln.Close()
			tr.Close()
			udp.Close()
			return fmt.Errorf("gateway: listen for sidecars: %w", err)
		}
		g.entryAddr = eln.Addr()
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g.peerAddr = ln.Addr()
	g.mu.Lock()
	g.tr, g.udp, g.runCtx, g.running = tr, udp, ctx, true
	g.mu.Unlock()
	close(g.ready)
	g.log.Info("gateway serving", "peer_address", g.peerAddr.String(), "entry_address", addrString(g.entryAddr), "udp_gro", udpgro.On(udp))

	eg, ectx := errgroup.WithContext(ctx)
	eg.Go(func() error { return g.acceptPeers(ectx, ln) })
	if eln != nil {
		eg.Go(func() error { return g.acceptEntries(ectx, eln) })
	}
	eg.Go(func() error { g.watchCredentials(ectx); return nil })
	eg.Go(func() error {
		<-ectx.Done()
		ln.Close()
		if eln != nil {
			eln.Close()
		}
		return nil
	})
	err = eg.Wait()
	// On an error the caller's context is still live: end runCtx now, so
	// that what hangs on it (join connections, dials) ends with the rest
	// instead of holding shutdown for its grace.
	cancel()
	g.shutdown()
	tr.Close()
	udp.Close()
	if err != nil {
		g.log.Error("gateway stopped", "error", err)
		return err
	}
	g.log.Info("gateway stopped")
	return nil
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

// shutdown closes every connection and waits (bounded) for the handlers.
func (g *Gateway) shutdown() {
	g.mu.Lock()
	g.running = false
	pcs := slices.Collect(maps.Keys(g.conns))
	ecs := slices.Collect(maps.Keys(g.entries))
	g.mu.Unlock()
	var wg sync.WaitGroup
	for _, pc := range pcs {
		wg.Go(func() {
			pc.conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseShutdown), "gateway shutting down")
		})
	}
	for _, ec := range ecs {
		abort(ec.conn)
	}
	wg.Wait()
	done := make(chan struct{})
	go func() { g.handlers.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(shutdownGrace):
		g.log.Warn("gateway handlers still running after shutdown", "grace", shutdownGrace.String())
	}
}

// goTracked runs f in a goroutine that shutdown waits for, unless the
// gateway is not running.
func (g *Gateway) goTracked(f func()) bool {
	g.mu.Lock()
	if !g.running {
		g.mu.Unlock()
		return false
	}
	g.handlers.Add(1)
	g.mu.Unlock()
	go func() {
		defer g.handlers.Done()
		f()
	}()
	return true
}

// watchCredentials rechecks open connections whenever the SVID or the
// bundle changes.
func (g *Gateway) watchCredentials(ctx context.Context) {
	ch := g.cfg.Credentials.Changed()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ch:
		}
		ch = g.cfg.Credentials.Changed() // before rechecking, so no change is missed
		g.Recheck()
	}
}

// handshakeError is a refusal by one of the gateway's VerifyConnection
// hooks; reason is a bounded metric label.
type handshakeError struct {
	reason string
	err    error
}

func (e *handshakeError) Error() string { return "gateway: " + e.err.Error() }
func (e *handshakeError) Unwrap() error { return e.err }

func refuseHandshake(reason string, format string, args ...any) error {
	return &handshakeError{reason: reason, err: fmt.Errorf(format, args...)}
}

func reasonOf(err error) string {
	var he *handshakeError
	if errors.As(err, &he) {
		return he.reason
	}
	if r := svid.ReasonOf(err); r != "" {
		return string(r)
	}
	var ne net.Error
	if errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	return "error"
}

// configForClient picks the TLS config of a QUIC connection by the ALPN the
// client offers: the gateway protocol first, then join (if served).
func (g *Gateway) configForClient(hello *tls.ClientHelloInfo) (*tls.Config, error) {
	switch {
	case slices.Contains(hello.SupportedProtos, tunnel.ALPNPeer):
		return g.gwTLS, nil
	case g.joinTLS != nil && slices.Contains(hello.SupportedProtos, tunnel.ALPNJoin):
		return g.joinTLS, nil
	}
	g.m.handshakeFail.WithLabelValues(hopPeerInbound, "alpn").Inc()
	return nil, fmt.Errorf("gateway: no supported application protocol in %q", hello.SupportedProtos)
}

// peerCluster checks that id is the gateway of a linked peer and returns
// the peer's cluster name.
func (g *Gateway) peerCluster(id spiffeid.ID) (string, error) {
	info := identity.Classify(id)
	switch {
	case info.Kind != identity.KindGateway:
		return "", refuseHandshake("not_gateway", "%s is not a gateway identity", id)
	case info.Cluster == g.cfg.Cluster:
		return "", refuseHandshake("own_cluster", "%s is this cluster's own gateway", id)
	}
	if _, ok := g.cfg.Catalog.Peer(info.Cluster); !ok {
		return "", refuseHandshake("not_linked", "cluster %s is not linked", info.Cluster)
	}
	return info.Cluster, nil
}

// verifyPeerClient is VerifyConnection for gateways connecting to this one.
func (g *Gateway) verifyPeerClient(cs tls.ConnectionState) error {
	id, _, err := g.cfg.Credentials.Verifier().Verify(cs.PeerCertificates, svid.RoleClient)
	if err == nil {
		_, err = g.peerCluster(id)
	}
	if err != nil {
		g.m.handshakeFail.WithLabelValues(hopPeerInbound, reasonOf(err)).Inc()
		g.log.Info("peer handshake refused", logSPIFFEID, id.String(), "error", err)
	}
	return err
}

// verifyPeerServer returns VerifyConnection for dialing peer's gateway.
func (g *Gateway) verifyPeerServer(peer string) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		id, _, err := g.cfg.Credentials.Verifier().Verify(cs.PeerCertificates, svid.RoleServer)
		if err == nil {
			want, werr := identity.Gateway(g.cfg.TrustDomain, peer)
			switch {
			case werr != nil:
				err = werr
			case id != want:
				err = refuseHandshake("wrong_peer", "dialed the gateway of %s, got %s", peer, id)
			}
		}
		if err != nil {
			g.m.handshakeFail.WithLabelValues(hopPeerOutbound, reasonOf(err)).Inc()
		}
		return err
	}
}

// verifyEntry is VerifyConnection for sidecars: any workload of the trust
// domain, never a component (a peer's gateway must not relay through here).
func (g *Gateway) verifyEntry(cs tls.ConnectionState) error {
	id, _, err := g.cfg.Credentials.Verifier().Verify(cs.PeerCertificates, svid.RoleClient)
	if err != nil {
		return err
	}
	if k := identity.Classify(id).Kind; k != identity.KindWorkload && k != identity.KindOther {
		return refuseHandshake("not_workload", "%s is a %s identity, not a workload", id, k)
	}
	if g.cfg.EntryIssuer != nil {
		if own := g.cfg.EntryIssuer(); len(own) > 0 && !bytes.Equal(cs.PeerCertificates[0].AuthorityKeyId, own) {
			return refuseHandshake("other_cluster", "%s holds an SVID of another cluster's intermediate: a sidecar uses its own cluster's gateway", id)
		}
	}
	return nil
}

// track registers a peer connection. An accepted one beyond
// MaxConnsPerPeer is refused.
func (g *Gateway) track(pc *peerConn) error {
	k := connKey{pc.peer, pc.direction()}
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.running {
		return ErrClosed
	}
	if !pc.outbound && g.perPeer[k] >= g.lim.MaxConnsPerPeer {
		return fmt.Errorf("gateway: cluster %s already has %d connections to this gateway, the limit", pc.peer, g.perPeer[k])
	}
	g.conns[pc] = struct{}{}
	g.perPeer[k]++
	g.m.peerConns.WithLabelValues(k.peer, k.direction).Inc()
	return nil
}

func (g *Gateway) untrack(pc *peerConn) {
	k := connKey{pc.peer, pc.direction()}
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.conns[pc]; !ok {
		return
	}
	delete(g.conns, pc)
	if g.perPeer[k]--; g.perPeer[k] == 0 {
		delete(g.perPeer, k)
		g.m.peerConns.DeleteLabelValues(k.peer, k.direction)
	} else {
		g.m.peerConns.WithLabelValues(k.peer, k.direction).Dec()
	}
	if s := g.slots[pc.peer]; s != nil && s.conn == pc {
		s.conn = nil
		// The peer's gateway said it is going away, or went silent:
		// callers are answered at once until a dial succeeds.
		var ae *quic.ApplicationError
		var ie *quic.IdleTimeoutError
		cause := context.Cause(pc.conn.Context())
		if errors.As(cause, &ae) && ae.Remote && ae.ErrorCode == quic.ApplicationErrorCode(tunnel.CloseShutdown) || errors.As(cause, &ie) {
			s.down = true
		}
	}
}

// exportedStream is a peer's stream relayed to a local endpoint of an
// exported service: Recheck ends it once the service is no longer exported
// to that peer.
type exportedStream struct {
	peer, namespace, service string
	port                     uint16
	str                      *quic.Stream
	conn                     net.Conn
	turns                    sendTurns // of the stream's connection
}

// Recheck closes every connection whose peer is no longer linked or whose
// chain is no longer trusted by the current bundle: QUIC connections in
// both directions and entry connections (whose peer is the cluster they
// tunnel to). It also resets every stream relayed to a local service that
// is no longer exported to the peer that opened it. The gateway calls it
// itself when its credentials change; call it when the catalog's links
// change.
func (g *Gateway) Recheck() {
	g.mu.Lock()
	pcs := slices.Collect(maps.Keys(g.conns))
	ecs := slices.Collect(maps.Keys(g.entries))
	for peer, s := range g.slots {
		// A slot still holding superseded connections with streams keeps
		// them: they count against maxDraining and replaceEvery. A linked
		// peer's slot stays: it knows whether the peer is down.
		if _, linked := g.cfg.Catalog.Peer(peer); !linked && s.conn == nil && s.call == nil && !slices.ContainsFunc(s.draining, func(d *peerConn) bool { return !d.dead() }) {
			delete(g.slots, peer) // made again on the next dial
		}
	}
	g.mu.Unlock()
	for _, pc := range pcs {
		code, reason, err := g.judgePeer(pc)
		if err == nil {
			continue
		}
		g.log.Info("closing peer connection", logPeer, pc.peer, "direction", pc.direction(), "reason", reason, "error", err)
		g.m.refusals.WithLabelValues(reason).Inc()
		pc.conn.CloseWithError(quic.ApplicationErrorCode(code), err.Error())
	}
	for _, ec := range ecs {
		reason, err := g.judgeEntry(ec)
		if err == nil {
			continue
		}
		g.log.Info("closing entry connection", logSPIFFEID, ec.id.String(), "reason", reason, "error", err)
		g.m.refusals.WithLabelValues(reason).Inc()
		abort(ec.conn) // a reset, not an orderly end of data
	}
	g.RecheckExports()
}

// RecheckExports resets every stream relayed to a local service that is no
// longer exported to the peer that opened it, as Recheck does, without
// judging connections again: call it when the catalog's exports change.
func (g *Gateway) RecheckExports() {
	g.mu.Lock()
	ess := slices.Collect(maps.Keys(g.exported))
	g.mu.Unlock()
	for _, es := range ess {
		err := g.notExported(es)
		if err == nil {
			continue // still exported (having no healthy endpoint left ends no stream)
		}
		g.log.Info("resetting stream", logPeer, es.peer, logService, es.namespace+"/"+es.service+":"+strconv.Itoa(int(es.port)), "reason", "not_exported", "error", err)
		g.m.refusals.WithLabelValues("not_exported").Inc()
		es.str.CancelRead(quic.StreamErrorCode(tunnel.StreamRefused))
		es.str.CancelWrite(quic.StreamErrorCode(tunnel.StreamRefused))
		abort(es.conn)
	}
}

// notExported returns the catalog's ErrNotExported if es's service is no
// longer exported to its peer, and nil otherwise.
func (g *Gateway) notExported(es *exportedStream) error {
	if _, err := g.cfg.Catalog.LocalEndpoints(es.peer, es.namespace, es.service, es.port); errors.Is(err, ErrNotExported) {
		return err
	}
	return nil
}

// endpointTagBytes is the length of an endpoint tag.
const endpointTagBytes = 8

// endpointTag names a local endpoint (by its address) in an OK reply: the
// same tag for the same address while the gateway runs, from which the
// address cannot be told. A calling sidecar picks the TLS session to
// resume by it: the gateway picks the instance, and each instance has its
// own ticket keys.
func (g *Gateway) endpointTag(addr net.Addr) string {
	mac := hmac.New(sha256.New, g.endpointKey[:])
	mac.Write([]byte(addr.String()))
	return string(mac.Sum(nil)[:endpointTagBytes])
}

// relayExported answers a peer's stream and relays it to a local
// endpoint (connected as es.conn), registered for Recheck while it runs. It
// returns the reply's code.
func (g *Gateway) relayExported(es *exportedStream) tunnel.Code {
	g.mu.Lock()
	g.exported[es] = struct{}{}
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		delete(g.exported, es)
		g.mu.Unlock()
	}()
	// An export removed before the registration was not seen by Recheck.
	if err := g.notExported(es); err != nil {
		es.conn.Close()
		g.refuse(es.str, catalogReply(err))
		return tunnel.CodeNotExported
	}
	if err := tunnel.WriteReply(es.str, tunnel.Reply{Code: tunnel.CodeOK, Endpoint: g.endpointTag(es.conn.RemoteAddr())}); err != nil {
		es.conn.Close()
		resetStream(es.str, tunnel.StreamAborted)
		return tunnel.CodeUnavailable
	}
	g.relay(es.str, es.conn, dirInbound, es.turns)
	return tunnel.CodeOK
}

func (g *Gateway) judgePeer(pc *peerConn) (tunnel.CloseCode, string, error) {
	if _, ok := g.cfg.Catalog.Peer(pc.peer); !ok {
		return tunnel.CloseUnlinked, "unlinked", fmt.Errorf("cluster %s is no longer linked", pc.peer)
	}
	if ch := pc.trustedUntil.Load(); ch != nil {
		select {
		case <-*ch:
		default:
			return 0, "", nil // trusted, and the bundle has not changed since
		}
	}
	changed := g.cfg.Credentials.Changed() // before the verdict, so no change is missed
	role := svid.RoleClient
	if pc.outbound {
		role = svid.RoleServer
	}
	id, err := g.cfg.Credentials.StillTrusted(pc.chain, role)
	if err != nil {
		return tunnel.CloseUntrusted, "untrusted", err
	}
	if want, err := identity.Gateway(g.cfg.TrustDomain, pc.peer); err != nil || id != want {
		return tunnel.CloseUntrusted, "untrusted", fmt.Errorf("%s is not the gateway of %s", id, pc.peer)
	}
	pc.trustedUntil.Store(&changed)
	return 0, "", nil
}

func (g *Gateway) judgeEntry(ec *entryConn) (string, error) {
	if _, err := g.cfg.Credentials.StillTrusted(ec.chain, svid.RoleClient); err != nil {
		return "untrusted", err
	}
	if t := ec.target.Load(); t != nil {
		if _, ok := g.cfg.Catalog.Peer(*t); !ok {
			return "unlinked", fmt.Errorf("cluster %s is no longer linked", *t)
		}
	}
	return "", nil
}
