package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// newTestPool returns a pool dialing srv and counting dials.
func newTestPool(srv *httptest.Server, maxConns int) (*h1Pool, *atomic.Int32) {
	var dials atomic.Int32
	addr := srv.Listener.Addr().String()
	p := &h1Pool{
		dial: func(ctx context.Context) (net.Conn, error) {
			dials.Add(1)
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		},
		maxIdle: 8, idleTimeout: time.Minute,
	}
	if maxConns > 0 {
		p.sem, p.avail = make(chan struct{}, maxConns), make(chan struct{}, 1)
	}
	return p, &dials
}

func doGet(t *testing.T, p *h1Pool, url string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	resp, err := p.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp.StatusCode, string(b)
}

func TestH1PoolReusesConnections(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello") }))
	defer srv.Close()
	p, dials := newTestPool(srv, 0)
	for i := range 5 {
		if code, body := doGet(t, p, srv.URL); code != 200 || body != "hello" {
			t.Fatalf("request %d: got %d %q, want 200 hello", i, code, body)
		}
	}
	if got := dials.Load(); got != 1 {
		t.Errorf("dials for 5 sequential requests: got %d, want 1", got)
	}
}

func TestH1PoolRetriesStaleConnection(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	defer srv.Close()
	p, dials := newTestPool(srv, 0)
	doGet(t, p, srv.URL)
	srv.CloseClientConnections() // the server drops the idle connection
	time.Sleep(peekAfter + 50*time.Millisecond)
	// A POST on a connection idle long enough to be checked: the dead
	// connection is noticed before the request is sent.
	req, _ := http.NewRequest("POST", srv.URL, strings.NewReader("body"))
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader("body")), nil }
	resp, err := p.RoundTrip(req)
	if err != nil {
		t.Fatalf("request on a connection the server closed: %v, want a transparent retry", err)
	}
	resp.Body.Close()
	if got := dials.Load(); got != 2 {
		t.Errorf("dials: got %d, want 2", got)
	}
}

func TestH1PoolBodyNotReadClosesConnection(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, strings.Repeat("x", 100000))
	}))
	defer srv.Close()
	p, dials := newTestPool(srv, 0)
	req, _ := http.NewRequest("GET", srv.URL, nil)
	resp, err := p.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Read(make([]byte, 10))
	resp.Body.Close() // framing unknown: the connection must not be reused
	doGet(t, p, srv.URL)
	if got := dials.Load(); got != 2 {
		t.Errorf("dials: got %d, want 2 (a half-read connection was reused?)", got)
	}
}

func TestH1PoolSkipsInterimResponses(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		io.WriteString(w, "final")
	}))
	defer srv.Close()
	p, _ := newTestPool(srv, 0)
	if code, body := doGet(t, p, srv.URL); code != 200 || body != "final" {
		t.Errorf("got %d %q, want 200 final", code, body)
	}
}

func TestH1PoolCancellation(t *testing.T) {
	block := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-block }))
	defer srv.Close()
	defer close(block)
	p, _ := newTestPool(srv, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL, nil)
	start := time.Now()
	_, err := p.RoundTrip(req)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("got %v, want the context's deadline", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("cancelled request returned after %s", d)
	}
}

func TestH1PoolConnectionCap(t *testing.T) {
	var inFlight, peak atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := inFlight.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		time.Sleep(20 * time.Millisecond)
		inFlight.Add(-1)
	}))
	defer srv.Close()
	p, dials := newTestPool(srv, 2)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() { defer wg.Done(); doGet(t, p, srv.URL) }()
	}
	wg.Wait()
	if peak.Load() > 2 || dials.Load() > 2 {
		t.Errorf("with a cap of 2: peak concurrency %d, dials %d; want at most 2", peak.Load(), dials.Load())
	}
}

func TestH1PoolPendingBound(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-release }))
	defer srv.Close()
	p, _ := newTestPool(srv, 1)
	p.maxWaiting = 1
	errs := make(chan error, 3)
	for range 3 {
		go func() {
			req, _ := http.NewRequest("GET", srv.URL, nil)
			resp, err := p.RoundTrip(req)
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
			errs <- err
		}()
	}
	// One request holds the only connection, one waits, the third overflows.
	select {
	case err := <-errs:
		if !errors.Is(err, errOverflow) {
			t.Fatalf("first to finish: %v, want overflow", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no request overflowed")
	}
	close(release)
	for range 2 {
		if err := <-errs; err != nil {
			t.Errorf("queued request: %v", err)
		}
	}
}

// rawServer answers each connection with handle, on loopback.
func rawServer(t *testing.T, handle func(c net.Conn, n int)) (string, *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var conns atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n := int(conns.Add(1))
			go handle(c, n)
		}
	}()
	return ln.Addr().String(), &conns
}

