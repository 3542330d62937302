package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/straitmesh/strait/ca/svid"
)

// ALPN protocols between sidecars. "strait-tcp/1" carries opaque TCP; the
// HTTP ones carry requests the receiving sidecar parses.
const (
	alpnTCP   = "strait-tcp/1"
	alpnH2    = "h2"
	alpnHTTP1 = "http/1.1"
)

// HeaderXFCC carries the caller's verified identity to the application, in
// Envoy's x-forwarded-client-cert format: By=<this workload>;URI=<caller>.
// Whatever the caller sent under this name is removed first.
const HeaderXFCC = "X-Forwarded-Client-Cert"

// identityHeaderPrefix marks headers only the sidecar may set.
const identityHeaderPrefix = "X-Strait-"

// inbound terminates mTLS for the workload, authorizes every connection
// against current trust and policy, and forwards to the application.
type inbound struct {
	creds   *Credentials
	metrics *Metrics
	log     *slog.Logger
	service string
	appAddr string
	tcp     bool // the service is opaque TCP: only strait-tcp/1 is offered
	policy  atomic.Pointer[authorizer]

	proxy     *httputil.ReverseProxy
	appH1     *h1Pool
	appH2C    *http.Transport
	dialer    net.Dialer
	selfID    atomic.Value // string
	tlsConfig *tls.Config

	mu      sync.Mutex
	conns   map[*tls.Conn]struct{}
	changes atomic.Uint64 // counts rechecks, to catch handshakes that straddle one
}

// appDialTimeout bounds a connect to the local application (whose accept
// queue may be full).
const appDialTimeout = 5 * time.Second

func newInbound(creds *Credentials, m *Metrics, log *slog.Logger, service, appAddr string, tcp bool) *inbound {
	in := &inbound{creds: creds, metrics: m, log: log, service: service, appAddr: appAddr, tcp: tcp, conns: map[*tls.Conn]struct{}{},
		dialer: net.Dialer{Timeout: appDialTimeout}}
	in.selfID.Store("")
	in.appH1 = &h1Pool{
		dial:        func(ctx context.Context) (net.Conn, error) { return in.dialer.DialContext(ctx, "tcp", appAddr) },
		maxIdle:     1024,
		idleTimeout: poolIdleTimeout,
	}
	h2c := new(http.Protocols)
	h2c.SetUnencryptedHTTP2(true)
	in.appH2C = &http.Transport{DialContext: in.dialer.DialContext, Protocols: h2c, DisableCompression: true}
	target := &url.URL{Scheme: "http", Host: appAddr}
	in.proxy = &httputil.ReverseProxy{
		// Identity headers are handled here, after ReverseProxy removed
		// hop-by-hop headers, so a caller cannot have ours removed by
		// naming it in Connection.
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.Out.Host = pr.In.Host
			h := pr.Out.Header
			for name := range h {
				if strings.EqualFold(name, HeaderXFCC) || len(name) >= len(identityHeaderPrefix) && strings.EqualFold(name[:len(identityHeaderPrefix)], identityHeaderPrefix) {
					delete(h, name)
				}
			}
			if pc := in.caller(pr.In); pc != nil {
				h[HeaderXFCC] = pc.xfcc
			}
		},
		Transport:     in,
		FlushInterval: 0, // streaming responses (no length) still flush at once
		BufferPool:    bufferPool{},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			in.log.Debug("forward to application failed", "err", err)
			w.WriteHeader(http.StatusBadGateway)
		},
	}
	protos := []string{alpnH2, alpnHTTP1}
	if tcp {
		protos = []string{alpnTCP}
	}
	in.tlsConfig = creds.ServerTLS(protos, in.verifyConnection)
	return in
}

// peerConn is what the inbound side knows of one connection's caller,
// computed once per connection rather than per request.
type peerConn struct {
	once  sync.Once
	id    spiffeid.ID
	idStr string
	xfcc  []string
}

type peerKey struct{}

