package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
)

// h1Server serves HTTP/1.1 connections with an http.Handler, one request
// at a time per connection, in the connection's goroutine. It replaces
// http.Server on the sidecar's hot paths: net/http starts a goroutine and
// an extra read per request to notice a client going away, allocates a
// cancelable context per request and buffers the response twice; a proxy
// does not need any of that (its upstream calls have their own timeouts).
//
// Request framing is net/http's (http.ReadRequest: Content-Length and
// chunked, conflicting lengths refused), with the checks http.Server adds
// on top (Host, header names and values, header size); responses are
// framed here from the handler's Content-Length, chunked otherwise.
type h1Server struct {
	handler       http.Handler
	log           *slog.Logger
	connContext   func(ctx context.Context, c net.Conn) context.Context
	headerTimeout time.Duration // for a request's headers once the connection is in use
	idleTimeout   time.Duration // between requests
	// fast, if set, serves the plain requests of the HTTP/1.1 fast path
	// (h1fast.go) instead of handler.
	fast fastHandler

	mu       sync.Mutex
	conns    map[*h1ServerConn]struct{}
	shutdown atomic.Bool
	wg       sync.WaitGroup
}

const (
	h1MaxHeaderBytes = 1 << 20 // as http.DefaultMaxHeaderBytes
	h1MaxDrain       = 256 << 10
)

// serverMarker is the http.ServerContextKey value of h1Server's requests
// (no http.Server serves them).
var serverMarker = new(http.Server)

// h1ServerConn is one connection being served.
type h1ServerConn struct {
	c      net.Conn
	cancel context.CancelFunc // ends its requests' context
	idle   atomic.Bool        // waiting for the next request
}

// h1Reader limits how much a request's (or a response's) header block may
// read.
type h1Reader struct {
	c        net.Conn
	n        int64
	tooLarge error // when n runs out; errHeaderTooLarge if nil
}

func (r *h1Reader) Read(p []byte) (int, error) {
	if r.n <= 0 {
		if r.tooLarge != nil {
			return 0, r.tooLarge
		}
		return 0, errHeaderTooLarge
	}
	if int64(len(p)) > r.n {
		p = p[:r.n]
	}
	n, err := r.c.Read(p)
	r.n -= int64(n)
	return n, err
}

var errHeaderTooLarge = errors.New("request header too large")

// serveConn serves c until the client closes it, an error, or shutdown.
func (s *h1Server) serveConn(c net.Conn) {
	lr := &h1Reader{c: c}
	s.serveBuffered(c, lr, bufio.NewReaderSize(lr, 4096))
}

