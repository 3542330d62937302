package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"

	"github.com/straitmesh/strait/gateway/tunnel"
)

// Relay buffers. An idle stream blocks in Read holding its buffer, and a
// gateway may hold tens of thousands of streams, so each direction starts
// with a small buffer and steps up while reads fill it: to a large one, then
// to a bulk one while fewer than maxBulkBuffers are lent. A bulk transfer
// then moves a quarter MiB per read and write, which saves the gateway and
// the endpoint behind it about a sixth of their CPU per byte against 32 KiB
// (make bench, federation). A read that returns less than the small buffer
// steps straight back down.
const (
	smallBuffer    = 2 << 10
	largeBuffer    = 32 << 10
	bulkBuffer     = 256 << 10
	maxBulkBuffers = 64 // 16 MiB
)

var (
	largeBuffers = sync.Pool{New: func() any { b := make([]byte, largeBuffer); return &b }}
	bulkBuffers  = sync.Pool{New: func() any { b := make([]byte, bulkBuffer); return &b }}
	bulkLent     atomic.Int64
)

// relayBuffer is the buffer one direction of a relay reads into.
type relayBuffer struct {
	small []byte
	lent  *[]byte // from largeBuffers or bulkBuffers, or nil
	buf   []byte
}

func newRelayBuffer() *relayBuffer {
	small := make([]byte, smallBuffer)
	return &relayBuffer{small: small, buf: small}
}

// adapt steps the buffer up after a read of n bytes filled it, and back to
// the small one after a read of less than the small buffer.
func (b *relayBuffer) adapt(n int) {
	switch {
	case n == len(b.buf) && b.lent == nil:
		b.lent = largeBuffers.Get().(*[]byte)
		b.buf = *b.lent
	case n == len(b.buf) && len(b.buf) == largeBuffer:
		if bulkLent.Add(1) > maxBulkBuffers {
			bulkLent.Add(-1)
			return
		}
		largeBuffers.Put(b.lent)
		b.lent = bulkBuffers.Get().(*[]byte)
		b.buf = *b.lent
	case n < smallBuffer && b.lent != nil:
		b.release()
	}
}

// release gives back a lent buffer.
func (b *relayBuffer) release() {
	if b.lent == nil {
		return
	}
	if len(*b.lent) == bulkBuffer {
		bulkBuffers.Put(b.lent)
		bulkLent.Add(-1)
	} else {
		largeBuffers.Put(b.lent)
	}
	b.lent, b.buf = nil, b.small
}

// pump copies src to dst until src ends (rerr is nil at io.EOF) or a read
// or write fails, counting what it writes.
func pump(dst io.Writer, src io.Reader, count prometheus.Counter) (rerr, werr error) {
	b := newRelayBuffer()
	defer b.release()
	for {
		nr, err := src.Read(b.buf)
		if nr > 0 {
			nw, ew := dst.Write(b.buf[:nr])
			if nw > 0 {
				count.Add(float64(nw))
			}
			if ew == nil && nw != nr {
				ew = io.ErrShortWrite
			}
			if ew != nil {
				return nil, ew
			}
		}
		if err == io.EOF {
			return nil, nil
		}
		if err != nil {
			return err, nil
		}
		b.adapt(nr)
	}
}

// relay copies between a tunnel stream and a TCP (or TLS) connection until
// both directions are done. An end of stream on one side becomes a
// half-close on the other (FIN on the stream, CloseWrite on the
// connection); a failure on one side aborts the other (a stream reset, a
// TCP reset).
func (g *Gateway) relay(str *quic.Stream, c net.Conn, dir string) {
	start := g.now()
	g.m.active[dir].Inc()
	defer func() {
		g.m.active[dir].Dec()
		g.m.duration.WithLabelValues(dir).Observe(g.now().Sub(start).Seconds())
	}()
	done := make(chan struct{})
	go func() { // connection → stream
		defer close(done)
		rerr, werr := pump(str, c, g.m.sent[dir])
		switch {
		case rerr == nil && werr == nil:
			str.Close()
		default: // the connection failed, or the peer stopped reading
			str.CancelWrite(quic.StreamErrorCode(tunnel.StreamAborted))
		}
	}()
	// stream → connection
	rerr, werr := pump(c, str, g.m.received[dir])
	switch {
	case werr != nil: // the connection no longer takes data
		str.CancelRead(quic.StreamErrorCode(tunnel.StreamAborted))
		abort(c)
	case rerr != nil: // the stream was reset or its connection lost
		abort(c)
	default:
		closeWrite(c)
		// The connection may stay silent, holding its half open: end it
		// when the stream can no longer carry its data (the QUIC
		// connection closed on an unlink or an untrusted root, or was
		// lost, or the peer stopped reading).
		select {
		case <-done:
		case <-str.Context().Done():
			select {
			case <-done:
			default:
				if !errors.Is(context.Cause(str.Context()), quic.ErrStreamClosed) { // not our own orderly close
					abort(c)
				}
			}
		}
	}
	<-done
	str.CancelRead(quic.StreamErrorCode(tunnel.StreamNoError)) // no-op once read to the end
	c.Close()
}

func closeWrite(c net.Conn) {
	type closeWriter interface{ CloseWrite() error }
	if cw, ok := c.(closeWriter); ok {
		if cw.CloseWrite() == nil {
			return
		}
	}
	c.Close()
}

// abort closes c with a TCP reset, so its peer sees a failure rather than
// an orderly end.
func abort(c net.Conn) {
	raw := c
	if tc, ok := c.(*tls.Conn); ok {
		raw = tc.NetConn()
	}
	if tcp, ok := raw.(*net.TCPConn); ok {
		tcp.SetLinger(0)
	}
	raw.Close()
}