func rawPool(addr string) *h1Pool {
	return &h1Pool{dial: func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}, maxIdle: 8, idleTimeout: time.Minute}
}

func readRequest(c net.Conn) {
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err == nil {
		io.Copy(io.Discard, req.Body)
	}
}

// eachRequest reads requests from c, each with its body, and hands them to
// serve with their number on c from 0, until reading fails or serve
// returns false.
func eachRequest(c net.Conn, serve func(req *http.Request, i int) bool) {
	br := bufio.NewReader(c)
	for i := 0; ; i++ {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		io.Copy(io.Discard, req.Body)
		if !serve(req, i) {
			return
		}
	}
}

// A POST that reached the server on a pooled connection, which then closed
// without answering, is not sent again: the server may have acted on it.
func TestH1PoolDoesNotResendNonIdempotent(t *testing.T) {
	var posts atomic.Int32
	addr, _ := rawServer(t, func(c net.Conn, n int) {
		defer c.Close()
		eachRequest(c, func(req *http.Request, _ int) bool {
			if req.Method == "POST" {
				posts.Add(1)
				return false // processed, then gone without an answer
			}
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			return true
		})
	})
	p := rawPool(addr)
	doGet(t, p, "http://"+addr+"/") // leaves a pooled connection
	req, _ := http.NewRequest("POST", "http://"+addr+"/", strings.NewReader("pay"))
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader("pay")), nil }
	if _, err := p.RoundTrip(req); err == nil {
		t.Fatal("POST answered by nobody succeeded")
	}
	if got := posts.Load(); got != 1 {
		t.Errorf("the server received the POST %d times, want 1", got)
	}
}

// Bytes beyond a response are never read as the next caller's response:
// whether they came with it, or later, once the connection was idle (they
// are found before reuse).
func TestH1PoolDoesNotReuseAfterExtraBytes(t *testing.T) {
	for _, late := range []time.Duration{0, 5 * time.Millisecond} {
		t.Run(fmt.Sprintf("%v after the response", late), func(t *testing.T) {
			addr, conns := rawServer(t, func(c net.Conn, n int) {
				defer c.Close()
				eachRequest(c, func(_ *http.Request, i int) bool {
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
					if i == 0 {
						time.Sleep(late)
						io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
					}
					return true
				})
			})
			p := rawPool(addr)
			doGet(t, p, "http://"+addr+"/a")
			time.Sleep(50 * time.Millisecond)
			if _, body := doGet(t, p, "http://"+addr+"/b"); body != "a" {
				t.Fatalf("the second request got %q, want a", body)
			}
			if got := conns.Load(); got != 2 {
				t.Errorf("connections: got %d, want 2 (the first one must not be reused)", got)
			}
		})
	}
}

// An unexpected 101 is an error, and its connection is not pooled.
func TestH1PoolRefusesSwitchingProtocols(t *testing.T) {
	addr, _ := rawServer(t, func(c net.Conn, n int) {
		defer c.Close()
		readRequest(c)
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: other\r\nConnection: Upgrade\r\n\r\n")
		time.Sleep(time.Second)
	})
	p := rawPool(addr)
	req, _ := http.NewRequest("GET", "http://"+addr+"/", nil)
	if _, err := p.RoundTrip(req); err == nil {
		t.Fatal("a 101 response was returned as a normal response")
	}
	if n := len(p.idle); n != 0 {
		t.Errorf("idle connections after a 101: %d, want 0", n)
	}
}

// After the server dropped all idle connections, requests still succeed:
// the retry dials afresh instead of taking another dead one.
func TestH1PoolRetryDialsFresh(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	defer srv.Close()
	p, _ := newTestPool(srv, 0)
	var wg sync.WaitGroup
	for range 4 { // four pooled connections
		wg.Add(1)
		go func() { defer wg.Done(); doGet(t, p, srv.URL) }()
	}
	wg.Wait()
	srv.CloseClientConnections()
	time.Sleep(50 * time.Millisecond)
	for i := range 4 {
		req, _ := http.NewRequest("GET", srv.URL, nil)
		resp, err := p.RoundTrip(req)
		if err != nil {
			t.Fatalf("request %d after the server dropped idle connections: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}