// serveBuffered is serveConn for a connection whose first bytes may
// already sit in br, a reader of lr (as sniffH2C leaves them).
func (s *h1Server) serveBuffered(c net.Conn, lr *h1Reader, br *bufio.Reader) {
	// Under http.ServerContextKey, httputil.ReverseProxy aborts a
	// response whose body fails midway (serveOne then ends the
	// connection) instead of letting it end as if complete.
	ctx, cancel := context.WithCancel(context.WithValue(context.Background(), http.ServerContextKey, serverMarker))
	defer cancel()
	sc := &h1ServerConn{c: c, cancel: cancel}
	s.mu.Lock()
	if s.shutdown.Load() {
		s.mu.Unlock()
		c.Close()
		return
	}
	if s.conns == nil {
		s.conns = map[*h1ServerConn]struct{}{}
	}
	s.conns[sc] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer func() {
		c.Close()
		s.mu.Lock()
		delete(s.conns, sc)
		s.mu.Unlock()
		s.wg.Done()
	}()

	if s.connContext != nil {
		ctx = s.connContext(ctx, c)
	}
	remote := c.RemoteAddr().String()
	var tlsState *tls.ConnectionState
	if tc, ok := c.(interface{ ConnectionState() tls.ConnectionState }); ok {
		cs := tc.ConnectionState()
		tlsState = &cs
	}

	bw := bufio.NewWriterSize(c, 4096)
	w := &h1Response{bw: bw, c: c, header: make(http.Header)}
	var fc *fastConn
	if s.fast != nil {
		fc = &fastConn{c: c, br: br, bw: bw, ctx: ctx, tlsState: tlsState, req: h1Head{fields: make([]h1Field, 0, 16)}, resp: h1Head{fields: make([]h1Field, 0, 16)}}
	}
	var rd time.Time // the read deadline set on c
	for first := true; ; first = false {
		sc.idle.Store(true)
		if s.shutdown.Load() {
			return
		}
		timeout := s.idleTimeout
		if first {
			timeout = s.headerTimeout
		}
		// A deadline a little short of the one wanted (a tenth of the
		// timeout, at most a second) is left as it is: it would be moved
		// per request otherwise, a timer operation each.
		if want := time.Now().Add(timeout); want.Before(rd) || want.Sub(rd) > min(time.Second, timeout/10) {
			rd = want
			c.SetReadDeadline(rd)
		}
		lr.n = h1MaxHeaderBytes
		// The next request's first byte ends the idle wait; its headers
		// then get headerTimeout, unless they are all there already.
		if _, err := br.Peek(1); err != nil {
			return
		}
		if buffered, _ := br.Peek(br.Buffered()); !first && !bytes.Contains(buffered, crlfcrlf) {
			rd = time.Now().Add(s.headerTimeout)
			c.SetReadDeadline(rd)
		}
		sc.idle.Store(false)
		if fc != nil && fc.req.peekRequest(br) {
			if handled, keep := s.serveFast(fc); handled {
				br.Discard(fc.req.n + int(max(fc.req.length, 0)))
				if err := bw.Flush(); err != nil || !keep {
					return
				}
				continue
			}
		}
		// What is buffered so far, usually the whole header block: see
		// below. It stays valid while ReadRequest reads nothing more.
		pending, _ := br.Peek(br.Buffered())
		unread := lr.n
		req, err := http.ReadRequest(br)
		if err != nil {
			s.refuse(bw, err)
			return
		}
		readMore := lr.n != unread
		lr.n = 1<<63 - 1
		rd = time.Time{}
		c.SetReadDeadline(rd)
		if msg := checkRequest(req); msg != "" {
			s.refuseMsg(bw, http.StatusBadRequest, msg)
			return
		}
		if len(req.TransferEncoding) > 0 {
			// http.ReadRequest lets "Transfer-Encoding: chunked" override
			// a Content-Length and drops the latter; such a request may be
			// an attempt at smuggling, to refuse or else to close the
			// connection after (RFC 9112, section 6.1). A header block
			// that did not come in one piece is not looked at again.
			if readMore {
				req.Close = true
			} else if hasContentLength(pending) {
				s.refuseMsg(bw, http.StatusBadRequest, "both Transfer-Encoding and Content-Length")
				return
			}
		}
		req.RemoteAddr = remote
		req.TLS = tlsState
		req = req.WithContext(ctx)
		var ecr *expectContinueReader
		if req.ProtoAtLeast(1, 1) && req.Body != http.NoBody {
			if ex := req.Header.Get("Expect"); ex != "" {
				if !strings.EqualFold(ex, "100-continue") {
					s.refuseMsg(bw, http.StatusExpectationFailed, "unsupported Expect")
					return
				}
				ecr = &expectContinueReader{r: req.Body, bw: bw}
				req.Body = ecr
				delete(req.Header, "Expect")
			}
		}
		w.reset(req)
		w.ecr = ecr
		if !s.serveOne(w, req) {
			return // the handler panicked: the response is unknown
		}
		if w.readDeadline {
			rd = time.Time{}
			c.SetReadDeadline(rd)
		}
		w.finish()
		continued := ecr == nil || ecr.stop()
		// The response goes out before any leftover body is drained.
		if err := bw.Flush(); err != nil || w.err != nil {
			return
		}
		// The rest of an unread body must be drained to reach the next
		// request; a large one, a slow one, or one the client was told not
		// to send ends the connection instead.
		if req.Body != http.NoBody && !w.closeAfter {
			if !continued {
				w.closeAfter = true
			} else {
				c.SetReadDeadline(time.Now().Add(s.headerTimeout))
				if n, err := io.CopyN(io.Discard, req.Body, h1MaxDrain+1); n > h1MaxDrain || (err != nil && err != io.EOF) {
					w.closeAfter = true
				}
				rd = time.Time{}
				c.SetReadDeadline(rd)
			}
		}
		if w.closeAfter || req.Close {
			return
		}
	}
}

