package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/straitmesh/strait/ca/svid"
	"github.com/straitmesh/strait/gateway/tunnel"
)

// maxEndpointAttempts is how many endpoints an incoming stream tries.
const maxEndpointAttempts = 3

// minStaleAfter is the least time a connection may go without receiving a
// single packet, once a stream's header was sent on it, before it is judged
// dead (its peer restarted without a stateless reset) and replaced. A live
// peer acknowledges the header within an RTT plus its ack delay (25ms by
// default); the margin is for a peer starved of CPU, whose connection (and
// every stream on it) would otherwise be closed while still alive.
const minStaleAfter = 3 * time.Second

func staleAfter(c *quic.Conn) time.Duration {
	st := c.ConnectionStats()
	return max(minStaleAfter, 4*(st.SmoothedRTT+4*st.MeanDeviation))
}

// acceptPeers accepts QUIC connections until ctx ends.
func (g *Gateway) acceptPeers(ctx context.Context, ln *quic.Listener) error {
	for {
		conn, err := ln.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, quic.ErrServerClosed) {
				return nil
			}
			return fmt.Errorf("gateway: accept peer connection: %w", err)
		}
		if !g.goTracked(func() { g.serveAccepted(conn) }) {
			conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseShutdown), "gateway shutting down")
		}
	}
}

// serveAccepted serves one accepted QUIC connection until it closes.
func (g *Gateway) serveAccepted(conn *quic.Conn) {
	cs := conn.ConnectionState().TLS
	if cs.NegotiatedProtocol == tunnel.ALPNJoin && g.cfg.JoinHandler != nil {
		g.serveJoin(conn)
		return
	}
	if cs.NegotiatedProtocol != tunnel.ALPNPeer || len(cs.PeerCertificates) == 0 {
		conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseProtocol), "unexpected application protocol")
		return
	}
	// The chain was verified by verifyPeerClient during the handshake.
	var cluster string
	id, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err == nil {
		cluster, err = g.peerCluster(id) // the link may have gone since
	}
	if err != nil {
		g.m.refusals.WithLabelValues("unlinked").Inc()
		conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseUnlinked), err.Error())
		return
	}
	pc := &peerConn{conn: conn, peer: cluster, chain: cs.PeerCertificates, since: g.now(), turns: newSendTurns()}
	if err := g.track(pc); err != nil {
		if errors.Is(err, ErrClosed) {
			conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseShutdown), "gateway shutting down")
			return
		}
		g.m.refusals.WithLabelValues("too_many_conns").Inc()
		g.log.Info("peer connection refused", logPeer, pc.peer, "error", err)
		conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseTooManyConns), err.Error())
		return
	}
	defer g.untrack(pc)
	log := g.log.With(logPeer, pc.peer)
	log.Info("peer connected", "address", conn.RemoteAddr().String())
	g.peerBack(pc.peer)
	// A trust or link change between the handshake and track was not seen
	// by Recheck: judge the connection once more now that it is tracked.
	if code, reason, err := g.judgePeer(pc); err != nil {
		g.m.refusals.WithLabelValues(reason).Inc()
		conn.CloseWithError(quic.ApplicationErrorCode(code), err.Error())
		return
	}
	ctx := conn.Context()
	for {
		str, err := conn.AcceptStream(ctx)
		if err != nil {
			log.Info("peer connection closed", "error", err)
			return
		}
		if !g.goTracked(func() { g.serveStream(ctx, pc, str) }) {
			str.CancelRead(quic.StreamErrorCode(tunnel.StreamShutdown))
			str.CancelWrite(quic.StreamErrorCode(tunnel.StreamShutdown))
		}
	}
}

// refuse answers a stream with reply and resets it. The reply is marked
// reliable, so it reaches the peer ahead of the reset.
func (g *Gateway) refuse(str *quic.Stream, reply tunnel.Reply) {
	str.SetWriteDeadline(time.Now().Add(g.lim.HeaderTimeout))
	if err := tunnel.WriteReply(str, reply); err == nil {
		str.SetReliableBoundary()
	}
	str.CancelWrite(quic.StreamErrorCode(tunnel.StreamRefused))
	str.CancelRead(quic.StreamErrorCode(tunnel.StreamRefused))
}

