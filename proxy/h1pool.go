package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// poolIdleTimeout is how long a pooled HTTP/1.1 connection (to an upstream
// sidecar or to the app) may sit idle before it is closed. The next request
// after that long a quiet spell dials, and with TLS handshakes.
const poolIdleTimeout = 60 * time.Second

// h1Pool is a pool of HTTP/1.1 connections to one endpoint, driven from
// the request's own goroutine: it writes the request with net/http's
// Request.Write and parses the response with http.ReadResponse, without
// the per-connection read and write loops (and their goroutine handoffs)
// of http.Transport. Parsing stays the standard library's.
type h1Pool struct {
	dial        func(ctx context.Context) (net.Conn, error)
	maxIdle     int
	idleTimeout time.Duration
	// sem caps open connections (nil: no cap); a request at the cap waits
	// for a slot or for avail (a connection went back to the pool).
	sem   chan struct{}
	avail chan struct{}
	// maxWaiting bounds the requests waiting at the cap (0: no bound);
	// beyond it a request fails at once with errOverflow.
	maxWaiting int64
	waiting    atomic.Int64
	// armedWait: its connections are mTLS straight to a sidecar, which
	// closes a connection it will not serve outright (see flushAwait).
	armedWait bool

	mu   sync.Mutex
	idle []*h1Conn // oldest first
	// sweeping: a sweep is due (while idle connections are pooled).
	sweeping bool
	// retired: the pool was dropped (its endpoint left, or trust
	// changed); connections coming back from requests are closed, as
	// nothing would take or sweep them any more.
	retired bool
}

type h1Conn struct {
	c         net.Conn
	lr        *h1Reader // under br: bounds a response head
	br        *bufio.Reader
	bw        *bufio.Writer
	idleSince time.Time
	sem       chan struct{}
	closeOnce sync.Once
	deadline  time.Time       // set on c by setDeadline (the fast path's)
	raw       syscall.RawConn // of the TCP connection under c, or nil
}

func newH1Conn(c net.Conn, sem chan struct{}) *h1Conn {
	lr := &h1Reader{c: c, n: math.MaxInt64, tooLarge: errResponseHeaderTooLarge}
	return &h1Conn{c: c, lr: lr, br: bufio.NewReaderSize(lr, 4096), bw: bufio.NewWriterSize(c, 4096), sem: sem}
}

// armWait lets flushAwait wait on the TCP connection under c, if c is
// TLS over TCP whose handshake is done: a TLS write that had to finish the
// handshake would read, and the read lock is flushAwait's while it waits.
func (hc *h1Conn) armWait() {
	tc, isTLS := hc.c.(*tls.Conn)
	if !isTLS || !tc.ConnectionState().HandshakeComplete {
		return
	}
	if tcp, ok := socketUnder(hc.c).(*net.TCPConn); ok {
		hc.raw, _ = tcp.SyscallConn()
	}
}

// socketUnder is the connection under a pool's TLS and tracking layers:
// the socket itself, for a look that the layers above cannot take.
func socketUnder(c net.Conn) net.Conn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if pc, ok := c.(*pooledConn); ok {
		c = pc.Conn
	}
	if tc, ok := c.(*tunnelledConn); ok {
		c = tc.TCPConn
	}
	return c
}

// flushAwait sends what bw holds and waits until the connection has
// something to read, the wait armed before the request goes out. Go's own
// read tries the socket once before it waits, which before a response
// always finds nothing: this saves that system call per request.
//
// Arming first is what makes it safe: every byte of the response arrives
// after the wait is armed, so its arrival wakes the wait. That holds only
// if no byte of the request went out before, so whole must say that bw
// holds all of it. What arrived before does not wake the wait either, so a
// connection the peer had only half-closed (FIN sent, still reading) would
// wait out the deadline. Hence only pools of connections straight to a
// sidecar arm (h1Pool.armedWait): a sidecar closes outright, and the reset
// that answers the request wakes the wait. An application, or a gateway
// relaying a half-close, might not.
func (hc *h1Conn) flushAwait(whole bool) error {
	if hc.raw == nil || !whole || hc.br.Buffered() > 0 {
		return hc.bw.Flush()
	}
	var err error
	sent := false
	werr := hc.raw.Read(func(uintptr) bool {
		if sent {
			return true
		}
		sent = true
		err = hc.bw.Flush()
		return err != nil
	})
	if !sent {
		// Closed, or past its deadline, before anything was written: as
		// the flush would have failed.
		return werr
	}
	// A wait that failed (the deadline, the connection closed) fails the
	// read that follows the same way, which reports it as ever.
	return err
}

var errResponseHeaderTooLarge = fmt.Errorf("proxy: response header over %d bytes", h1MaxHeaderBytes)

// readResponse reads a response with http.ReadResponse, its head (and any
// interim one) bounded by h1MaxHeaderBytes as net/http's Transport bounds
// it; the body is not.
func (hc *h1Conn) readResponse(req *http.Request) (*http.Response, error) {
	hc.lr.n = h1MaxHeaderBytes
	defer func() { hc.lr.n = math.MaxInt64 }()
	return http.ReadResponse(hc.br, req)
}