// connContext gives each connection a slot for its caller's identity,
// filled from the verified handshake by the first request.
func (in *inbound) connContext(ctx context.Context, _ net.Conn) context.Context {
	return context.WithValue(ctx, peerKey{}, &peerConn{})
}

func (in *inbound) caller(r *http.Request) *peerConn { return in.callerOf(r.Context(), r.TLS) }

// callerOf is caller for a connection's context and TLS state.
func (in *inbound) callerOf(ctx context.Context, cs *tls.ConnectionState) *peerConn {
	pc, ok := ctx.Value(peerKey{}).(*peerConn)
	if !ok || cs == nil {
		return nil
	}
	pc.once.Do(func() {
		pc.id = peerID(cs)
		pc.idStr = pc.id.String()
		pc.xfcc = []string{"By=" + in.selfID.Load().(string) + ";URI=" + pc.idStr}
	})
	return pc
}

// RoundTrip sends a request to the application: gRPC over h2c, everything
// else over HTTP/1.1 with keep-alive.
func (in *inbound) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
		return in.appH2C.RoundTrip(r)
	}
	if r.ContentLength > 0 && r.ContentLength <= smallBody {
		// A small body is read first (it usually arrived with the headers)
		// so that headers and body reach the app in one write.
		buf := make([]byte, r.ContentLength)
		if _, err := io.ReadFull(r.Body, buf); err != nil {
			return nil, err
		}
		r.Body = io.NopCloser(bytes.NewReader(buf))
	}
	return in.appH1.RoundTrip(r)
}

// smallBody is the largest request body the inbound side reads whole
// before forwarding.
const smallBody = 16 << 10

// setPolicy installs the authorization for this workload's service and
// closes open connections it no longer allows.
func (in *inbound) setPolicy(z *authorizer) {
	in.policy.Store(z)
	in.recheck()
}

// verifyConnection judges a caller at the handshake; its refusals are
// counted with the other handshake failures (handshakeFailure).
func (in *inbound) verifyConnection(cs tls.ConnectionState) error {
	if !in.tcp && cs.NegotiatedProtocol == alpnTCP || in.tcp && cs.NegotiatedProtocol != alpnTCP {
		return refusal{"wrong_protocol", fmt.Errorf("ALPN %q does not match the service's protocol", cs.NegotiatedProtocol)}
	}
	id, _, err := in.creds.Verifier().Verify(cs.PeerCertificates, svid.RoleClient)
	if err != nil {
		return refusal{string(svid.ReasonOf(err)), err}
	}
	if err := in.policy.Load().check(id); err != nil {
		in.log.Info("caller refused", "spiffe_id", id.String(), "service", in.service, "reason", err)
		return refusal{"unauthorized", err}
	}
	in.metrics.handshakes.WithLabelValues("inbound", strconv.FormatBool(cs.DidResume)).Inc()
	return nil
}

// refusal is a refusal by verifyConnection, with its metric reason.
type refusal struct {
	reason string
	err    error
}

func (e refusal) Error() string { return e.err.Error() }
func (e refusal) Unwrap() error { return e.err }

// handshakeFailure is the metric reason of a failed inbound handshake, or
// "" for a connection closed before it sent anything (a port probe).
func handshakeFailure(err error) string {
	var r refusal
	var rh tls.RecordHeaderError
	var ne net.Error
	switch {
	case errors.As(err, &r):
		return r.reason
	case errors.Is(err, io.EOF):
		return ""
	case errors.As(err, &rh):
		return "not_tls"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case strings.Contains(err.Error(), "didn't provide a certificate"):
		return string(svid.ReasonNoCertificate)
	}
	return "tls_error"
}

// recheck closes open inbound connections whose caller is no longer
// trusted (a root was removed) or authorized (policy changed). A leaf that
// merely expired after its handshake keeps its session (see StillTrusted):
// the caller renews and its next connection presents the new SVID.
func (in *inbound) recheck() {
	in.changes.Add(1)
	in.mu.Lock()
	conns := make([]*tls.Conn, 0, len(in.conns))
	for c := range in.conns {
		conns = append(conns, c)
	}
	in.mu.Unlock()
	for _, c := range conns {
		in.recheckConn(c)
	}
}