// serveStream serves one stream a peer opened: header, checks, reply, relay.
func (g *Gateway) serveStream(ctx context.Context, pc *peerConn, str *quic.Stream) {
	result := tunnel.CodeOK
	defer func() { g.m.streams.WithLabelValues(dirInbound, result.String()).Inc() }()
	refuse := func(code tunnel.Code, format string, args ...any) {
		result = code
		g.refuse(str, tunnel.Reply{Code: code, Message: fmt.Sprintf(format, args...)})
	}

	str.SetReadDeadline(time.Now().Add(g.lim.HeaderTimeout))
	h, err := tunnel.ReadHeader(str, g.lim.MaxHeaderBytes)
	if err != nil {
		reply := tunnel.CodeFor(err)
		result = reply.Code
		g.log.Info("refusing stream", logPeer, pc.peer, "code", reply.Code.String(), "error", err)
		g.refuse(str, reply)
		return
	}
	str.SetReadDeadline(time.Time{})
	// Judged on every stream against the current links and bundle: a
	// stream may come before Recheck has closed a connection that lost
	// either (the trust verdict is kept until the bundle changes).
	if _, reason, err := g.judgePeer(pc); err != nil {
		g.m.refusals.WithLabelValues(reason).Inc()
		refuse(tunnel.CodeUnauthorized, "%v", err)
		return
	}
	if h.Kind == tunnel.KindControl {
		if g.cfg.ControlHandler == nil {
			refuse(tunnel.CodeUnsupported, "gateway of %s serves no control streams", g.cfg.Cluster)
			return
		}
		if err := tunnel.WriteReply(str, tunnel.Reply{Code: tunnel.CodeOK}); err != nil {
			result = tunnel.CodeUnavailable
			resetStream(str, tunnel.StreamAborted)
			return
		}
		s := &stream{str: str}
		defer s.Close()
		g.cfg.ControlHandler(ctx, pc.peer, s)
		return
	}
	if h.Cluster != g.cfg.Cluster {
		refuse(tunnel.CodeMisrouted, "this is the gateway of %s, not %s", g.cfg.Cluster, h.Cluster)
		return
	}
	target := h.Namespace + "/" + h.Service + ":" + strconv.Itoa(int(h.Port))
	eps, err := g.cfg.Catalog.LocalEndpoints(pc.peer, h.Namespace, h.Service, h.Port)
	if err != nil {
		reply := catalogReply(err)
		refuse(reply.Code, "%s: %s", target, reply.Message)
		return
	}
	if len(eps) == 0 {
		refuse(tunnel.CodeNoEndpoints, "%s has no healthy endpoints", target)
		return
	}
	c, tried, err := g.dialEndpoint(ctx, eps)
	if err != nil {
		// The addresses stay here: the reply says only what failed.
		g.log.Info("no endpoint answered", logPeer, pc.peer, logService, target, "error", err)
		refuse(tunnel.CodeDialFailed, "%s: %d endpoint(s) tried, none answered", target, tried)
		return
	}
	result = g.relayExported(&exportedStream{peer: pc.peer, namespace: h.Namespace, service: h.Service, port: h.Port, str: str, conn: c, turns: pc.turns})
}

// catalogReply maps a Catalog error to a reply.
func catalogReply(err error) tunnel.Reply {
	code := tunnel.CodeUnavailable
	switch {
	case errors.Is(err, ErrNotExported):
		code = tunnel.CodeNotExported
	case errors.Is(err, ErrNoEndpoints):
		code = tunnel.CodeNoEndpoints
	case errors.Is(err, ErrNotImported):
		code = tunnel.CodeNotImported
	}
	return tunnel.Reply{Code: code, Message: err.Error()}
}

