package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/straitmesh/strait/proxy/balance"
)

// fastConn is what the HTTP/1.1 fast path knows of one downstream
// connection, allocated once per connection by h1Server.
type fastConn struct {
	c        net.Conn
	br       *bufio.Reader
	bw       *bufio.Writer
	ctx      context.Context
	tlsState *tls.ConnectionState
	req      h1Head // the request being served (in br)
	resp     h1Head // the response being forwarded (in the upstream's buffer)
}

// fastHandler serves the request parsed in fc.req entirely (its bytes are
// consumed by the caller afterwards) and reports whether the downstream
// connection may carry another request. A handler that declines (handled
// false) has written nothing: the request is served the usual way.
type fastHandler func(fc *fastConn) (handled, keep bool)

// upstreamResult is the outcome of sending the request once.
type upstreamResult struct {
	hc     *h1Conn
	resp   *http.Response // a response outside the fast subset; else its head is in fc.resp
	status int            // of the response, either way
	err    error
}

// exchange sends fc's request (with extra, if not empty, as one more
// field) on a connection of p and reads the response head, skipping
// interim responses. A pooled connection the peer had closed is replaced
// once by a fresh one, as h1Pool.RoundTrip does. dl bounds it all (zero:
// no bound); connections are set to it.
func (p *h1Pool) exchange(fc *fastConn, drop func([]byte) bool, extraName, extraValue string, dl time.Time) upstreamResult {
	h := &fc.req
	msg, _ := fc.br.Peek(h.n + int(max(h.length, 0)))
	head, body := msg[:h.n], msg[h.n:]
	for try := 0; ; try++ {
		var hc *h1Conn
		reused := false
		if try == 0 {
			hc = p.takeIdle()
			reused = hc != nil
		}
		if hc == nil {
			ctx, cancel := context.Background(), context.CancelFunc(func() {})
			if !dl.IsZero() {
				ctx, cancel = context.WithDeadline(ctx, dl)
			}
			var err error
			hc, reused, err = p.get(ctx, try > 0)
			cancel()
			if err != nil {
				return upstreamResult{err: deadlineErr(err)}
			}
		}
		hc.setDeadline(dl)
		whole := hc.bw.Buffered() == 0 && maxRequestHead(h, head, extraName, extraValue)+len(body) <= hc.bw.Available()
		writeRequestHead(hc.bw, h, head, drop, extraName, extraValue)
		hc.bw.Write(body)
		err := hc.flushAwait(whole)
		var resp *http.Response
		if err != nil {
			err = staleIf(err)
		} else {
			resp, err = readResponseHead(hc, fc, idempotentHead(h))
		}
		if err == nil {
			status := fc.resp.status
			if resp != nil {
				status = resp.StatusCode
			}
			return upstreamResult{hc: hc, resp: resp, status: status}
		}
		hc.close()
		if !reused || try > 0 || !errors.Is(err, errStaleConn) {
			return upstreamResult{err: deadlineErr(err)}
		}
	}
}

// deadlineErr reports a connection deadline as the context error the
// net/http path returns for a timed-out request.
func deadlineErr(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w (%w)", context.DeadlineExceeded, err)
	}
	return err
}

// writeRequestHead writes the request line and fields of h (whose bytes
// are head) without hop-by-hop fields, a caller's X-Forwarded-* or those
// drop names, then extra.
func writeRequestHead(w *bufio.Writer, h *h1Head, head []byte, drop func([]byte) bool, extraName, extraValue string) {
	w.Write(head[:len(h.line)+2])
	for _, f := range h.fields {
		if hopByHop(f.name) || forwardedField(f.name) || drop != nil && drop(f.name) {
			continue
		}
		writeField(w, f.name, f.value)
	}
	if h.length < 0 {
		switch string(h.method) {
		case http.MethodPost, http.MethodPut, http.MethodPatch:
			// As net/http sends them: some servers want a length.
			w.WriteString("Content-Length: 0\r\n")
		}
	}
	if extraName != "" {
		w.WriteString(extraName)
		w.WriteString(": ")
		w.WriteString(extraValue)
		w.WriteString("\r\n")
	}
	w.WriteString("\r\n")
}

// maxRequestHead bounds what writeRequestHead writes for h: each field
// it keeps grows by at most the space after its colon.
func maxRequestHead(h *h1Head, head []byte, extraName, extraValue string) int {
	return len(head) + len(h.fields) + len("Content-Length: 0\r\n") + len(extraName) + len(": \r\n") + len(extraValue)
}

