package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"

	"github.com/straitmesh/strait/gateway/tunnel"
)

// Relay buffers. An idle stream blocks in Read holding its buffer, and a
// gateway may hold tens of thousands of streams, so each direction starts
// with a small buffer and borrows a large one only while reads fill it.
const (
	smallBuffer = 2 << 10
	largeBuffer = 32 << 10
)

var largeBuffers = sync.Pool{New: func() any { b := make([]byte, largeBuffer); return &b }}

// pump copies src to dst until src ends (rerr is nil at io.EOF) or a read
// or write fails, counting what it writes.
func pump(dst io.Writer, src io.Reader, count prometheus.Counter) (rerr, werr error) {
	small := make([]byte, smallBuffer)
	buf := small
	var large *[]byte
	defer func() {
		if large != nil {
			largeBuffers.Put(large)
		}
	}()
	for {
		nr, err := src.Read(buf)
		if nr > 0 {
			nw, ew := dst.Write(buf[:nr])
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
		switch {
		case nr == len(buf) && large == nil:
			large = largeBuffers.Get().(*[]byte)
			buf = *large
		case nr < smallBuffer && large != nil:
			largeBuffers.Put(large)
			large, buf = nil, small
		}
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
