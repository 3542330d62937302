package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"

	"github.com/straitmesh/strait/gateway/tunnel"
)

// Relay buffers. An idle stream blocks in Read holding its buffer, and a
// gateway may hold tens of thousands of streams, so each direction starts
// with a small buffer and steps up while reads fill it: to a large one,
// then to a bulk one while fewer than maxBulkBuffers are lent, then to a
// jumbo one while fewer than maxJumboBuffers are lent. A bulk transfer
// then moves up to a MiB per read and write. Against a quarter MiB that
// cut the endpoint's TCP reads behind the receiving gateway from 0.63–0.67
// to 0.51–0.57 CPU s/GB (fewer, larger writes to read), and with 16 streams
// at once raised the tunnel's throughput against raw quic-go from
// 0.70–0.74 to 0.80–0.89 (make bench, federation, the throughput phase
// alone); a quarter MiB in turn saved about a sixth against 32 KiB. A read
// that returns less than the small buffer steps straight back down. At
// most 16 MiB of bulk and 16 MiB of jumbo buffers are lent at once.
const (
	smallBuffer     = 2 << 10
	largeBuffer     = 32 << 10
	bulkBuffer      = 256 << 10
	jumboBuffer     = 1 << 20
	maxBulkBuffers  = 64 // 16 MiB
	maxJumboBuffers = 16 // 16 MiB
)

// lendStep is one size of buffer a direction steps up to after the small
// one, lent from a pool, at most max at once (0: no limit).
type lendStep struct {
	size int
	max  int64
	lent atomic.Int64
	pool sync.Pool
}

// lendSteps are the steps up from the small buffer, smallest first.
var lendSteps = func() []*lendStep {
	steps := []*lendStep{{size: largeBuffer}, {size: bulkBuffer, max: maxBulkBuffers}, {size: jumboBuffer, max: maxJumboBuffers}}
	for _, st := range steps {
		st.pool.New = func() any { b := make([]byte, st.size); return &b }
	}
	return steps
}()

// take lends a buffer, or returns nil at the step's limit.
func (st *lendStep) take() *[]byte {
	if n := st.lent.Add(1); st.max > 0 && n > st.max {
		st.lent.Add(-1)
		return nil
	}
	return st.pool.Get().(*[]byte)
}

// give takes back a buffer lent by take.
func (st *lendStep) give(b *[]byte) {
	st.pool.Put(b)
	st.lent.Add(-1)
}

var (
	smallBuffers = sync.Pool{New: func() any { b := make([]byte, smallBuffer); return &b }}
	smallHeld    atomic.Int64 // small buffers taken and not handed back
)

// relayBuffer is the buffer one direction of a relay reads into. It holds
// none until the first get. A direction reading a TCP connection hands
// back whatever it holds while it waits for data (park), small or not, and
// takes the same size again when data comes.
type relayBuffer struct {
	small *[]byte // from smallBuffers, or nil
	lent  *[]byte // from lendSteps[step], or nil
	step  int
	buf   []byte
	// parked is the step of the buffer handed back while the direction
	// waits (park), plus one (0: none), taken again at the next get, or
	// the largest below it that is not at its limit: a transfer that
	// pauses keeps its step.
	parked int
}

func newRelayBuffer() *relayBuffer { return &relayBuffer{} }

// get returns the buffer to read into, taking one if none is held: of the
// parked step, or the largest step below it not at its limit, else a small
// one.
func (b *relayBuffer) get() []byte {
	if b.buf != nil {
		return b.buf
	}
	for i := b.parked - 1; i >= 0; i-- {
		if l := lendSteps[i].take(); l != nil {
			b.parked = 0
			b.lent, b.step, b.buf = l, i, *l
			return b.buf
		}
	}
	b.parked = 0
	b.small = smallBuffers.Get().(*[]byte)
	b.buf = *b.small
	smallHeld.Add(1)
	return b.buf
}

// park hands back whatever buffer is held while the direction waits for
// data, remembering a lent one's step for the next get.
func (b *relayBuffer) park() {
	if b.lent != nil {
		b.parked = b.step + 1
		b.releaseLent()
	}
	b.idle()
}

// quiet hands back a lent buffer, remembering its step, and takes a small
// one to wait in: for a direction that cannot wait without a buffer.
func (b *relayBuffer) quiet() {
	if b.lent == nil {
		return
	}
	step := b.step
	b.releaseLent()
	b.get() // a small one, b.parked being 0
	b.parked = step + 1
}

// idle hands back a small buffer while the direction waits; a lent one is
// kept, as the transfer it serves is under way.
func (b *relayBuffer) idle() {
	if b.small != nil {
		smallBuffers.Put(b.small)
		b.small, b.buf = nil, nil
		smallHeld.Add(-1)
	}
}

// adapt steps the buffer up after a read of n bytes filled it (unless the
// next step is at its limit), and back to the small one after a read of
// less than the small buffer.
func (b *relayBuffer) adapt(n int) {
	switch {
	case b.parked > 0 && n == len(b.buf): // a quiet direction's data fills its small buffer: the next get takes its step back
		b.idle()
	case b.parked > 0:
		b.parked = 0
	case n == len(b.buf) && b.lent == nil:
		if l := lendSteps[0].take(); l != nil {
			b.idle()
			b.lent, b.step, b.buf = l, 0, *l
		}
	case n == len(b.buf) && b.step+1 < len(lendSteps):
		if l := lendSteps[b.step+1].take(); l != nil {
			lendSteps[b.step].give(b.lent)
			b.lent, b.step, b.buf = l, b.step+1, *l
		}
	case n < smallBuffer && b.lent != nil:
		b.releaseLent()
	}
}

