package gateway

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	"github.com/straitmesh/strait/gateway/tunnel"
	"github.com/straitmesh/strait/proxy"
)

const testTD = "strait.example"

var _ Credentials = (*proxy.Credentials)(nil)

// fakeCatalog is an in-memory Catalog.
type fakeCatalog struct {
	mu        sync.Mutex
	peers     map[string]Peer
	exports   map[string]map[string]bool // ns/svc -> peers it is exported to
	endpoints map[string][]string        // ns/svc:port -> addresses
	imports   map[string]bool            // peer/ns/svc
	calls     int
}

func newCatalog() *fakeCatalog {
	return &fakeCatalog{peers: map[string]Peer{}, exports: map[string]map[string]bool{}, endpoints: map[string][]string{}, imports: map[string]bool{}}
}

func (c *fakeCatalog) Peer(cluster string) (Peer, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls++
	p, ok := c.peers[cluster]
	return p, ok
}

func (c *fakeCatalog) LocalEndpoints(fromPeer, ns, svc string, port uint16) ([]string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.exports[ns+"/"+svc][fromPeer] {
		return nil, fmt.Errorf("%s/%s for %s: %w", ns, svc, fromPeer, ErrNotExported)
	}
	eps := c.endpoints[ns+"/"+svc+":"+strconv.Itoa(int(port))]
	if len(eps) == 0 {
		return nil, ErrNoEndpoints
	}
	return append([]string(nil), eps...), nil
}

func (c *fakeCatalog) Imported(peer, ns, svc string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.imports[peer+"/"+ns+"/"+svc] {
		return ErrNotImported
	}
	return nil
}

func (c *fakeCatalog) link(cluster string, addrs ...string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.peers[cluster] = Peer{Cluster: cluster, Addrs: addrs}
}

func (c *fakeCatalog) unlink(cluster string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.peers, cluster)
}

func (c *fakeCatalog) export(ns, svc string, port uint16, to []string, eps ...string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := map[string]bool{}
	for _, p := range to {
		m[p] = true
	}
	c.exports[ns+"/"+svc] = m
	c.endpoints[ns+"/"+svc+":"+strconv.Itoa(int(port))] = eps
}

func (c *fakeCatalog) importFrom(peer, ns, svc string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.imports[peer+"/"+ns+"/"+svc] = true
}