// serveOne runs the handler, recovering a panic (logged; the connection
// then ends, as net/http's server would end it).
func (s *h1Server) serveOne(w *h1Response, req *http.Request) (ok bool) {
	defer func() {
		if r := recover(); r != nil {
			if r == http.ErrAbortHandler {
				return
			}
			s.log.Error("HTTP handler panicked; connection closed", "panic", r, "method", req.Method, "path", req.URL.Path)
		}
	}()
	s.handler.ServeHTTP(w, req)
	return true
}

// serveFast runs the fast path's handler, recovering a panic as serveOne
// does (the connection then ends).
func (s *h1Server) serveFast(fc *fastConn) (handled, keep bool) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("HTTP fast path panicked; connection closed", "panic", r, "method", string(fc.req.method))
			fc.bw.Reset(fc.c) // the response is unknown: none of it goes out
			handled, keep = true, false
		}
	}()
	return s.fast(fc)
}

// refuse answers a request that could not be read, unless the client
// simply went away or idled out.
func (s *h1Server) refuse(bw *bufio.Writer, err error) {
	var ne net.Error
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed), errors.As(err, &ne) && ne.Timeout():
		return
	case errors.Is(err, errHeaderTooLarge):
		s.refuseMsg(bw, http.StatusRequestHeaderFieldsTooLarge, "request header too large")
	case strings.Contains(err.Error(), "unsupported transfer encoding"):
		s.refuseMsg(bw, http.StatusNotImplemented, "unsupported transfer encoding")
	default:
		s.log.Debug("malformed HTTP/1.1 request", "err", err)
		s.refuseMsg(bw, http.StatusBadRequest, "malformed request")
	}
}

func (s *h1Server) refuseMsg(bw *bufio.Writer, code int, msg string) {
	bw.WriteString("HTTP/1.1 " + strconv.Itoa(code) + " " + http.StatusText(code) +
		"\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: " +
		strconv.Itoa(len(msg)+1) + "\r\n\r\n" + msg + "\n")
	bw.Flush()
}

// hasContentLength reports whether the header block at the start of b
// has a Content-Length field.
func hasContentLength(b []byte) bool {
	const name = "content-length:"
	for first := true; len(b) > 0; first = false {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		if len(line) == 0 || line[0] == '\r' {
			if !first {
				return false // end of the header block
			}
			continue
		}
		if !first && len(line) >= len(name) && strings.EqualFold(string(line[:len(name)]), name) {
			return true
		}
	}
	return false
}

// checkRequest applies what http.Server checks beyond http.ReadRequest.
func checkRequest(req *http.Request) string {
	if req.ProtoMajor != 1 {
		return "unsupported protocol version"
	}
	// http.ReadRequest already refused repeated Host headers and moved
	// the one there is to req.Host.
	if req.Host == "" && req.ProtoAtLeast(1, 1) && req.Method != http.MethodConnect {
		return "missing required Host header"
	}
	if !httpguts.ValidHostHeader(req.Host) {
		return "malformed Host header"
	}
	for k, vv := range req.Header {
		if !httpguts.ValidHeaderFieldName(k) {
			return "invalid header name"
		}
		for _, v := range vv {
			if !httpguts.ValidHeaderFieldValue(v) {
				return "invalid header value"
			}
		}
	}
	return ""
}

// shutdownGrace is how long Shutdown waits for handlers once it has closed
// their connections and ended their context: one stuck on its upstream
// (an app that never answers) is left behind rather than waited for.
const shutdownGrace = time.Second

// Shutdown stops new requests: idle connections close now, busy ones after
// their response; whatever is left when ctx ends is closed, and handlers
// still running shutdownGrace later are left behind.
func (s *h1Server) Shutdown(ctx context.Context) {
	s.shutdown.Store(true)
	closeIdle := func() {
		s.mu.Lock()
		for sc := range s.conns {
			if sc.idle.Load() {
				sc.c.Close()
			}
		}
		s.mu.Unlock()
	}
	closeIdle()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			closeIdle()
		case <-ctx.Done():
			s.mu.Lock()
			for sc := range s.conns {
				sc.c.Close()
				sc.cancel()
			}
			n := len(s.conns)
			s.mu.Unlock()
			select {
			case <-done:
			case <-time.After(shutdownGrace):
				s.log.Warn("shutdown: requests still waiting on their upstream are abandoned", "connections", n)
			}
			return
		}
	}
}

