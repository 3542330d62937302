package proxy

import (
	"context"
	"errors"
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
	time.Sleep(50 * time.Millisecond)
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
