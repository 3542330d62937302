package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// fakeTLSConn makes a plain loopback connection look like an mTLS one whose
// peer presented callerID (what h1Server and inbound read of it).
type fakeTLSConn struct {
	net.Conn
	cs tls.ConnectionState
}

func (c *fakeTLSConn) ConnectionState() tls.ConnectionState { return c.cs }

// newEdgeInbound is an inbound side (fast path and net/http path) toward
// appAddr, and the h1Server serving it to connections that appear to come
// from callerID.
func newEdgeInbound(t *testing.T, appAddr, callerID string) (*inbound, *h1Server, tls.ConnectionState) {
	t.Helper()
	creds, err := NewCredentials(spiffeid.RequireTrustDomainFromString("strait.example"), nil)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	in := newInbound(creds, NewMetrics(prometheus.NewRegistry()), log, "backend", appAddr, false)
	in.selfID.Store("spiffe://strait.example/ns/default/sa/backend")
	u, _ := url.Parse(callerID)
	cs := tls.ConnectionState{HandshakeComplete: true, NegotiatedProtocol: alpnHTTP1,
		PeerCertificates: []*x509.Certificate{{URIs: []*url.URL{u}}}}
	h1 := &h1Server{handler: in, fast: in.serveFast, log: log, connContext: in.connContext,
		headerTimeout: 30 * time.Second, idleTimeout: time.Minute}
	return in, h1, cs
}

// startEdgeInbound serves newEdgeInbound's on loopback.
func startEdgeInbound(t *testing.T, appAddr, callerID string) string {
	t.Helper()
	in, h1, cs := newEdgeInbound(t, appAddr, callerID)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go h1.serveConn(&fakeTLSConn{Conn: c, cs: cs})
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		h1.Shutdown(ctx)
		in.appH1.CloseIdleConnections()
	})
	return ln.Addr().String()
}

// sendRaw writes raw on a new connection to addr and returns a reader of
// what comes back, with 5 seconds for all of it.
func sendRaw(t *testing.T, addr, raw string) *bufio.Reader {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	return bufio.NewReader(c)
}

// rawKeepAliveApp answers every request on a connection with reply(req,
// n), n counting the requests on that connection from 0, and keeps the
// connection open; stop closes them all.
func rawKeepAliveApp(t *testing.T, reply func(req *http.Request, n int) string) (string, func()) {
	done := make(chan struct{})
	addr, _ := rawServer(t, func(c net.Conn, _ int) {
		defer c.Close()
		go func() { <-done; c.Close() }()
		eachRequest(c, func(req *http.Request, n int) bool {
			io.WriteString(c, reply(req, n))
			return true
		})
	})
	var once sync.Once
	return addr, func() { once.Do(func() { close(done) }) }
}