// setDeadline sets c's read and write deadline unless it is set already.
func (hc *h1Conn) setDeadline(t time.Time) {
	if !t.Equal(hc.deadline) {
		hc.deadline = t
		hc.c.SetDeadline(t)
	}
}

func (hc *h1Conn) close() {
	hc.closeOnce.Do(func() {
		hc.c.Close()
		if hc.sem != nil {
			<-hc.sem
		}
	})
}

var (
	errStaleConn = errors.New("proxy: pooled connection was closed by the peer")
	errOverflow  = errors.New("proxy: overflow: connection limit reached and too many requests waiting for a connection")
)

func (p *h1Pool) get(ctx context.Context, fresh bool) (*h1Conn, bool, error) {
	for {
		if !fresh {
			if hc := p.takeIdle(); hc != nil {
				return hc, true, nil
			}
		}
		if p.sem != nil {
			select {
			case p.sem <- struct{}{}:
			default:
				// At the cap: wait for a slot or an idle connection, if
				// the queue has room.
				if n := p.waiting.Add(1); p.maxWaiting > 0 && n > p.maxWaiting {
					p.waiting.Add(-1)
					return nil, false, errOverflow
				}
				// avail holds one signal; the timer covers signals lost
				// between two waiters.
				t := time.NewTimer(20 * time.Millisecond)
				select {
				case p.sem <- struct{}{}:
					t.Stop()
					p.waiting.Add(-1)
				case <-p.avail:
					t.Stop()
					p.waiting.Add(-1)
					continue
				case <-t.C:
					p.waiting.Add(-1)
					continue
				case <-ctx.Done():
					t.Stop()
					p.waiting.Add(-1)
					return nil, false, ctx.Err()
				}
			}
		}
		c, err := p.dial(ctx)
		if err != nil {
			if p.sem != nil {
				<-p.sem
			}
			return nil, false, err
		}
		hc := newH1Conn(c, p.sem)
		if p.armedWait {
			hc.armWait()
		}
		return hc, false, nil
	}
}

func (p *h1Pool) takeIdle() *h1Conn {
	now := time.Now()
	for {
		p.mu.Lock()
		if len(p.idle) == 0 {
			p.mu.Unlock()
			return nil
		}
		hc := p.idle[len(p.idle)-1]
		p.idle = p.idle[:len(p.idle)-1]
		p.mu.Unlock()
		idle := now.Sub(hc.idleSince)
		if idle < p.idleTimeout && hc.usable(idle) {
			return hc
		}
		hc.close()
	}
}

// A connection idle for peekAfter is checked before reuse, for a close by
// the peer or bytes it sent unsolicited (which the next caller would read
// as its response), by a look at its socket that does not wait. Where that
// is not possible, one idle for probeAfter is checked by a read that waits
// a millisecond. Younger ones are reused blind: a request lost to a close
// in that window is retried only if it is idempotent.
const (
	peekAfter  = time.Millisecond
	probeAfter = time.Second
)

// usable reports whether a connection idle for idle may be reused.
func (hc *h1Conn) usable(idle time.Duration) bool {
	if idle < peekAfter {
		return true
	}
	if alive, ok := peekIdle(hc.c); ok {
		return alive
	}
	return idle < probeAfter || hc.alive()
}

// alive reports whether the peer has neither closed the idle connection
// nor sent anything unsolicited on it.
func (hc *h1Conn) alive() bool {
	hc.c.SetReadDeadline(time.Now().Add(time.Millisecond))
	_, err := hc.br.Peek(1)
	hc.c.SetDeadline(time.Time{}) // read and write: the fast path's is gone too
	hc.deadline = time.Time{}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func (p *h1Pool) put(hc *h1Conn) {
	if hc.br.Buffered() > 0 {
		// Bytes beyond the response: they would be read as the next
		// caller's response. Such a connection is never reused.
		hc.close()
		return
	}
	hc.idleSince = time.Now()
	sweep := false
	p.mu.Lock()
	if len(p.idle) < p.maxIdle && !p.retired {
		p.idle = append(p.idle, hc)
		hc = nil
		if !p.sweeping && p.idleTimeout > 0 {
			p.sweeping, sweep = true, true
		}
	}
	p.mu.Unlock()
	if sweep {
		time.AfterFunc(p.idleTimeout, p.sweep)
	}
	if hc != nil {
		hc.close()
		return
	}
	if p.avail != nil {
		select {
		case p.avail <- struct{}{}:
		default:
		}
	}
}

// sweep closes the connections idle for idleTimeout, which takeIdle (the
// newest first) may never reach after a burst, and comes back while any
// are pooled.
func (p *h1Pool) sweep() {
	now := time.Now()
	p.mu.Lock()
	n := 0
	for n < len(p.idle) && now.Sub(p.idle[n].idleSince) >= p.idleTimeout {
		n++
	}
	expired := slices.Clone(p.idle[:n])
	p.idle = slices.Delete(p.idle, 0, n)
	var next time.Duration
	again := len(p.idle) > 0
	if again {
		next = p.idle[0].idleSince.Add(p.idleTimeout).Sub(now)
	}
	p.sweeping = again
	p.mu.Unlock()
	for _, hc := range expired {
		hc.close()
	}
	if again {
		time.AfterFunc(max(next, time.Millisecond), p.sweep)
	}
}

// retire closes the idle connections, and those in use as they come back.
func (p *h1Pool) retire() {
	p.mu.Lock()
	p.retired = true
	p.mu.Unlock()
	p.CloseIdleConnections()
}

// CloseIdleConnections closes the pooled connections not in use.
func (p *h1Pool) CloseIdleConnections() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, hc := range idle {
		hc.close()
	}
}