func testLogger(t testing.TB) *slog.Logger {
	if testing.Verbose() || os.Getenv("STRAIT_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.DiscardHandler)
}

// newCreds returns credentials holding an SVID for id from ca and bundle b
// (ca's own bundle if nil).
func newCreds(t testing.TB, ca *catest.CA, id string, b *bundle.Bundle) *proxy.Credentials {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString(ca.Authority.TrustDomain().Name())
	c, err := proxy.NewCredentials(td, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetSVID(ca.SVID(t, id, time.Hour)); err != nil {
		t.Fatal(err)
	}
	if b == nil {
		b = ca.Bundle()
	}
	if _, err := c.SetBundle(b); err != nil {
		t.Fatal(err)
	}
	return c
}

func gatewayID(cluster string) string {
	return "spiffe://" + testTD + "/cluster/" + cluster + "/gateway"
}

func workloadID(ns, sa string) string { return "spiffe://" + testTD + "/ns/" + ns + "/sa/" + sa }

// testGateway is a running Gateway with its fakes.
type testGateway struct {
	*Gateway
	cluster   string
	creds     *proxy.Credentials
	cat       *fakeCatalog
	reg       *prometheus.Registry
	peerAddr  string
	entryAddr string
	stop      func()      // stops it gracefully and waits
	crashed   atomic.Bool // Run may fail: its socket was closed under it
}

type gwOptions struct {
	ca         *catest.CA
	bundle     *bundle.Bundle
	creds      *proxy.Credentials
	cat        *fakeCatalog
	catalog    Catalog // what the gateway is given, if not cat (a wrapper of cat)
	limits     Limits
	peerListen string
	resetKey   *quic.StatelessResetKey
	control    ControlHandler
	join       JoinHandler
}

func startGateway(t *testing.T, cluster string, o gwOptions) *testGateway {
	t.Helper()
	if o.creds == nil {
		o.creds = newCreds(t, o.ca, gatewayID(cluster), o.bundle)
	}
	if o.cat == nil {
		o.cat = newCatalog()
	}
	if o.peerListen == "" {
		o.peerListen = "127.0.0.1:0"
	}
	// Generous timeouts unless a test sets its own: the suite runs under
	// -race on small, busy machines.
	if o.limits.HandshakeTimeout == 0 {
		o.limits.HandshakeTimeout = 30 * time.Second
	}
	if o.limits.DialTimeout == 0 {
		o.limits.DialTimeout = 20 * time.Second
	}
	if o.limits.HeaderTimeout == 0 {
		o.limits.HeaderTimeout = 20 * time.Second
	}
	var catalog Catalog = o.cat
	if o.catalog != nil {
		catalog = o.catalog
	}
	reg := prometheus.NewRegistry()
	g, err := New(Config{
		Cluster:           cluster,
		TrustDomain:       spiffeid.RequireTrustDomainFromString(testTD),
		Credentials:       o.creds,
		PeerListen:        o.peerListen,
		EntryListen:       "127.0.0.1:0",
		Catalog:           catalog,
		Limits:            o.limits,
		Logger:            testLogger(t).With("gateway", cluster),
		Registerer:        reg,
		StatelessResetKey: o.resetKey,
		ControlHandler:    o.control,
		JoinHandler:       o.join,
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	select {
	case <-g.Ready():
	case err := <-done:
		cancel()
		t.Fatalf("Run: %v", err)
	case <-time.After(5 * time.Second):
		cancel()
		t.Fatal("gateway not ready after 5s")
	}
	var once sync.Once
	tg := &testGateway{Gateway: g, cluster: cluster, creds: o.creds, cat: o.cat, reg: reg}
	tg.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil && !tg.crashed.Load() {
					t.Errorf("Run returned %v, want nil", err)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("gateway %s did not stop within 10s", cluster)
			}
		})
	}
	t.Cleanup(tg.stop)
	peer, entry := g.Addrs()
	tg.peerAddr, tg.entryAddr = peer.String(), entry.String()
	return tg
}

// pair is two linked gateways, east and west, of one CA, with west
// exporting default/echo:7 to east and east importing it.
type pair struct {
	ca         *catest.CA
	east, west *testGateway
	echo       *echoServer
	sidecar    *proxy.Credentials // a workload of east
}

func echoHeader() tunnel.Header {
	return tunnel.Header{Kind: tunnel.KindData, Cluster: "west", Namespace: "default", Service: "echo", Port: 7}
}

func newPair(t *testing.T, eastOpts, westOpts gwOptions) *pair {
	t.Helper()
	ca := catest.New(t, testTD)
	if eastOpts.ca == nil {
		eastOpts.ca = ca
	}
	if westOpts.ca == nil {
		westOpts.ca = ca
	}
	east := startGateway(t, "east", eastOpts)
	west := startGateway(t, "west", westOpts)
	east.cat.link("west", west.peerAddr)
	west.cat.link("east", east.peerAddr)
	echo := newEchoServer(t)
	west.cat.export("default", "echo", 7, []string{"east"}, echo.addr)
	east.cat.importFrom("west", "default", "echo")
	return &pair{ca: ca, east: east, west: west, echo: echo, sidecar: newCreds(t, ca, workloadID("default", "client"), nil)}
}

// dialEntry connects a sidecar to gw's entry listener, sends h and reads
// the reply.
func dialEntry(t testing.TB, gw *testGateway, creds *proxy.Credentials, h tunnel.Header) (*tls.Conn, tunnel.Reply, error) {
	t.Helper()
	want, err := identity.Gateway(spiffeid.RequireTrustDomainFromString(testTD), gw.cluster)
	if err != nil {
		t.Fatal(err)
	}
	cfg := creds.ClientTLS([]string{tunnel.ALPNEntry}, creds.Verifier().VerifyConnection(svid.RoleServer, func(id spiffeid.ID) error {
		if id != want {
			return fmt.Errorf("got %s, want %s", id, want)
		}
		return nil
	}))
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 30 * time.Second}, "tcp", gw.entryAddr, cfg)
	if err != nil {
		return nil, tunnel.Reply{}, err
	}
	conn.SetDeadline(time.Now().Add(60 * time.Second))
	if err := tunnel.WriteHeader(conn, h); err != nil {
		conn.Close()
		return nil, tunnel.Reply{}, err
	}
	reply, err := tunnel.ReadReply(conn)
	if err != nil {
		conn.Close()
		return nil, tunnel.Reply{}, err
	}
	conn.SetDeadline(time.Now().Add(60 * time.Second))
	return conn, reply, nil
}