// dialEndpoint dials up to maxEndpointAttempts endpoints, round robin,
// within DialTimeout.
func (g *Gateway) dialEndpoint(ctx context.Context, eps []string) (c net.Conn, tried int, err error) {
	ctx, cancel := context.WithTimeout(ctx, g.lim.DialTimeout)
	defer cancel()
	start := int(g.rr.Add(1) % uint64(len(eps)))
	var d net.Dialer
	var errs []error
	for i := range min(maxEndpointAttempts, len(eps)) {
		c, err := d.DialContext(ctx, "tcp", eps[(start+i)%len(eps)])
		if err == nil {
			return c, i + 1, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, len(errs), errors.Join(errs...)
}

func resetStream(str *quic.Stream, code tunnel.StreamCode) {
	str.CancelWrite(quic.StreamErrorCode(code))
	str.CancelRead(quic.StreamErrorCode(code))
}

// dialSlot holds the outgoing connection to one peer and coalesces dials.
type dialSlot struct {
	conn *peerConn
	call *dialCall // the dial in progress, if any
	// down: the last dial failed, or the last connection ended because
	// the peer's gateway went away. Callers are then answered at once
	// (the sidecar tries its next tier) rather than kept waiting on a dial
	// that may take the whole dial timeout; the dial goes on behind.
	down bool
	// restart: a dial in progress was cancelled because the peer connected
	// to us (it is back); dial again as soon as it ends.
	restart bool
	// draining are superseded connections still carrying streams, and
	// replaced when one was last superseded (see retireLocked).
	draining []*peerConn
	replaced time.Time
}

type dialCall struct {
	done   chan struct{}
	cancel context.CancelFunc
	pc     *peerConn
	err    error
	// waiters are the callers waiting on the dial. A dial that succeeds
	// counts a stream on pc for each before pc is anyone else's to judge
	// (a superseded connection with no stream is closed), and sets ended.
	// Both under g.mu.
	waiters int
	ended   bool
}

// errPeerDown answers callers while a peer is known to be down.
var errPeerDown = errors.New("its gateway went away or could not be reached; dialing again in the background")

// peerConnFor returns the live outgoing connection to peer other than
// avoid (one found dead), dialing one if there is none (concurrent callers
// share one dial). fresh says it was dialed for this call.
func (g *Gateway) peerConnFor(ctx context.Context, peer string, avoid *peerConn) (pc *peerConn, fresh bool, err error) {
	own := g.own()
	g.mu.Lock()
	if !g.running {
		g.mu.Unlock()
		return nil, false, ErrClosed
	}
	s := g.slots[peer]
	if s == nil {
		s = &dialSlot{}
		g.slots[peer] = s
	}
	if idle := g.retireLocked(s, own); idle != nil {
		defer closeSuperseded(idle)
	}
	if s.conn != nil && s.conn != avoid && !s.conn.dead() {
		pc := s.conn
		pc.streams++
		g.mu.Unlock()
		return pc, false, nil
	}
	call := s.call
	if call == nil {
		call = g.startDialLocked(peer, s)
	}
	call.waiters++
	down := s.down
	g.mu.Unlock()
	var short <-chan time.Time
	if down {
		// Known down: a caller (a sidecar with other tiers to try) is not
		// kept for the whole dial timeout, only for a peer coming back.
		t := time.NewTimer(downWait)
		defer t.Stop()
		short = t.C
	}
	select {
	case <-call.done:
		return call.pc, true, call.err // the dial counted this caller's stream
	case <-ctx.Done():
		g.leaveDial(call)
		return nil, false, ctx.Err()
	case <-short:
		g.leaveDial(call)
		return nil, false, errPeerDown
	}
}

// leaveDial takes a caller that stopped waiting off call, releasing the
// stream the dial counted for it if it already succeeded.
func (g *Gateway) leaveDial(call *dialCall) {
	g.mu.Lock()
	counted := call.ended && call.err == nil
	if !call.ended {
		call.waiters--
	}
	g.mu.Unlock()
	if counted {
		g.releaseStream(call.pc)
	}
}

// downWait is how long a caller waits on a dial to a peer known to be down.
const downWait = 100 * time.Millisecond

// startDialLocked starts a dial to peer for slot s, shared by every
// caller until it ends. The caller holds g.mu, with running set.
func (g *Gateway) startDialLocked(peer string, s *dialSlot) *dialCall {
	ctx, cancel := context.WithCancel(g.runCtx)
	call := &dialCall{done: make(chan struct{}), cancel: cancel}
	s.call = call
	g.handlers.Add(1)
	go func() {
		defer g.handlers.Done()
		defer cancel()
		pc, err := g.dial(ctx, peer)
		g.mu.Lock()
		call.pc, call.err, call.ended = pc, err, true
		if err == nil {
			pc.streams += call.waiters
		}
		if s.call == call {
			s.call = nil
		}
		if g.slots[peer] == s {
			switch {
			case err == nil:
				s.conn, s.down = pc, false
			case s.restart && g.running:
				s.restart = false
				g.startDialLocked(peer, s)
			default:
				s.down = true
			}
		}
		g.mu.Unlock()
		close(call.done)
	}()
	return call
}

// peerBack is called when peer connects to this gateway: a dial to it that
// is still waiting (on an address that did not answer while the peer was
// away) is cut short and made again now, and a peer known down with no
// dial under way is dialed now, not by the next caller (who would be
// answered "down" meanwhile).
func (g *Gateway) peerBack(peer string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	s := g.slots[peer]
	switch {
	case s == nil || !s.down:
	case s.call != nil:
		s.restart = true
		s.call.cancel()
	case g.running:
		g.startDialLocked(peer, s)
	}
}

// dial connects to peer's gateway, trying its addresses in order.
func (g *Gateway) dial(runCtx context.Context, peer string) (*peerConn, error) {
	p, ok := g.cfg.Catalog.Peer(peer)
	if !ok {
		return nil, fmt.Errorf("cluster %s is not linked", peer)
	}
	if len(p.Addrs) == 0 {
		return nil, fmt.Errorf("cluster %s has no gateway address", peer)
	}
	g.mu.Lock()
	tr := g.tr
	g.mu.Unlock()
	tlsConf := g.cfg.Credentials.ClientTLS([]string{tunnel.ALPNPeer}, g.verifyPeerServer(peer))
	var presented atomic.Pointer[tls.Certificate]
	if get := tlsConf.GetClientCertificate; get != nil {
		tlsConf.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, err := get(cri)
			presented.Store(c)
			return c, err
		}
	}
	var errs []error
	for _, addr := range p.Addrs {
		ctx, cancel := context.WithTimeout(runCtx, g.lim.DialTimeout)
		conn, err := g.dialAddr(ctx, tr, addr, tlsConf)
		cancel()
		if err != nil {
			var te *quic.TransportError
			if !errors.As(err, &te) || te.Remote { // local refusals were counted by verifyPeerServer
				reason := reasonOf(err)
				if errors.As(err, &te) && te.Remote {
					reason = "refused_by_peer"
				}
				g.m.handshakeFail.WithLabelValues(hopPeerOutbound, reason).Inc()
			}
			if errors.As(err, &te) && te.Remote {
				err = g.refusedHint(peer, err)
			}
			errs = append(errs, fmt.Errorf("%s: %w", addr, err))
			continue
		}
		pc := &peerConn{conn: conn, peer: peer, chain: conn.ConnectionState().TLS.PeerCertificates, outbound: true, since: g.now(), turns: newSendTurns()}
		if c := presented.Load(); c != nil {
			pc.ownIssuer = g.stateOf(c).issuer
		}
		pc.peerRoot = g.rootOf(pc.chain, svid.RoleServer)
		if err := g.track(pc); err != nil {
			conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseShutdown), "gateway shutting down")
			return nil, err
		}
		// A trust or link change during the handshake was not seen by Recheck.
		if code, _, err := g.judgePeer(pc); err != nil {
			conn.CloseWithError(quic.ApplicationErrorCode(code), err.Error())
			g.untrack(pc)
			return nil, err
		}
		g.log.Info("connected to peer", logPeer, peer, "address", addr)
		// Untrack it when it closes. This runs under the dial's handler
		// count, so it may add its own.
		g.handlers.Add(1)
		go func() {
			defer g.handlers.Done()
			<-conn.Context().Done()
			g.untrack(pc)
			cause := context.Cause(conn.Context())
			// In TLS 1.3 the client finishes its handshake before the
			// server has judged the client's certificate: a refusal
			// arrives as the connection's close.
			var te *quic.TransportError
			if errors.As(cause, &te) && te.Remote && te.ErrorCode.IsCryptoError() {
				g.m.handshakeFail.WithLabelValues(hopPeerOutbound, "refused_by_peer").Inc()
			}
			g.log.Info("peer connection closed", logPeer, peer, "direction", "dialed", "error", cause)
		}()
		return pc, nil
	}
	return nil, errors.Join(errs...)
}

