package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// Data-path behaviour a review found wrong (2026-11-24), each test failing
// before its fix.

// countingListener counts the connections it accepts.
type countingListener struct {
	net.Listener
	n *atomic.Int32
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// pairEnv is a frontend and a backend sidecar, without a control plane.
type pairEnv struct {
	front, back *Sidecar
	u           *upstream
	upAddr      string // frontend's local listener for backend
	inAccepts   *atomic.Int32
	appAccepts  *atomic.Int32
	cancel      context.CancelFunc
	inAddr      string
	ca          *catest.CA
}

// newPairEnv starts an application (handler, if not nil) behind a backend
// sidecar's inbound, and a frontend sidecar whose local listener for
// backend (upAddr) reaches it with pol; inAccepts counts the connections
// the backend sidecar accepted.
func newPairEnv(t *testing.T, handler http.Handler, pol *controlplanev1.TrafficPolicy, proto controlplanev1.Protocol) *pairEnv {
	t.Helper()
	const td = "strait.example"
	c := catest.New(t, td)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var appAcc atomic.Int32
	if handler != nil {
		app := &http.Server{Handler: handler}
		go app.Serve(countingListener{appLn, &appAcc})
		t.Cleanup(func() { app.Close() })
	}
	back := newCPlessSidecar(t, c, "backend", appLn.Addr().String())
	front := newCPlessSidecar(t, c, "frontend", appLn.Addr().String())
	back.in.setPolicy(compileAuthorization(&controlplanev1.Authorization{}))
	back.in.selfID.Store("spiffe://" + td + "/ns/default/sa/backend")
	inLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var inAcc atomic.Int32
	go back.in.run(ctx, countingListener{inLn, &inAcc})
	u, err := front.out.addUpstream("backend")
	if err != nil {
		t.Fatal(err)
	}
	if pol == nil {
		pol = &controlplanev1.TrafficPolicy{}
	}
	front.out.apply([]*controlplanev1.Service{{Name: "backend", Namespace: "default", Protocol: proto, Policy: pol, Endpoints: []*controlplanev1.Endpoint{
		{Instance: "backend-0", Address: inLn.Addr().String(), SpiffeId: "spiffe://" + td + "/ns/default/sa/backend", Health: controlplanev1.Health_HEALTH_HEALTHY},
	}}})
	upLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go u.run(ctx, upLn)
	return &pairEnv{front: front, back: back, u: u, upAddr: upLn.Addr().String(), inAccepts: &inAcc, appAccepts: &appAcc, cancel: cancel, inAddr: inLn.Addr().String(), ca: c}
}

func durp(d time.Duration) *durationpb.Duration { return durationpb.New(d) }

// rawClient speaks HTTP/1.1 by hand on one connection.
type rawClient struct {
	c  net.Conn
	br *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawClient {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &rawClient{c: c, br: bufio.NewReader(c)}
}

func (rc *rawClient) do(t *testing.T, raw string) (*http.Response, string) {
	t.Helper()
	rc.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(rc.c, raw); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(rc.br, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

// blackhole returns a loopback address whose accept queue is full: a
// connect to it hangs until the dialer's timeout.
func blackhole(t *testing.T) string {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "bh")
	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	addr := ln.Addr().String()
	for i := 0; i < 8; i++ { // fill the queue
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err != nil {
			break
		}
		t.Cleanup(func() { c.Close() })
	}
	if c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond); err == nil {
		c.Close()
		t.Skip("could not make a blackholed address")
	}
	return addr
}

const pairBackendID = "spiffe://strait.example/ns/default/sa/backend"

func okHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
}

// The paths a request can take through the frontend sidecar: the fast
// path, and net/http's (a Connection field naming another field is outside
// the fast path's subset).
var pairPaths = []struct{ name, req string }{
	{"fast", "GET / HTTP/1.1\r\nHost: backend\r\n\r\n"},
	{"net/http", "GET / HTTP/1.1\r\nHost: backend\r\nConnection: keep-alive, X-Other\r\n\r\n"},
}

// With a request timeout, the deadline a request left on its pooled
// connection to the backend sidecar did not spoil the connection once it
// passed: the look at its socket before reuse failed on the deadline, and
// every call after a pause paid a new mTLS handshake.
func TestPooledConnectionOutlivesItsRequestDeadline(t *testing.T) {
	env := newPairEnv(t, okHandler(), &controlplanev1.TrafficPolicy{RequestTimeout: durp(200 * time.Millisecond)}, 0)
	cl := dialRaw(t, env.upAddr)
	for i := range 3 {
		if i > 0 {
			time.Sleep(300 * time.Millisecond) // past the last request's deadline
		}
		if resp, body := cl.do(t, pairPaths[0].req); resp.StatusCode != 200 || body != "ok" {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, body)
		}
	}
	if n := env.inAccepts.Load(); n != 1 {
		t.Errorf("the backend sidecar accepted %d connections for 3 calls on one, want 1", n)
	}
}