// RoundTrip sends req on a pooled connection. A reused connection that
// the peer had already closed is retried once on a fresh one when the
// request can be sent again.
func (p *h1Pool) RoundTrip(req *http.Request) (*http.Response, error) {
	for try := 0; ; try++ {
		hc, reused, err := p.get(req.Context(), try > 0)
		if err != nil {
			return nil, err
		}
		resp, err := p.roundTrip(hc, req)
		if err == nil {
			return resp, nil
		}
		hc.close()
		if !reused || try > 0 || !errors.Is(err, errStaleConn) || req.Context().Err() != nil {
			return nil, err
		}
		if req.Body != nil && req.Body != http.NoBody {
			if req.GetBody == nil {
				return nil, err
			}
			body, gerr := req.GetBody()
			if gerr != nil {
				return nil, err
			}
			req = req.Clone(req.Context())
			req.Body = body
		}
	}
}

var longAgo = time.Unix(1, 0)

func (p *h1Pool) roundTrip(hc *h1Conn, req *http.Request) (*http.Response, error) {
	hc.setDeadline(time.Time{}) // one the fast path left
	// Cancellation unblocks the reads and writes below.
	stop := context.AfterFunc(req.Context(), func() { hc.c.SetDeadline(longAgo) })
	fail := func(err error) (*http.Response, error) {
		stop()
		if ctxErr := req.Context().Err(); ctxErr != nil {
			return nil, ctxErr
		}
		return nil, err
	}
	if err := req.Write(hc.bw); err != nil {
		return fail(staleIf(err))
	}
	if err := hc.bw.Flush(); err != nil {
		return fail(staleIf(err))
	}
	var resp *http.Response
	for interim := 0; ; interim++ {
		// Nothing at all read back on a pooled connection: the peer had
		// closed it. The request went out, though, so it is only sent
		// again if doing so is safe (as net/http's Transport decides).
		if _, err := hc.br.Peek(1); err != nil {
			if idempotent(req) {
				err = staleIf(err)
			}
			return fail(err)
		}
		r, err := hc.readResponse(req)
		if err != nil {
			return fail(err)
		}
		if r.StatusCode == http.StatusSwitchingProtocols {
			return fail(errors.New("proxy: upstream switched protocols; upgrades are not supported"))
		}
		if r.StatusCode >= 100 && r.StatusCode < 200 {
			if interim >= 5 {
				return fail(errors.New("proxy: too many interim (1xx) responses"))
			}
			continue // 100 Continue, 103 Early Hints
		}
		resp = r
		break
	}
	reusable := !resp.Close && !req.Close
	if resp.Body == http.NoBody || resp.Body == nil {
		p.release(hc, stop, reusable)
		return resp, nil
	}
	resp.Body = &h1Body{body: resp.Body, pool: p, hc: hc, stop: stop, reusable: reusable}
	return resp, nil
}

// staleIf marks an I/O error on a pooled connection as a sign the peer
// had closed it (RoundTrip retries only on connections it reused).
func staleIf(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) || isConnReset(err) {
		return errors.Join(errStaleConn, err)
	}
	return err
}

// idempotent reports whether req may be sent twice: a safe method, or
// one carrying an idempotency key (as net/http's Transport decides).
func idempotent(req *http.Request) bool {
	switch req.Method {
	case "", http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	_, k1 := req.Header["Idempotency-Key"]
	_, k2 := req.Header["X-Idempotency-Key"]
	return k1 || k2
}

func isConnReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op != "dial"
}

func (p *h1Pool) release(hc *h1Conn, stop func() bool, reusable bool) {
	if !stop() || !reusable {
		// Cancelled (its deadline is spoiled) or not reusable.
		hc.close()
		return
	}
	p.put(hc)
}

// h1Body returns its connection to the pool once read to the end.
type h1Body struct {
	body     io.ReadCloser
	pool     *h1Pool
	hc       *h1Conn
	stop     func() bool
	reusable bool

	mu   sync.Mutex
	done bool
}

func (b *h1Body) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done {
		return 0, io.EOF
	}
	n, err := b.body.Read(p)
	if err == io.EOF {
		b.done = true
		b.body.Close()
		b.pool.release(b.hc, b.stop, b.reusable)
	}
	return n, err
}

func (b *h1Body) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done {
		return nil
	}
	b.done = true
	// Not read to the end: the connection's framing is unknown. It is
	// closed first, so that closing the body does not drain it.
	b.stop()
	b.hc.close()
	b.body.Close()
	return nil
}