// refusedHint adds to err, a refusal by peer's gateway, what a peer that
// removed its link answers and what to do then.
func (g *Gateway) refusedHint(peer string, err error) error {
	return fmt.Errorf("%w (the gateway of %s refused this one: if %s removed its link with %s, run `strait federation unlink %s` here too)", err, peer, peer, g.cfg.Cluster, peer)
}

// refusedByPeer reports whether err carries a TLS alert from the peer. In
// TLS 1.3 the client finishes its handshake before the server has judged
// the client's certificate, so a peer that removed its link refuses a
// connection already dialed: the refusal arrives as the connection's close,
// under the first stream.
func refusedByPeer(err error) bool {
	var te *quic.TransportError
	return errors.As(err, &te) && te.Remote && te.ErrorCode.IsCryptoError()
}

func (g *Gateway) dialAddr(ctx context.Context, tr *quic.Transport, addr string, tlsConf *tls.Config) (*quic.Conn, error) {
	ua, err := resolveUDP(ctx, addr)
	if err != nil {
		return nil, err
	}
	return tr.Dial(ctx, ua, tlsConf, g.clientQUIC)
}

// resolveUDP resolves host:port, preferring an IPv4 address.
func resolveUDP(ctx context.Context, addr string) (*net.UDPAddr, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	pn, err := net.DefaultResolver.LookupPort(ctx, "udp", port)
	if err != nil {
		return nil, err
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		return net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(pn))), nil
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, err
	}
	if len(ips) == 0 {
		return nil, fmt.Errorf("no address for %s", host)
	}
	best := ips[0]
	for _, ip := range ips {
		if ip.Unmap().Is4() {
			best = ip.Unmap()
			break
		}
	}
	return net.UDPAddrFromAddrPort(netip.AddrPortFrom(best, uint16(pn))), nil
}