// An endpoint whose connect times out (a full accept queue) is a connect
// failure on both paths: retried on another endpoint under retry_on
// connect-failure, and counted by outlier detection. The fast path took
// the connect timeout for the request's own timeout: 504, no retry, no
// ejection.
func TestConnectTimeoutIsAConnectFailure(t *testing.T) {
	for _, path := range pairPaths {
		t.Run(path.name, func(t *testing.T) {
			env := newPairEnv(t, okHandler(), nil, 0)
			pol := &controlplanev1.TrafficPolicy{ConnectTimeout: durp(150 * time.Millisecond), LoadBalancer: controlplanev1.LoadBalancer_LOAD_BALANCER_ROUND_ROBIN,
				Retries:          &controlplanev1.RetryPolicy{Attempts: 1, RetryOn: []string{"connect-failure"}},
				OutlierDetection: &controlplanev1.OutlierDetection{ConsecutiveErrors: 1, BaseEjectionTime: durp(time.Minute), MaxEjectionPercent: 50}}
			env.front.out.apply([]*controlplanev1.Service{{Name: "backend", Namespace: "default", Policy: pol, Endpoints: []*controlplanev1.Endpoint{
				{Instance: "dead", Address: blackhole(t), SpiffeId: pairBackendID, Health: controlplanev1.Health_HEALTH_HEALTHY},
				{Instance: "live", Address: env.inAddr, SpiffeId: pairBackendID, Health: controlplanev1.Health_HEALTH_HEALTHY},
			}}})
			cl := dialRaw(t, env.upAddr)
			for i := range 4 {
				if resp, _ := cl.do(t, path.req); resp.StatusCode != 200 {
					t.Errorf("request %d: %d %q, want 200 from the live endpoint", i, resp.StatusCode, resp.Header.Get(HeaderUpstreamError))
				}
			}
			for _, st := range env.u.lb.Stats() {
				if st.Key == "dead" && !st.Ejected {
					t.Error("the endpoint whose connects time out is not ejected")
				}
			}
		})
	}
}

// An endpoint that accepts TCP but never finishes the mTLS handshake (a
// hung sidecar) is a connect failure too, retried elsewhere; it was a
// "reset", or the request's own timeout, and answered 504.
func TestHandshakeTimeoutIsAConnectFailure(t *testing.T) {
	env := newPairEnv(t, okHandler(), nil, 0)
	silent, _ := rawServer(t, func(c net.Conn, n int) { time.Sleep(3 * time.Second); c.Close() })
	pol := &controlplanev1.TrafficPolicy{ConnectTimeout: durp(150 * time.Millisecond), LoadBalancer: controlplanev1.LoadBalancer_LOAD_BALANCER_ROUND_ROBIN,
		Retries: &controlplanev1.RetryPolicy{Attempts: 1, RetryOn: []string{"connect-failure"}}}
	env.front.out.apply([]*controlplanev1.Service{{Name: "backend", Namespace: "default", Policy: pol, Endpoints: []*controlplanev1.Endpoint{
		{Instance: "hung", Address: silent, SpiffeId: pairBackendID, Health: controlplanev1.Health_HEALTH_HEALTHY},
		{Instance: "live", Address: env.inAddr, SpiffeId: pairBackendID, Health: controlplanev1.Health_HEALTH_HEALTHY},
	}}})
	for _, path := range pairPaths {
		cl := dialRaw(t, env.upAddr)
		for i := range 4 {
			if resp, _ := cl.do(t, path.req); resp.StatusCode != 200 {
				t.Errorf("%s path, request %d: %d %q, want 200 from the live endpoint", path.name, i, resp.StatusCode, resp.Header.Get(HeaderUpstreamError))
			}
		}
	}
}

