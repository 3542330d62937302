package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/straitmesh/strait/gateway/tunnel"
)

// drainAfterRefusal bounds how long a refused entry connection is read
// (and discarded) after the reply, so that bytes the sidecar sent ahead of
// the reply do not make the kernel reset the connection before the reply
// is read.
const (
	drainAfterRefusal = time.Second
	drainLimit        = 64 << 10
)

// acceptEntries accepts sidecar connections until ctx ends.
func (g *Gateway) acceptEntries(ctx context.Context, ln net.Listener) error {
	var delay time.Duration
	var open atomic.Int64 // connections being served
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of file descriptors and the like: back off, as net/http does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			g.log.Warn("accepting entry connection failed", "error", err, "retry_in", delay.String())
			select {
			case <-time.After(delay):
			case <-ctx.Done():
				return nil
			}
			continue
		}
		delay = 0
		if open.Add(1) > int64(g.lim.MaxEntryConns) {
			open.Add(-1)
			g.m.refusals.WithLabelValues("entry_limit").Inc()
			c.Close()
			continue
		}
		if !g.goTracked(func() {
			defer open.Add(-1)
			g.serveEntry(ctx, c)
		}) {
			open.Add(-1)
			c.Close()
		}
	}
}

// serveEntry serves one sidecar connection: TLS handshake, header, checks,
// a stream to the peer, the peer's reply, then the relay.
func (g *Gateway) serveEntry(ctx context.Context, c net.Conn) {
	tc := tls.Server(c, g.entryTLS)
	c.SetDeadline(time.Now().Add(g.lim.HandshakeTimeout))
	hctx, cancel := context.WithTimeout(ctx, g.lim.HandshakeTimeout)
	err := tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		g.m.handshakeFail.WithLabelValues(hopEntry, reasonOf(err)).Inc()
		g.log.Debug("entry handshake failed", "address", c.RemoteAddr().String(), "error", err)
		c.Close()
		return
	}
	cs := tc.ConnectionState()
	id, _ := x509svid.IDFromCert(cs.PeerCertificates[0]) // verified by verifyEntry
	chain, release := g.chains.acquire(cs.PeerCertificates)
	defer release()
	ec := &entryConn{conn: c, chain: chain, id: id}
	if !g.trackEntry(ec) {
		c.Close()
		return
	}
	defer g.untrackEntry(ec)
	// A trust change during the handshake was not seen by Recheck.
	if reason, err := g.judgeEntry(ec); err != nil {
		g.m.refusals.WithLabelValues(reason).Inc()
		c.Close()
		return
	}

	result := tunnel.CodeOK
	defer func() { g.m.streams.WithLabelValues(dirOutbound, result.String()).Inc() }()
	refuse := func(reply tunnel.Reply) {
		result = reply.Code
		g.log.Info("refusing entry connection", logSPIFFEID, id.String(), "code", reply.Code.String(), "message", reply.Message)
		g.refuseEntry(tc, reply)
	}

	tc.SetDeadline(time.Now().Add(g.lim.HeaderTimeout))
	h, err := tunnel.ReadHeader(tc, g.lim.MaxHeaderBytes)
	if err != nil {
		refuse(tunnel.CodeFor(err))
		return
	}
	switch {
	case h.Kind != tunnel.KindData:
		refuse(tunnel.Reply{Code: tunnel.CodeUnsupported, Message: "the entry hop carries data streams only"})
		return
	case h.Cluster == g.cfg.Cluster:
		refuse(tunnel.Reply{Code: tunnel.CodeNotLinked, Message: fmt.Sprintf("cluster %s is this gateway's own cluster", h.Cluster)})
		return
	}
	if _, ok := g.cfg.Catalog.Peer(h.Cluster); !ok {
		refuse(tunnel.Reply{Code: tunnel.CodeNotLinked, Message: fmt.Sprintf("cluster %s is not linked to %s", h.Cluster, g.cfg.Cluster)})
		return
	}
	if err := g.cfg.Catalog.Imported(h.Cluster, h.Namespace, h.Service); err != nil {
		reply := catalogReply(err)
		reply.Message = h.String() + ": " + reply.Message
		refuse(reply)
		return
	}
	target := h.Cluster
	ec.target.Store(&target)
	tc.SetDeadline(time.Time{})

	str, reply, turns, done, err := g.openStream(ctx, h.Cluster, h)
	if err == nil {
		defer done()
	}
	if err != nil {
		code := tunnel.CodeUnavailable
		var oe *openError
		if errors.As(err, &oe) {
			code = oe.code
		}
		g.log.Info("peer unavailable", logPeer, h.Cluster, logService, h.String(), "error", err)
		refuse(tunnel.Reply{Code: code, Message: err.Error()})
		return
	}
	if reply.Code != tunnel.CodeOK { // the peer refused: pass its reply on
		resetStream(str, tunnel.StreamNoError)
		refuse(reply)
		return
	}
	tc.SetWriteDeadline(time.Now().Add(g.lim.HeaderTimeout))
	if err := tunnel.WriteReply(tc, reply); err != nil {
		result = tunnel.CodeUnavailable // the sidecar went away
		resetStream(str, tunnel.StreamAborted)
		c.Close()
		return
	}
	tc.SetWriteDeadline(time.Time{})
	if cs.NegotiatedProtocol == tunnel.ALPNEntryRaw {
		// The sidecar waits for the reply before it sends a relayed byte:
		// from here on, the TCP connection itself (see ALPNEntryRaw). The
		// TLS session's buffers are dropped for the life of the relay.
		tc = nil
		g.relay(str, c, dirOutbound, turns)
		return
	}
	g.relay(str, tc, dirOutbound, turns)
}

// refuseEntry sends reply, ends the write side and discards what the
// sidecar sends for a moment before closing.
func (g *Gateway) refuseEntry(tc *tls.Conn, reply tunnel.Reply) {
	tc.SetDeadline(time.Now().Add(drainAfterRefusal))
	if err := tunnel.WriteReply(tc, reply); err == nil && tc.CloseWrite() == nil {
		io.Copy(io.Discard, io.LimitReader(tc, drainLimit))
	}
	tc.NetConn().Close()
}

func (g *Gateway) trackEntry(ec *entryConn) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.running {
		return false
	}
	g.entries[ec] = struct{}{}
	g.m.entryConns.Inc()
	return true
}

func (g *Gateway) untrackEntry(ec *entryConn) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if _, ok := g.entries[ec]; ok {
		delete(g.entries, ec)
		g.m.entryConns.Dec()
	}
}