// openError is a failure to get a stream to a peer answered, with the
// reply code that describes it.
type openError struct {
	code tunnel.Code
	err  error
}

func (e *openError) Error() string { return e.err.Error() }
func (e *openError) Unwrap() error { return e.err }

// openStream opens a stream to peer, writes h and reads the peer's reply.
// A connection that turns out to be dead (its peer restarted) is replaced
// and the stream opened again once: nothing but the header was sent.
//
// done must be called once the stream ended (a superseded connection is
// closed when its last stream ends); on an error there is nothing to call.
// turns are those of the stream's connection.
func (g *Gateway) openStream(ctx context.Context, peer string, h tunnel.Header) (_ *quic.Stream, _ tunnel.Reply, turns sendTurns, done func(), _ error) {
	str, reply, pc, err := g.openStreamOn(ctx, peer, h)
	if err != nil {
		if pc != nil {
			g.releaseStream(pc)
		}
		return nil, tunnel.Reply{}, nil, nil, err
	}
	var once sync.Once
	return str, reply, pc.turns, func() { once.Do(func() { g.releaseStream(pc) }) }, nil
}

func (g *Gateway) openStreamOn(ctx context.Context, peer string, h tunnel.Header) (*quic.Stream, tunnel.Reply, *peerConn, error) {
	var gone *peerConn
	for attempt := 0; ; attempt++ {
		pc, fresh, err := g.peerConnFor(ctx, peer, gone)
		if err != nil {
			return nil, tunnel.Reply{}, nil, &openError{tunnel.CodeUnavailable, fmt.Errorf("peer %s unreachable: %w", peer, err)}
		}
		retry := !fresh && attempt == 0
		octx, cancel := context.WithTimeout(ctx, g.lim.DialTimeout)
		str, err := pc.conn.OpenStreamSync(octx)
		cancel()
		if err != nil {
			switch {
			case connGone(pc, err) && retry:
				g.releaseStream(pc)
				gone = pc
				continue
			case !pc.dead() && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded):
				return nil, tunnel.Reply{}, pc, &openError{tunnel.CodeLimit, fmt.Errorf("peer %s: no stream free within %s", peer, g.lim.DialTimeout)}
			}
			return nil, tunnel.Reply{}, pc, g.unreachable(peer, err)
		}
		reply, err := g.exchange(ctx, pc, str, h)
		if err == nil {
			return str, reply, pc, nil
		}
		resetStream(str, tunnel.StreamAborted)
		if connGone(pc, err) {
			if retry {
				g.log.Info("peer connection was dead; dialing again", logPeer, peer, "error", err)
				g.releaseStream(pc)
				gone = pc
				continue
			}
			if pc.dead() {
				err = context.Cause(pc.conn.Context())
			}
			return nil, tunnel.Reply{}, pc, g.unreachable(peer, err)
		}
		return nil, tunnel.Reply{}, pc, &openError{tunnel.CodeUnavailable, fmt.Errorf("peer %s: %w", peer, err)}
	}
}