// A request whose body stalls ends at the request timeout and frees its
// request slot (max_requests 1 here): another request then goes through.
// Reading the body had no deadline, streamed or buffered for a retry.
func TestStalledBodyEndsAtTheRequestTimeout(t *testing.T) {
	for _, c := range []struct {
		name    string
		retries uint32
		length  int // beyond the fast path's buffer; under maxRetryBody to be buffered
		want    int
	}{
		{"streamed", 0, 100000, http.StatusGatewayTimeout},
		{"buffered-for-retry", 1, 50000, http.StatusRequestTimeout},
	} {
		t.Run(c.name, func(t *testing.T) {
			pol := &controlplanev1.TrafficPolicy{RequestTimeout: durp(200 * time.Millisecond),
				ConnectionLimits: &controlplanev1.ConnectionLimits{MaxRequests: 1},
				Retries:          &controlplanev1.RetryPolicy{Attempts: c.retries}}
			env := newPairEnv(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body)
				io.WriteString(w, "ok")
			}), pol, 0)
			stall, err := net.Dial("tcp", env.upAddr)
			if err != nil {
				t.Fatal(err)
			}
			defer stall.Close()
			fmt.Fprintf(stall, "POST / HTTP/1.1\r\nHost: backend\r\nContent-Length: %d\r\n\r\n0123456789", c.length)
			stall.SetReadDeadline(time.Now().Add(5 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(stall), nil)
			if err != nil {
				t.Fatalf("the stalled request got no answer: %v", err)
			}
			resp.Body.Close()
			if resp.StatusCode != c.want {
				t.Errorf("the stalled request: %d %q, want %d", resp.StatusCode, resp.Header.Get(HeaderUpstreamError), c.want)
			}
			if resp, body := dialRaw(t, env.upAddr).do(t, pairPaths[0].req); resp.StatusCode != 200 {
				t.Errorf("the next request: %d %q %q: the stalled one still holds the only request slot", resp.StatusCode, body, resp.Header.Get(HeaderUpstreamError))
			}
		})
	}
}

// Connections idle past the pool's idle timeout are closed even when no
// request comes to take them: after a burst, the pool (newest first) would
// otherwise never reach the older ones.
func TestIdleConnectionsExpire(t *testing.T) {
	var open atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(20 * time.Millisecond)
		io.WriteString(w, "ok")
	}))
	srv.Config.ConnState = func(c net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			open.Add(1)
		case http.StateClosed, http.StateHijacked:
			open.Add(-1)
		}
	}
	srv.Start()
	defer srv.Close()
	p, _ := newTestPool(srv, 0)
	p.idleTimeout = 100 * time.Millisecond
	var wg sync.WaitGroup
	for range 6 { // a burst: six connections
		wg.Add(1)
		go func() { defer wg.Done(); doGet(t, p, srv.URL) }()
	}
	wg.Wait()
	for range 10 { // then light traffic, on one of them
		time.Sleep(10 * time.Millisecond)
		doGet(t, p, srv.URL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for open.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := open.Load(); n > 0 {
		t.Errorf("%d connections still open, idle far past the pool's idle timeout", n)
	}
}
