package proxy

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// armedPair returns a pool connection armed as toward a sidecar (mTLS over
// loopback TCP, through a pooledConn as dialPooled makes them) and hands
// the server's side of it to serve.
func armedPair(t *testing.T, serve func(c *tls.Conn)) *h1Conn {
	t.Helper()
	cert, _ := svidCreds(t, "spiffe://strait.example/ns/default/sa/backend").Certificate()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			return
		}
		srv := tls.Server(raw, &tls.Config{Certificates: []tls.Certificate{*cert}})
		if srv.Handshake() != nil {
			raw.Close()
			return
		}
		serve(srv)
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(&pooledConn{Conn: raw, o: &outbound{}}, &tls.Config{InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tc.Close() })
	hc := newH1Conn(tc, nil)
	hc.armWait()
	if hc.raw == nil {
		t.Fatal("a TLS connection over TCP was not armed")
	}
	hc.setDeadline(time.Now().Add(10 * time.Second)) // a bound on a hang, not on the test
	return hc
}

// The armed wait sees every response of a keep-alive exchange, however
// quickly the server answers.
func TestArmedWaitSeesEachResponse(t *testing.T) {
	hc := armedPair(t, func(c *tls.Conn) {
		defer c.Close()
		eachRequest(c, func(req *http.Request, i int) bool {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			return true
		})
	})
	for i := range 200 {
		hc.bw.WriteString("GET / HTTP/1.1\r\nHost: backend\r\n\r\n")
		if err := hc.flushAwait(true); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		resp, err := http.ReadResponse(hc.br, nil)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		if string(body) != "ok" {
			t.Fatalf("request %d: body %q", i, body)
		}
	}
}

// A sidecar that closed the connection before the request went out (the
// close arrived before the wait was armed) answers the request with a
// reset, which ends the wait: the request fails as stale at once rather
// than waiting out the deadline.
func TestArmedWaitEndsOnAClosedPeer(t *testing.T) {
	closed := make(chan struct{})
	hc := armedPair(t, func(c *tls.Conn) {
		c.Close()
		close(closed)
	})
	<-closed
	time.Sleep(50 * time.Millisecond) // the close reaches the client's socket
	start := time.Now()
	hc.bw.WriteString("GET / HTTP/1.1\r\nHost: backend\r\n\r\n")
	err := hc.flushAwait(true)
	if err == nil {
		_, err = hc.br.Peek(1)
	}
	if err == nil || !errors.Is(staleIf(err), errStaleConn) {
		t.Fatalf("after the peer closed: %v, want a stale connection", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %v: the wait did not end on the close", d)
	}
}

// A sidecar that never answers: the armed wait ends at the connection's
// deadline, and the read after it reports the timeout.
func TestArmedWaitKeepsTheDeadline(t *testing.T) {
	hc := armedPair(t, func(c *tls.Conn) {
		defer c.Close()
		io.Copy(io.Discard, c)
	})
	hc.setDeadline(time.Now().Add(200 * time.Millisecond))
	hc.bw.WriteString("GET / HTTP/1.1\r\nHost: backend\r\n\r\n")
	err := hc.flushAwait(true)
	if err == nil {
		_, err = hc.br.Peek(1)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("a request never answered: %v, want a timeout", err)
	}
}

// A pooled connection toward a sidecar (TLS over a pooledConn) that the
// sidecar closed is seen as closed once it has been idle for peekAfter:
// the look at the socket reaches through the tracking layer, so a POST is
// not sent on it blind (it would fail, not being safe to send again).
func TestPooledSidecarConnectionIsPeeked(t *testing.T) {
	closeNow, closed := make(chan struct{}), make(chan struct{})
	hc := armedPair(t, func(c *tls.Conn) {
		<-closeNow
		c.Close()
		close(closed)
	})
	if _, ok := peekIdle(hc.c); !ok {
		t.Fatal("peekIdle cannot look at the socket under a pooled TLS connection")
	}
	if !hc.usable(10 * peekAfter) {
		t.Fatal("an open pooled connection was judged closed")
	}
	close(closeNow)
	<-closed
	time.Sleep(50 * time.Millisecond) // the close reaches the client's socket
	if hc.usable(10 * peekAfter) {
		t.Error("a pooled connection the sidecar closed was judged usable")
	}
}

// maxRequestHead bounds what writeRequestHead writes, whatever the spacing
// of the fields it rewrites: flushAwait arms only when the whole request
// fits in the write buffer, and a wrong bound would let part of it go out
// before the wait is armed (a response to that part would be missed).
func TestMaxRequestHeadBoundsTheRewrite(t *testing.T) {
	var b strings.Builder
	b.WriteString("POST /p HTTP/1.1\r\nHost:backend\r\n")
	for i := range h1FastMaxFields - 2 {
		fmt.Fprintf(&b, "X-F%d:v\r\n", i)
	}
	b.WriteString("\r\n")
	for _, head := range []string{b.String(), "GET / HTTP/1.1\r\nHost: backend\r\n\r\n", "POST / HTTP/1.1\r\nHost:b\r\nX:1\r\n\r\n"} {
		var h h1Head
		if !h.parse([]byte(head), true) {
			t.Fatalf("the fast path refuses %q", head)
		}
		var out bytes.Buffer
		w := bufio.NewWriterSize(&out, 64<<10)
		writeRequestHead(w, &h, []byte(head), nil, HeaderXFCC, "By=spiffe://strait.example/ns/default/sa/backend")
		w.Flush()
		if bound := maxRequestHead(&h, []byte(head), HeaderXFCC, "By=spiffe://strait.example/ns/default/sa/backend"); out.Len() > bound {
			t.Errorf("wrote %d bytes for a head of %d, over the bound %d", out.Len(), len(head), bound)
		}
	}
}

// A connection closed before the request went out fails the flush, as a
// plain flush would, so that the request is retried on a fresh connection
// whatever its method.
func TestArmedWaitOnAClosedConnectionFailsTheFlush(t *testing.T) {
	hc := armedPair(t, func(c *tls.Conn) { io.Copy(io.Discard, c) })
	socketUnder(hc.c).Close()
	hc.bw.WriteString("POST / HTTP/1.1\r\nHost: backend\r\nContent-Length: 0\r\n\r\n")
	err := hc.flushAwait(true)
	if !errors.Is(staleIf(err), errStaleConn) {
		t.Fatalf("flush on a closed connection: %v, want a stale connection", err)
	}
}