// expectContinueReader sends "100 Continue" before the first body read,
// unless the final response began before. The body may be read by
// another goroutine (a transport sending it on) while the handler writes
// the response: mu orders their writes to bw.
type expectContinueReader struct {
	r    io.ReadCloser
	bw   *bufio.Writer
	mu   sync.Mutex
	sent bool // a 100 Continue went out
	done bool // no 100 Continue from now on
}

func (e *expectContinueReader) Read(p []byte) (int, error) {
	e.mu.Lock()
	if !e.done {
		e.done, e.sent = true, true
		e.bw.WriteString("HTTP/1.1 100 Continue\r\n\r\n")
		if err := e.bw.Flush(); err != nil {
			e.mu.Unlock()
			return 0, err
		}
	}
	e.mu.Unlock()
	return e.r.Read(p)
}

// stop rules out a 100 Continue from now on and reports whether one went
// out.
func (e *expectContinueReader) stop() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.done = true
	return e.sent
}

func (e *expectContinueReader) Close() error { return e.r.Close() }

// h1Response is the http.ResponseWriter of h1Server, reused across the
// requests of one connection. The header block is written at the first
// body write, flush or the end of the handler, so a handler that writes
// nothing gets Content-Length: 0 rather than a chunked empty body.
type h1Response struct {
	bw     *bufio.Writer
	c      net.Conn // the connection, for SetReadDeadline
	req    *http.Request
	header http.Header
	ecr    *expectContinueReader // of req.Body, if it has one

	status      int
	headerSent  bool
	noBody      bool
	chunked     bool
	length      int64 // declared Content-Length, -1 if none
	written     int64
	closeAfter  bool
	err         error
	trailerKeys []string
	// readDeadline: the handler set a read deadline on the connection
	// (SetReadDeadline), to be cleared before the next request.
	readDeadline bool
}

func (w *h1Response) reset(req *http.Request) {
	clear(w.header)
	*w = h1Response{bw: w.bw, c: w.c, header: w.header, req: req, length: -1, trailerKeys: w.trailerKeys[:0]}
}

// SetReadDeadline bounds the reads of the request's body, for
// http.ResponseController: the outbound handler holds a body to the
// request's timeout.
func (w *h1Response) SetReadDeadline(t time.Time) error {
	w.readDeadline = true
	return w.c.SetReadDeadline(t)
}

func (w *h1Response) Header() http.Header { return w.header }

func (w *h1Response) WriteHeader(code int) {
	if w.status != 0 || w.err != nil {
		return
	}
	if code >= 100 && code <= 199 && code != http.StatusSwitchingProtocols {
		// Interim responses go out at once with the headers set so far,
		// never to an HTTP/1.0 client (RFC 9110, section 15.2).
		if !w.req.ProtoAtLeast(1, 1) {
			return
		}
		if e := w.ecr; e != nil {
			e.mu.Lock()
			defer e.mu.Unlock()
			if code == http.StatusContinue {
				if e.sent {
					return
				}
				e.done, e.sent = true, true
			}
		}
		w.bw.WriteString("HTTP/1.1 " + strconv.Itoa(code) + " " + http.StatusText(code) + "\r\n")
		w.header.Write(w.bw)
		w.bw.WriteString("\r\n")
		w.err = w.bw.Flush()
		return
	}
	if code < 100 || code > 999 {
		code = http.StatusInternalServerError
	}
	w.status = code
}