// recheckConn closes c if its caller is no longer trusted or authorized.
func (in *inbound) recheckConn(c *tls.Conn) {
	cs := c.ConnectionState()
	if !cs.HandshakeComplete {
		return
	}
	reason := ""
	id, err := in.creds.StillTrusted(cs.PeerCertificates, svid.RoleClient)
	if err != nil {
		reason = string(svid.ReasonOf(err))
	}
	if reason == "" && in.policy.Load().check(id) != nil {
		reason = "unauthorized"
	}
	if reason != "" {
		in.metrics.connsClosed.WithLabelValues(reason).Inc()
		in.log.Info("closing connection no longer allowed", "spiffe_id", id.String(), "reason", reason)
		go c.Close()
	}
}

func (in *inbound) track(c net.Conn, state http.ConnState) {
	tc, ok := c.(*tls.Conn)
	if !ok {
		return
	}
	in.mu.Lock()
	switch state {
	case http.StateNew:
		in.conns[tc] = struct{}{}
	case http.StateClosed, http.StateHijacked:
		delete(in.conns, tc)
	}
	in.mu.Unlock()
}

func peerID(cs *tls.ConnectionState) spiffeid.ID {
	if cs == nil || len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}
	}
	id, _ := x509svid.IDFromCert(cs.PeerCertificates[0])
	return id
}

func (in *inbound) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	pc := in.caller(r)
	if pc == nil {
		http.Error(w, "no verified caller", http.StatusForbidden)
		return
	}
	rec := &statusRecorder{ResponseWriter: w}
	defer func() {
		in.metrics.observeRequest("inbound", pc.idStr, in.service, rec.code(), time.Since(start))
	}()
	if r.Header.Get("Upgrade") != "" {
		// A hijacked connection would escape revocation on policy and
		// trust changes; upgrades are refused until they can be tracked.
		sidecarError(rec, http.StatusNotImplemented, "connection upgrades are not supported by the sidecar")
		return
	}
	in.proxy.ServeHTTP(rec, r)
}

// serveTCP relays an opaque TCP connection to the application.
func (in *inbound) serveTCP(c *tls.Conn) {
	m := in.metrics
	m.tcpConns.WithLabelValues("inbound", in.service).Inc()
	active := m.tcpActive.WithLabelValues("inbound", in.service)
	active.Inc()
	defer active.Dec()
	app, err := in.dialer.Dial("tcp", in.appAddr)
	if err != nil {
		in.log.Debug("dial application", "err", err)
		c.Close()
		return
	}
	relay(c, app, m.tcpBytes.WithLabelValues("inbound", in.service, "sent"), m.tcpBytes.WithLabelValues("inbound", in.service, "received"))
}

// run serves inbound connections on ln until ctx ends. The TLS handshake
// is done here; HTTP/1.1 is served by h1Server, HTTP/2 by net/http, and
// strait-tcp/1 is relayed.
func (in *inbound) run(ctx context.Context, ln net.Listener) error {
	protos := new(http.Protocols)
	protos.SetHTTP1(true)
	protos.SetHTTP2(true)
	h2 := &http.Server{
		Handler:           in,
		Protocols:         protos,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       5 * time.Minute,
		ConnState:         in.track,
		ConnContext:       in.connContext,
		ErrorLog:          slogErrorLog(in.log),
	}
	h1 := &h1Server{handler: in, fast: in.serveFast, log: in.log, connContext: in.connContext, headerTimeout: 30 * time.Second, idleTimeout: 5 * time.Minute}
	h2ln := newChanListener(ln.Addr())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer h2ln.Close()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				in.serveConn(ctx, c, h1, h2ln)
			}()
		}
	}()
	go func() { <-ctx.Done(); ln.Close() }()
	errc := make(chan error, 1)
	go func() { errc <- serveUntil(ctx, h2, h2ln) }()
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	h1.Shutdown(sctx)
	err := <-errc
	ln.Close()
	in.mu.Lock()
	for c := range in.conns {
		c.Close() // TCP relays
	}
	in.mu.Unlock()
	wg.Wait()
	return err
}