// unreachable is the error of a stream that could not be had on a
// connection to peer: err, with advice when peer's gateway refused this
// one after the handshake.
func (g *Gateway) unreachable(peer string, err error) *openError {
	if refusedByPeer(err) {
		err = g.refusedHint(peer, err)
	}
	return &openError{tunnel.CodeUnavailable, fmt.Errorf("peer %s unreachable: %w", peer, err)}
}

// connGone reports whether err (from a stream of pc) means pc is closed.
// A stream learns of its connection's end before the connection's context
// does, so a connection-level error counts.
func connGone(pc *peerConn, err error) bool {
	if pc.dead() {
		return true
	}
	var (
		ae *quic.ApplicationError
		te *quic.TransportError
		ie *quic.IdleTimeoutError
		se *quic.StatelessResetError
		he *quic.HandshakeTimeoutError
	)
	return errors.As(err, &ae) || errors.As(err, &te) || errors.As(err, &ie) || errors.As(err, &se) || errors.As(err, &he)
}

// exchange writes h on str and reads the reply, within HeaderTimeout plus
// DialTimeout (the peer may be dialing its endpoints) or ctx. If the
// connection receives nothing at all for staleAfter, it is closed as dead.
func (g *Gateway) exchange(ctx context.Context, pc *peerConn, str *quic.Stream, h tunnel.Header) (tunnel.Reply, error) {
	deadline := time.Now().Add(g.lim.HeaderTimeout + g.lim.DialTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	str.SetDeadline(deadline)
	defer str.SetDeadline(time.Time{})
	stop := context.AfterFunc(ctx, func() { str.SetDeadline(time.Now()) })
	defer stop()
	before := pc.conn.ConnectionStats().PacketsReceived
	if err := tunnel.WriteHeader(str, h); err != nil {
		return tunnel.Reply{}, err
	}
	wait := staleAfter(pc.conn)
	probe := time.AfterFunc(wait, func() {
		if pc.conn.ConnectionStats().PacketsReceived == before {
			g.log.Warn("peer connection received nothing; closing it as dead", logPeer, pc.peer, "after", wait.String())
			pc.conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseStale), "no answer")
		}
	})
	defer probe.Stop()
	reply, err := tunnel.ReadReply(str)
	if err != nil {
		return tunnel.Reply{}, err
	}
	return reply, nil
}

// OpenControl opens a control stream to the linked peer's gateway. The
// caller owns the stream and must Close it.
func (g *Gateway) OpenControl(ctx context.Context, peer string) (io.ReadWriteCloser, error) {
	if _, ok := g.cfg.Catalog.Peer(peer); !ok {
		return nil, fmt.Errorf("gateway: open control stream: cluster %s is not linked", peer)
	}
	str, reply, _, done, err := g.openStream(ctx, peer, tunnel.Header{Kind: tunnel.KindControl})
	g.m.streams.WithLabelValues(dirOutbound, resultOf(reply, err)).Inc()
	if err != nil {
		return nil, fmt.Errorf("gateway: open control stream: %w", err)
	}
	if err := reply.Err(); err != nil {
		resetStream(str, tunnel.StreamNoError)
		done()
		return nil, fmt.Errorf("gateway: open control stream to %s: %w", peer, err)
	}
	return &stream{str: str, done: done}, nil
}