// releaseLent gives back a lent buffer.
func (b *relayBuffer) releaseLent() {
	if b.lent == nil {
		return
	}
	lendSteps[b.step].give(b.lent)
	b.lent, b.buf = nil, nil
}

// release gives back whatever buffer is held.
func (b *relayBuffer) release() {
	b.releaseLent()
	b.idle()
}

// pump copies src to dst until src ends (rerr is nil at io.EOF) or a read
// or write fails, counting what it writes. A TCP source is read through
// its RawConn, so that a direction waiting for data holds no buffer: a
// gateway may hold tens of thousands of quiet streams.
func pump(dst io.Writer, src io.Reader, count prometheus.Counter) (rerr, werr error) {
	b := newRelayBuffer()
	defer b.release()
	read := func() (int, error) { return src.Read(b.get()) }
	// more reads what a TCP source already holds, without waiting.
	var more func([]byte) (int, error)
	if tc, ok := src.(*net.TCPConn); ok {
		if rc, err := tc.SyscallConn(); err == nil {
			read = func() (int, error) { return readRaw(rc, b) }
			more = func(p []byte) (int, error) { return readNow(rc, p) }
		}
	}
	if qs, ok := src.(*quic.Stream); ok {
		read = func() (int, error) { return readStream(qs, b) }
	}
	sw, _ := dst.(*streamWriter)
	for {
		nr, err := read()
		if nr > 0 {
			// A bulk write waits for its turn on the connection (see
			// streamWriter), and the source has meanwhile received more:
			// it goes in the same run.
			if sw != nil && err == nil && nr >= bulkWrite && sw.take() {
				if more != nil && nr < len(b.buf) {
					var m int
					m, err = more(b.buf[nr:])
					nr += m
				}
			}
			nw, ew := dst.Write(b.buf[:nr])
			if sw != nil {
				sw.give()
			}
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

// quietAfter is how long a direction reading a tunnel stream waits for
// data in a lent buffer before it hands the buffer back (see readStream).
const quietAfter = time.Second

// readStream reads from a tunnel stream into b. A stream offers no way to
// wait for data without a buffer to read into, so a direction holding a
// lent buffer reads with a deadline: after quietAfter without data it
// hands the lent buffer back, remembering its step, and waits in a small
// one; a read that fills the small one takes the step back (see adapt).
// Without this, a kept-alive stream quiet after a burst would hold a bulk
// or jumbo buffer, and the gateway has few of those to lend.
func readStream(s *quic.Stream, b *relayBuffer) (int, error) {
	if b.lent == nil {
		return s.Read(b.get())
	}
	s.SetReadDeadline(time.Now().Add(quietAfter))
	n, err := s.Read(b.get())
	s.SetReadDeadline(time.Time{})
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return n, err
	}
	if n > 0 {
		return n, nil
	}
	b.quiet()
	return s.Read(b.get())
}

// readNow reads what a socket holds into p without waiting for more: 0
// and no error when it holds nothing.
func readNow(rc syscall.RawConn, p []byte) (int, error) {
	return readFD(rc, nil, p)
}

// readRaw reads from a socket into b, taking b's buffer only once the
// socket has data and handing a small one back while it waits.
func readRaw(rc syscall.RawConn, b *relayBuffer) (int, error) {
	return readFD(rc, b, nil)
}

// readFD reads from a socket: with b, into b's buffer, parking it and
// waiting while the socket holds nothing; without, into p and not
// waiting (0 and no error when the socket holds nothing).
func readFD(rc syscall.RawConn, b *relayBuffer, p []byte) (int, error) {
	var (
		n     int
		errno error
	)
	err := rc.Read(func(fd uintptr) bool {
		for {
			if b != nil {
				p = b.get()
			}
			n, errno = syscall.Read(int(fd), p)
			if errno != syscall.EINTR {
				break
			}
		}
		if errno == syscall.EAGAIN && b != nil {
			b.park()
			return false // wait until readable
		}
		return true
	})
	switch {
	case err != nil:
		return 0, err
	case errno == syscall.EAGAIN:
		return 0, nil
	case errno != nil:
		return 0, os.NewSyscallError("read", errno)
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// relay copies between a tunnel stream and a TCP (or TLS) connection until
// both directions are done, bulk writes to the stream taking turns on its
// connection (see streamWriter). An end of stream on one side becomes a
// half-close on the other (FIN on the stream, CloseWrite on the
// connection); a failure on one side aborts the other (a stream reset, a
// TCP reset).
func (g *Gateway) relay(str *quic.Stream, c net.Conn, dir string, turns sendTurns) {
	start := g.now()
	g.m.active[dir].Inc()
	defer func() {
		g.m.active[dir].Dec()
		g.m.duration.WithLabelValues(dir).Observe(g.now().Sub(start).Seconds())
	}()
	done := make(chan struct{})
	go func() { // connection → stream
		defer close(done)
		w := &streamWriter{str: str, turns: turns, now: g.now, outcome: g.m.turns}
		rerr, werr := pump(w, c, g.m.sent[dir])
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