// idempotentHead is idempotent for a parsed request.
func idempotentHead(h *h1Head) bool {
	switch string(h.method) {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	for _, f := range h.fields {
		if asciiEqualFold(f.name, "Idempotency-Key") || asciiEqualFold(f.name, "X-Idempotency-Key") {
			return true
		}
	}
	return false
}

// readResponseHead reads the final response head on hc into fc.resp, or,
// for a response outside the fast subset, reads it with http.ReadResponse.
func readResponseHead(hc *h1Conn, fc *fastConn, idempotent bool) (*http.Response, error) {
	// Nothing at all read back on a pooled connection: the peer had
	// closed it. The request went out, though, so it is only sent again if
	// doing so is safe.
	if _, err := hc.br.Peek(1); err != nil {
		if idempotent {
			err = staleIf(err)
		}
		return nil, err
	}
	rh := &fc.resp
	for interim := 0; ; interim++ {
		b, ok := peekHead(hc.br)
		if !ok || !rh.parse(b, false) {
			break
		}
		if rh.status == http.StatusSwitchingProtocols {
			return nil, errors.New("proxy: upstream switched protocols; upgrades are not supported")
		}
		if rh.status >= 200 {
			if !rh.chunked && rh.length < 0 && !bodyless(fc.req.method, rh.status) {
				break // framed by the close: net/http's path re-frames it
			}
			return nil, nil
		}
		if interim >= 5 {
			return nil, errors.New("proxy: too many interim (1xx) responses")
		}
		hc.br.Discard(rh.n) // 100 Continue, 103 Early Hints
	}
	req := &http.Request{Method: string(fc.req.method)}
	for interim := 0; ; interim++ {
		r, err := hc.readResponse(req)
		if err != nil {
			return nil, err
		}
		switch {
		case r.StatusCode == http.StatusSwitchingProtocols:
			return nil, errors.New("proxy: upstream switched protocols; upgrades are not supported")
		case r.StatusCode >= 200:
			return r, nil
		case interim >= 5:
			return nil, errors.New("proxy: too many interim (1xx) responses")
		}
	}
}

// forwardResponse writes the response read by exchange to fc's client:
// its head without hop-by-hop fields or those drop names, then its body as
// framed. It reports whether the upstream connection may be reused and
// whether the client connection may carry another request (keep); an
// error reading the body or writing to the client is returned too.
func forwardResponse(fc *fastConn, r upstreamResult, drop func([]byte) bool) (reusable, keep bool, err error) {
	w := fc.bw
	if r.resp != nil {
		reusable, keep, err = forwardSlowResponse(fc, r.resp, drop)
		if err != nil {
			r.hc.close() // first, so that closing the body does not drain it
		}
		r.resp.Body.Close()
		return reusable, keep, err
	}
	rh := &fc.resp
	w.Write(rh.line)
	w.WriteString("\r\n")
	for _, f := range rh.fields {
		if hopByHop(f.name) || drop != nil && drop(f.name) {
			continue
		}
		writeField(w, f.name, f.value)
	}
	if rh.chunked {
		w.WriteString("Transfer-Encoding: chunked\r\n")
	}
	if fc.req.close {
		w.WriteString("Connection: close\r\n")
	}
	w.WriteString("\r\n")
	r.hc.br.Discard(rh.n)
	switch {
	case bodyless(fc.req.method, rh.status):
	case rh.chunked:
		err = copyChunked(w, r.hc.br)
	default:
		_, err = io.CopyN(w, r.hc.br, rh.length)
	}
	return err == nil && !rh.close, !fc.req.close, err
}

// forwardSlowResponse writes a response read by http.ReadResponse with
// h1Server's response writer (which frames it for the client).
func forwardSlowResponse(fc *fastConn, resp *http.Response, drop func([]byte) bool) (reusable, keep bool, err error) {
	w := fc.responseWriter()
	named := map[string]bool{}
	for _, v := range resp.Header["Connection"] {
		for _, f := range strings.Split(v, ",") {
			if f = strings.TrimSpace(f); f != "" {
				named[http.CanonicalHeaderKey(f)] = true
			}
		}
	}
	for k, vv := range resp.Header {
		if named[k] || hopByHop([]byte(k)) || drop != nil && drop([]byte(k)) {
			continue
		}
		w.header[k] = vv
	}
	if len(resp.Trailer) > 0 {
		keys := make([]string, 0, len(resp.Trailer))
		for k := range resp.Trailer {
			keys = append(keys, k)
		}
		w.header["Trailer"] = []string{strings.Join(keys, ", ")}
	}
	w.WriteHeader(resp.StatusCode)
	if resp.ContentLength < 0 {
		// A stream: what comes goes out at once, as httputil.ReverseProxy
		// flushes responses of unknown length.
		err = copyFlushing(w, resp.Body)
	} else {
		_, err = io.Copy(w, resp.Body)
	}
	if err != nil {
		// The body broke off: the response is not ended as if it were
		// complete; the client's connection ends instead.
		return false, false, err
	}
	for k, vv := range resp.Trailer {
		w.header[http.TrailerPrefix+k] = vv
	}
	w.finish()
	return w.err == nil && !resp.Close, !w.closeAfter, w.err
}

// responseWriter is h1Server's response writer for fc's request, for what
// the fast path answers through net/http's interfaces.
func (fc *fastConn) responseWriter() *h1Response {
	w := &h1Response{bw: fc.bw, header: make(http.Header)}
	w.reset(&http.Request{Method: string(fc.req.method), Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1, Close: fc.req.close})
	return w
}

// copyFlushing copies r to w, flushing after every read.
func copyFlushing(w *h1Response, r io.Reader) error {
	bp := bufferPool{}.Get()
	defer bufferPool{}.Put(bp)
	for {
		n, err := r.Read(bp)
		if n > 0 {
			if _, werr := w.Write(bp[:n]); werr != nil {
				return werr
			}
			w.Flush()
			if w.err != nil {
				return w.err
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// releaseUpstream returns a connection to its pool, or closes it. Its
// deadline stays: the next user sets its own (see h1Conn.setDeadline).
func releaseUpstream(p *h1Pool, hc *h1Conn, reusable bool) {
	if !reusable {
		hc.close()
		return
	}
	p.put(hc)
}

// serveFast serves one request on the fast path (see h1fast.go): the same
// limits, balancing, timeouts, retries, outlier accounting and metrics as
// ServeHTTP and RoundTrip, without net/http's request and header objects.
func (u *upstream) serveFast(fc *fastConn) (handled, keep bool) {
	st := u.state.Load()
	if st == nil {
		return false, false
	}
	start := time.Now()
	code, keep := u.fastRoundTrip(fc, st, start)
	u.o.metrics.observeRequest("outbound", u.selfID(), u.name, code, time.Since(start))
	return true, keep
}

func (u *upstream) fastRoundTrip(fc *fastConn, st *upstreamState, start time.Time) (code int, keep bool) {
	fail := func(code int, msg string) (int, bool) {
		w := fc.responseWriter()
		sidecarError(w, code, msg)
		w.finish()
		return code, !w.closeAfter
	}
	// A connection in use is closed if this panics (h1Server recovers).
	var inUse *h1Conn
	defer func() {
		if inUse != nil {
			inUse.close()
		}
	}()
	if !st.requests.TryAcquire() {
		return fail(http.StatusServiceUnavailable, "overflow: connection limits of "+u.name+" reached")
	}
	defer st.requests.Release()
	st.budget.Request()
	var deadline time.Time
	if d := st.policy.GetRequestTimeout().AsDuration(); d > 0 {
		deadline = start.Add(d)
	}
	retries := st.policy.GetRetries()
	perTry := retries.GetPerTryTimeout().AsDuration()
	var triedBuf [4]string
	tried := triedBuf[:0]
	for attempt := 0; ; attempt++ {
		pick, err := u.lb.Pick(tried...)
		if err != nil {
			return fail(u.errorStatus(err))
		}
		tried = append(tried, pick.Endpoint.Key)
		r, p, cause := u.fastAttempt(fc, st, pick, deadline, perTry)
		inUse = r.hc
		if cause != "" {
			last := attempt >= int(retries.GetAttempts()) || !deadline.IsZero() && !time.Now().Before(deadline)
			if !last && cause != "connect-failure" && !st.budget.TryRetry() {
				u.o.metrics.retries.WithLabelValues(u.name, "budget_exhausted").Inc()
				last = true
			}
			if !last {
				if r.hc != nil {
					r.hc.close() // its response is not read: never reused
					if r.resp != nil {
						r.resp.Body.Close()
					}
				}
				u.o.metrics.retries.WithLabelValues(u.name, "sent").Inc()
				continue
			}
		}
		if r.err != nil {
			return fail(u.errorStatus(r.err))
		}
		r.hc.setDeadline(deadline)
		reusable, keep, err := forwardResponse(fc, r, dropUpstreamError)
		if err != nil {
			// Part of the response may have gone out: the client's
			// connection cannot be trusted to be in step any more.
			u.o.log.Debug("upstream response failed midway", "service", u.name, "err", err)
			keep = false
		}
		inUse = nil
		releaseUpstream(p, r.hc, reusable && err == nil)
		return r.status, keep
	}
}

// fastAttempt sends the request to one endpoint, as attempt does. It
// returns the retry condition that matched ("" if the result is final).
func (u *upstream) fastAttempt(fc *fastConn, st *upstreamState, pick *balance.Pick, deadline time.Time, perTry time.Duration) (upstreamResult, *h1Pool, string) {
	start := time.Now()
	t, err := u.o.transport(pick.Endpoint, st, false)
	if err != nil {
		pick.Done(0, balance.Failure)
		return upstreamResult{err: err}, nil, ""
	}
	p := t.(*h1Pool)
	dl, perTryBinds := deadline, false
	if perTry > 0 && (dl.IsZero() || start.Add(perTry).Before(dl)) {
		dl, perTryBinds = start.Add(perTry), true
	}
	r := p.exchange(fc, nil, "", "", dl)
	latency := time.Since(start)
	if r.err != nil {
		// Decided by the clock, not by the error: a connect timeout is a
		// DeadlineExceeded too, and the endpoint's failure.
		expired := !dl.IsZero() && !start.Add(latency).Before(dl) && errors.Is(r.err, context.DeadlineExceeded)
		timedOut := perTryBinds && expired
		if expired && !perTryBinds {
			pick.Done(latency, balance.LocalError) // the request's own timeout
			return r, p, ""
		}
		pick.Done(latency, balance.Failure)
		cause := classifyError(r.err, timedOut)
		if timedOut {
			r.err = fmt.Errorf("per-try timeout of %s: %w", perTry, context.DeadlineExceeded)
		}
		gatewayish := cause == "connect-failure" || cause == "per-try-timeout"
		if st.retryOn[cause] || (cause == "reset" || gatewayish) && st.retryOn["5xx"] || gatewayish && st.retryOn["gateway-error"] {
			return r, p, cause
		}
		return r, p, ""
	}
	status := r.status
	outcome := balance.Success
	if status >= 500 {
		outcome = balance.Failure
	}
	pick.Done(latency, outcome)
	switch c := status; {
	case c >= 500 && st.retryOn["5xx"]:
		return r, p, "5xx"
	case (c == 502 || c == 503 || c == 504) && st.retryOn["gateway-error"]:
		return r, p, "gateway-error"
	case c == 409 && st.retryOn["retriable-4xx"]:
		return r, p, "retriable-4xx"
	}
	return r, p, ""
}

// dropUpstreamError: only this sidecar speaks in its own header.
func dropUpstreamError(name []byte) bool { return asciiEqualFold(name, HeaderUpstreamError) }

// dropIdentity: identity fields only the sidecar may set.
func dropIdentity(name []byte) bool {
	return asciiEqualFold(name, HeaderXFCC) ||
		len(name) >= len(identityHeaderPrefix) && asciiEqualFold(name[:len(identityHeaderPrefix)], identityHeaderPrefix)
}

// serveFast serves one request to the application on the fast path, as
// ServeHTTP does: the caller's identity fields replaced by the verified
// one.
func (in *inbound) serveFast(fc *fastConn) (handled, keep bool) {
	pc := in.callerOf(fc.ctx, fc.tlsState)
	if pc == nil {
		return false, false
	}
	start := time.Now()
	code := http.StatusBadGateway
	r := in.appH1.exchange(fc, dropIdentity, HeaderXFCC, pc.xfcc[0], time.Time{})
	inUse := r.hc
	defer func() {
		if inUse != nil {
			inUse.close() // it panicked (h1Server recovers)
		}
	}()
	if r.err != nil {
		in.log.Debug("forward to application failed", "err", r.err)
		w := fc.responseWriter()
		w.WriteHeader(http.StatusBadGateway)
		w.finish()
		keep = !w.closeAfter
	} else {
		code = r.status
		var reusable bool
		var err error
		reusable, keep, err = forwardResponse(fc, r, nil)
		if err != nil {
			in.log.Debug("application response failed midway", "err", err)
			keep = false
		}
		inUse = nil
		releaseUpstream(in.appH1, r.hc, reusable && err == nil)
	}
	in.metrics.observeRequest("inbound", pc.idStr, in.service, code, time.Since(start))
	return true, keep
}