// serveConn completes the handshake of one accepted connection and serves
// it by its negotiated protocol.
func (in *inbound) serveConn(ctx context.Context, c net.Conn, h1 *h1Server, h2 *chanListener) {
	tc := tls.Server(c, in.tlsConfig)
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	gen := in.changes.Load()
	err := tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		if reason := handshakeFailure(err); reason != "" {
			in.metrics.handshakeFails.WithLabelValues("inbound", reason).Inc()
		}
		in.log.Debug("inbound handshake failed", "remote", c.RemoteAddr().String(), "err", err)
		c.Close()
		return
	}
	if tc.ConnectionState().NegotiatedProtocol == alpnH2 {
		in.track(tc, http.StateNew) // net/http untracks it (ConnState)
		if in.changes.Load() != gen {
			in.recheckConn(tc)
		}
		if !h2.push(tc) {
			tc.Close()
			in.track(tc, http.StateClosed)
		}
		return
	}
	in.track(tc, http.StateNew)
	defer in.track(tc, http.StateClosed)
	if in.changes.Load() != gen {
		// Policy or trust changed while this handshake was verified
		// against the old one: judge it again now that it is tracked.
		in.recheckConn(tc)
	}
	switch {
	case ctx.Err() != nil:
		tc.Close()
	case tc.ConnectionState().NegotiatedProtocol == alpnTCP:
		in.serveTCP(tc)
	default:
		h1.serveConn(tc)
	}
}

// serveUntil serves srv on ln until ctx ends, then shuts down gracefully
// for up to five seconds before closing what is left.
func serveUntil(ctx context.Context, srv *http.Server, ln net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// relay copies both ways until both sides are done, counting the bytes
// written to a (sent) and read from a (received) as they go, so that a
// long-lived connection shows in the metrics while it is open.
//
// An end of stream on one side is a half-close on the other; a failure on
// one side (a connection closed under it, such as a caller's that Recheck
// ended) ends both, so the other direction is not left waiting on a peer
// that may never write or close.
func relay(a, b net.Conn, sent, received prometheus.Counter) {
	var wg sync.WaitGroup
	wg.Add(1)
	end := func(err error, to net.Conn) {
		if err != nil {
			a.Close()
			b.Close()
			return
		}
		closeWrite(to)
	}
	go func() {
		defer wg.Done()
		_, err := io.Copy(countingWriter{b, received}, a)
		end(err, b)
	}()
	_, err := io.Copy(countingWriter{a, sent}, b)
	end(err, a)
	wg.Wait()
	a.Close()
	b.Close()
}

// countingWriter adds what it writes to a counter.
type countingWriter struct {
	w io.Writer
	c prometheus.Counter
}

func (cw countingWriter) Write(p []byte) (int, error) {
	n, err := cw.w.Write(p)
	if n > 0 {
		cw.c.Add(float64(n))
	}
	return n, err
}

func closeWrite(c net.Conn) {
	type closeWriter interface{ CloseWrite() error }
	if cw, ok := c.(closeWriter); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}

// statusRecorder remembers the status code written through it.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 && code >= 200 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

func (s *statusRecorder) code() int {
	if s.status == 0 {
		return http.StatusOK
	}
	return s.status
}

// Unwrap lets http.ResponseController reach Flush and deadlines.
func (s *statusRecorder) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// Flush forwards streaming flushes (gRPC, server-sent events).
func (s *statusRecorder) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// bufferPool recycles the 32 KiB copy buffers of the reverse proxies.
type bufferPool struct{}

var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (bufferPool) Get() []byte  { return *(copyBuffers.Get().(*[]byte)) }
func (bufferPool) Put(b []byte) { copyBuffers.Put(&b) }

// slogErrorLog routes net/http's internal errors to the debug log.
func slogErrorLog(l *slog.Logger) *log.Logger {
	return slog.NewLogLogger(l.Handler(), slog.LevelDebug)
}