// mustTunnel opens a tunnel and fails the test unless the reply is OK.
func mustTunnel(t testing.TB, gw *testGateway, creds *proxy.Credentials, h tunnel.Header) *tls.Conn {
	t.Helper()
	conn, reply, err := dialEntry(t, gw, creds, h)
	if err != nil {
		t.Fatalf("tunnel to %s: %v", h, err)
	}
	if reply.Code != tunnel.CodeOK {
		conn.Close()
		t.Fatalf("tunnel to %s: got reply %v (%q), want ok", h, reply.Code, reply.Message)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// roundTrip writes payload, half-closes and reads everything back.
func roundTrip(c interface {
	io.ReadWriter
	CloseWrite() error
}, payload []byte) ([]byte, error) {
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	got, rerr := io.ReadAll(c)
	if err := <-errc; err != nil {
		return got, fmt.Errorf("write: %w", err)
	}
	return got, rerr
}

// echoConn sends one line and reads its echo, without closing.
func echoLine(c io.ReadWriter, line string) error {
	if _, err := io.WriteString(c, line); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	buf := make([]byte, len(line))
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if string(buf) != line {
		return fmt.Errorf("echo: got %q, want %q", buf, line)
	}
	return nil
}

// echoServer echoes each connection until EOF, then half-closes, and keeps
// what each connection sent.
type echoServer struct {
	addr string
	mu   sync.Mutex
	got  [][]byte
}

func newEchoServer(t testing.TB) *echoServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &echoServer{addr: ln.Addr().String()}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				var seen bytes.Buffer
				io.Copy(io.MultiWriter(c, &seen), c)
				c.(*net.TCPConn).CloseWrite()
				e.mu.Lock()
				e.got = append(e.got, seen.Bytes())
				e.mu.Unlock()
			})
		}
	})
	return e
}

func (e *echoServer) received() [][]byte {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([][]byte(nil), e.got...)
}

// eventually retries f until it returns nil or 30s pass.
func eventually(t testing.TB, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after 30s: %v", what, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// awaitClosed fails the test unless reading c fails or ends within 20s.
func awaitClosed(t testing.TB, c net.Conn) error {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 1024)
	for {
		_, err := c.Read(buf)
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("connection still open 20s later")
		}
		return err
	}
}

// dialRawPeer connects to gw as a peer gateway would, with creds, and no
// gateway logic of its own: for feeding a gateway bad streams.
func dialRawPeer(t testing.TB, gw *testGateway, creds *proxy.Credentials) (*quic.Conn, error) {
	t.Helper()
	cfg := creds.ClientTLS([]string{tunnel.ALPNPeer}, func(tls.ConnectionState) error { return nil })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := quic.DialAddr(ctx, gw.peerAddr, cfg, &quic.Config{EnableStreamResetPartialDelivery: true, MaxIncomingStreams: -1})
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { conn.CloseWithError(0, "") })
	return conn, nil
}

// metricValue sums the counters and gauges c collects.
func metricValue(c prometheus.Collector) float64 {
	var sum float64
	for _, m := range collect(c) {
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		}
	}
	return sum
}

// metricCount counts the series c collects.
func metricCount(c prometheus.Collector) int { return len(collect(c)) }

func collect(c prometheus.Collector) []*dto.Metric {
	ch := make(chan prometheus.Metric, 128)
	go func() { c.Collect(ch); close(ch) }()
	var out []*dto.Metric
	for m := range ch {
		var pb dto.Metric
		if err := m.Write(&pb); err == nil {
			out = append(out, &pb)
		}
	}
	return out
}