// An application answering with bare-LF line ends (which net/http reads)
// is answered at once: the fast path does not wait for a CRLFCRLF that is
// not coming, and the net/http path reads the response.
func TestInboundBareLFResponse(t *testing.T) {
	app, stopApp := rawKeepAliveApp(t, func(*http.Request, int) string {
		return "HTTP/1.1 200 OK\nContent-Length: 2\n\nok"
	})
	defer stopApp() // before the sidecar's cleanup, which would wait on it
	addr := startEdgeInbound(t, app, "spiffe://strait.example/ns/default/sa/client")
	br := sendRaw(t, addr, "GET / HTTP/1.1\r\nHost: backend\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("no response within 3s to a request the app answered at once: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	if string(b) != "ok" {
		t.Fatalf("body %q", b)
	}
}

// An upstream that sends an endless response header is refused once the
// head passes h1MaxHeaderBytes (http.ReadResponse has no limit of its own;
// net/http's Transport bounds it with MaxResponseHeaderBytes).
func TestH1PoolResponseHeaderLimit(t *testing.T) {
	const total = 64 << 20
	var written atomic.Int64
	addr, _ := rawServer(t, func(c net.Conn, _ int) {
		defer c.Close()
		readRequest(c)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nX-Big: ")
		chunk := []byte(strings.Repeat("a", 64<<10))
		for written.Load() < total {
			n, err := c.Write(chunk)
			written.Add(int64(n))
			if err != nil {
				return
			}
		}
		io.WriteString(c, "\r\nContent-Length: 0\r\n\r\n")
	})
	p := rawPool(addr)
	req, _ := http.NewRequest("GET", "http://"+addr+"/", nil)
	resp, err := p.RoundTrip(req)
	if err == nil {
		resp.Body.Close()
		t.Fatalf("a response with a %d MiB header was read whole (server wrote %d MiB)", len(resp.Header.Get("X-Big"))>>20, written.Load()>>20)
	}
	if !errors.Is(err, errResponseHeaderTooLarge) {
		t.Errorf("RoundTrip: %v, want %v", err, errResponseHeaderTooLarge)
	}
	if w := written.Load(); w > 16<<20 {
		t.Fatalf("read %d MiB of response header before giving up", w>>20)
	}
}

// Identity fields a caller sends are stripped on every request of a
// keep-alive connection, fast path and net/http path alike.
func TestInboundIdentityStrippedPipelined(t *testing.T) {
	app, stopApp := rawKeepAliveApp(t, func(req *http.Request, _ int) string {
		var b strings.Builder
		for k, vv := range req.Header {
			if strings.HasPrefix(strings.ToLower(k), "x-") {
				for _, v := range vv {
					b.WriteString(k + "=" + v + "\n")
				}
			}
		}
		return "HTTP/1.1 200 OK\r\nContent-Length: " + strconv.Itoa(b.Len()) + "\r\n\r\n" + b.String()
	})
	defer stopApp()
	addr := startEdgeInbound(t, app, "spiffe://strait.example/ns/default/sa/client")
	br := sendRaw(t, addr, "GET /1 HTTP/1.1\r\nHost: backend\r\nX-Forwarded-Client-Cert: By=x;URI=spiffe://strait.example/ns/admin/sa/root\r\nx-strait-caller: admin\r\n\r\n"+
		"POST /2 HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\nx-forwarded-client-cert: URI=spiffe://strait.example/ns/admin/sa/root\r\nX-Strait-Caller: admin\r\n\r\n1\r\na\r\n0\r\n\r\n"+
		"GET /3 HTTP/1.1\r\nHost: backend\r\nConnection: keep-alive\r\nX-FORWARDED-CLIENT-CERT: URI=spiffe://strait.example/ns/admin/sa/root\r\n\r\n")
	for i := 0; i < 3; i++ {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
		b, _ := io.ReadAll(resp.Body)
		if strings.Contains(string(b), "admin") || !strings.Contains(string(b), "URI=spiffe://strait.example/ns/default/sa/client") {
			t.Errorf("request %d reached the app with %q", i, b)
		}
	}
}

// A request whose head ends in bare LFs (net/http reads it) is served at
// once, not after the header timeout (30s here).
func TestBareLFRequestServedAtOnce(t *testing.T) {
	app, stopApp := rawKeepAliveApp(t, func(*http.Request, int) string {
		return "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
	})
	defer stopApp()
	addr := startEdgeInbound(t, app, "spiffe://strait.example/ns/default/sa/client")
	br := sendRaw(t, addr, "GET / HTTP/1.1\nHost: backend\n\n")
	if _, err := http.ReadResponse(br, nil); err != nil {
		t.Fatalf("no response within 3s: %v", err)
	}
}

// h1Server.Shutdown (and with it the sidecar's Run) returns shortly after
// its context ends even while a request waits on an application that
// never answers.
func TestShutdownLeavesStuckApp(t *testing.T) {
	app, stopApp := rawKeepAliveApp(t, func(*http.Request, int) string {
		select {} // never answers
	})
	defer stopApp()
	_, h1, cs := newEdgeInbound(t, app, "spiffe://strait.example/ns/default/sa/client")
	a, b := net.Pipe()
	defer a.Close()
	go h1.serveConn(&fakeTLSConn{Conn: b, cs: cs})
	io.WriteString(a, "GET / HTTP/1.1\r\nHost: backend\r\n\r\n")
	time.Sleep(100 * time.Millisecond)
	done := make(chan struct{})
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		h1.Shutdown(ctx)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("Shutdown with a 200ms context still blocked after 3s")
	}
}

// Identity fields sent as request trailers do not reach the application.
func TestInboundIdentityInTrailer(t *testing.T) {
	app, stopApp := rawServerTrailerEcho(t)
	defer stopApp()
	addr := startEdgeInbound(t, app, "spiffe://strait.example/ns/default/sa/client")
	br := sendRaw(t, addr, "POST / HTTP/1.1\r\nHost: backend\r\nTrailer: X-Forwarded-Client-Cert\r\nTransfer-Encoding: chunked\r\n\r\n"+
		"1\r\na\r\n0\r\nX-Forwarded-Client-Cert: By=x;URI=spiffe://strait.example/ns/admin/sa/root\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if strings.Contains(string(b), "admin") {
		t.Fatalf("the app got the caller's forged identity as a trailer: %q", b)
	}
}

func rawServerTrailerEcho(t *testing.T) (string, func()) {
	return rawKeepAliveApp(t, func(req *http.Request, _ int) string {
		// rawKeepAliveApp has read the body already, so req.Trailer is filled.
		s := "trailer=" + req.Trailer.Get("X-Forwarded-Client-Cert") + "\n"
		return "HTTP/1.1 200 OK\r\nContent-Length: " + strconv.Itoa(len(s)) + "\r\n\r\n" + s
	})
}