// sendHeader writes the status line and header block, choosing framing.
func (w *h1Response) sendHeader(finished bool) {
	w.headerSent = true
	if w.ecr != nil {
		w.ecr.stop()
	}
	if w.status == 0 {
		w.status = http.StatusOK
	}
	h := w.header
	w.noBody = w.req.Method == http.MethodHead || w.status == http.StatusNoContent || w.status == http.StatusNotModified || w.status < 200
	delete(h, "Transfer-Encoding")
	if v := h.Get("Content-Length"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			delete(h, "Content-Length")
		} else {
			w.length = n
		}
	}
	if conn := h.Get("Connection"); conn != "" {
		if strings.EqualFold(conn, "close") {
			w.closeAfter = true
		}
		delete(h, "Connection")
	}
	if w.req.Close || !w.req.ProtoAtLeast(1, 1) {
		w.closeAfter = true
	}
	switch {
	case w.noBody:
		if w.status == http.StatusNoContent || w.status < 200 {
			delete(h, "Content-Length")
		}
	case w.length >= 0:
	case finished:
		w.length = 0
		h["Content-Length"] = []string{"0"}
	case w.req.ProtoAtLeast(1, 1):
		w.chunked = true
		h["Transfer-Encoding"] = []string{"chunked"}
		for _, k := range h["Trailer"] {
			for _, k := range strings.Split(k, ",") {
				// Not the fields framing the message (as net/http).
				if k = strings.TrimSpace(k); k != "" && httpguts.ValidTrailerHeader(k) {
					w.trailerKeys = append(w.trailerKeys, http.CanonicalHeaderKey(k))
				}
			}
		}
	default:
		w.closeAfter = true // HTTP/1.0 without a length: the close ends the body
	}
	if w.closeAfter {
		h["Connection"] = []string{"close"}
	}
	bw := w.bw
	bw.WriteString("HTTP/1.1 ")
	bw.WriteString(strconv.Itoa(w.status))
	bw.WriteByte(' ')
	bw.WriteString(http.StatusText(w.status))
	bw.WriteString("\r\n")
	for k, vv := range h {
		if strings.HasPrefix(k, http.TrailerPrefix) || (w.chunked && isTrailerKey(w.trailerKeys, k)) {
			continue
		}
		if !httpguts.ValidHeaderFieldName(k) {
			continue
		}
		for _, v := range vv {
			if !httpguts.ValidHeaderFieldValue(v) {
				continue
			}
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(v)
			bw.WriteString("\r\n")
		}
	}
	bw.WriteString("\r\n")
}

func isTrailerKey(keys []string, k string) bool {
	for _, t := range keys {
		if t == k {
			return true
		}
	}
	return false
}

func (w *h1Response) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	if !w.headerSent {
		w.sendHeader(false)
	}
	if w.noBody {
		return 0, http.ErrBodyNotAllowed
	}
	if len(p) == 0 {
		return 0, nil
	}
	if w.length >= 0 && w.written+int64(len(p)) > w.length {
		return 0, http.ErrContentLength
	}
	w.written += int64(len(p))
	if w.chunked {
		w.bw.WriteString(strconv.FormatInt(int64(len(p)), 16))
		w.bw.WriteString("\r\n")
	}
	n, err := w.bw.Write(p)
	if w.chunked && err == nil {
		_, err = w.bw.WriteString("\r\n")
	}
	if err != nil {
		w.err = err
	}
	return n, err
}

// Flush sends what was written so far (streaming responses).
func (w *h1Response) Flush() {
	if w.err != nil {
		return
	}
	if !w.headerSent {
		w.sendHeader(false)
	}
	w.err = w.bw.Flush()
}

// finish completes the response after the handler returned.
func (w *h1Response) finish() {
	if w.err != nil {
		w.closeAfter = true
		return
	}
	if !w.headerSent {
		w.sendHeader(true)
	}
	switch {
	case w.chunked:
		w.bw.WriteString("0\r\n")
		for k, vv := range w.header {
			name := k
			if after, ok := strings.CutPrefix(k, http.TrailerPrefix); ok {
				name = after
			} else if !isTrailerKey(w.trailerKeys, k) {
				continue
			}
			if !httpguts.ValidHeaderFieldName(name) {
				continue
			}
			for _, v := range vv {
				if httpguts.ValidHeaderFieldValue(v) {
					w.bw.WriteString(name + ": " + v + "\r\n")
				}
			}
		}
		w.bw.WriteString("\r\n")
	case !w.noBody && w.length >= 0 && w.written < w.length:
		// The handler wrote less than it declared: the client cannot
		// find the end of this response, so the connection ends here.
		w.closeAfter = true
	}
}