func resultOf(reply tunnel.Reply, err error) string {
	var oe *openError
	if errors.As(err, &oe) {
		return oe.code.String()
	}
	if err != nil {
		return tunnel.CodeUnavailable.String()
	}
	return reply.Code.String()
}

// stream is a QUIC stream handed to a handler: Close ends both directions.
type stream struct {
	str  *quic.Stream
	done func() // the stream ended (nil for streams a peer opened)
}

func (s *stream) Read(p []byte) (int, error)  { return s.str.Read(p) }
func (s *stream) Write(p []byte) (int, error) { return s.str.Write(p) }

// CloseWrite ends the write direction (FIN); reading goes on.
func (s *stream) CloseWrite() error { return s.str.Close() }

// Close ends both directions.
func (s *stream) Close() error {
	s.str.CancelRead(quic.StreamErrorCode(tunnel.StreamNoError))
	err := s.str.Close()
	if s.done != nil {
		s.done()
	}
	return err
}

// SetDeadline sets read and write deadlines.
func (s *stream) SetDeadline(t time.Time) error { return s.str.SetDeadline(t) }

// SetReadDeadline sets the read deadline (a control stream's hello).
func (s *stream) SetReadDeadline(t time.Time) error { return s.str.SetReadDeadline(t) }

// A join connection carries at most maxJoinStreams streams and lives at
// most maxJoinLife: it needs no credential, and one that kept opening
// streams would otherwise hold one of the MaxJoinConns slots for good.
const (
	maxJoinStreams = 8
	maxJoinLife    = 2 * time.Minute
)

// serveJoin serves a join connection: one stream at a time, closed after
// JoinIdleTimeout without one, after maxJoinStreams or after maxJoinLife.
func (g *Gateway) serveJoin(conn *quic.Conn) {
	g.mu.Lock()
	full := g.joins >= g.lim.MaxJoinConns
	if !full {
		g.joins++
	}
	g.mu.Unlock()
	if full {
		g.m.refusals.WithLabelValues("join_limit").Inc()
		conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseTooManyConns), "too many join connections")
		return
	}
	defer func() {
		g.mu.Lock()
		g.joins--
		g.mu.Unlock()
	}()
	cs := conn.ConnectionState().TLS
	ctx := context.WithValue(conn.Context(), remoteKey{}, conn.RemoteAddr())
	g.mu.Lock()
	runCtx := g.runCtx
	g.mu.Unlock()
	stopOnShutdown := context.AfterFunc(runCtx, func() {
		conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseShutdown), "gateway shutting down")
	})
	defer stopOnShutdown()
	idle := time.AfterFunc(g.lim.JoinIdleTimeout, func() {
		conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseNoError), "join connection idle")
	})
	defer idle.Stop()
	life := time.AfterFunc(maxJoinLife, func() {
		conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseNoError), "join connection open too long")
	})
	defer life.Stop()
	busy := make(chan struct{}, 1)
	for n := 0; ; n++ {
		str, err := conn.AcceptStream(ctx)
		if err != nil {
			return
		}
		if n == maxJoinStreams {
			resetStream(str, tunnel.StreamRefused)
			g.m.refusals.WithLabelValues("join_limit").Inc()
			conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseTooManyConns), "too many join streams on one connection")
			return
		}
		select {
		case busy <- struct{}{}:
		default:
			resetStream(str, tunnel.StreamRefused) // one stream at a time
			continue
		}
		idle.Stop()
		started := g.goTracked(func() {
			s := &stream{str: str}
			defer func() {
				s.Close()
				idle.Reset(g.lim.JoinIdleTimeout)
				<-busy
			}()
			g.cfg.JoinHandler(ctx, s, cs)
		})
		if !started {
			resetStream(str, tunnel.StreamShutdown)
			return
		}
	}
}

type remoteKey struct{}

// RemoteAddr is the address a join connection came from, in the context a
// JoinHandler gets (nil elsewhere): for audit logs.
func RemoteAddr(ctx context.Context) net.Addr {
	a, _ := ctx.Value(remoteKey{}).(net.Addr)
	return a
}
