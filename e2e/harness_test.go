package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/local"
	"github.com/straitmesh/strait/controlplane/resource"
	"github.com/straitmesh/strait/internal/wiring"
	"github.com/straitmesh/strait/proxy"
)

const trustDomain = "strait.example"

func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("STRAIT_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// cluster is one local-mode cluster run in-process: the mesh CA, a
// control plane on loopback, and the sidecars started by the test.
type cluster struct {
	t       testing.TB
	name    string
	caDir   string
	path    string
	root    *ca.Authority // set on the root authority's cluster
	dir     *local.Dir
	td      spiffeid.TrustDomain
	addr    string
	svidTTL time.Duration
	cancel  context.CancelFunc
	done    chan error
	conn    *grpc.ClientConn
	admin   controlplanev1.AdminServiceClient
	fed     controlplanev1.FederationServiceClient
}

type clusterOptions struct {
	svidTTL time.Duration
	// meshOf shares the mesh CA of that cluster (its root authority);
	// nil creates a new mesh.
	meshOf *cluster
	// rootAuthority makes the cluster sign intermediates for pending joiners.
	rootAuthority bool
	// pending installs the cluster without an intermediate.
	pending bool
}

func newCluster(t testing.TB, name string, opts clusterOptions) *cluster {
	t.Helper()
	root := t.TempDir()
	ctx := context.Background()
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	c := &cluster{t: t, name: name, td: td, addr: "127.0.0.1:0", svidTTL: opts.svidTTL, path: filepath.Join(root, name)}
	if opts.pending {
		if _, err := local.InitPending(c.path, name, td, false); err != nil {
			t.Fatal(err)
		}
		c.startControlPlane()
		t.Cleanup(c.stopControlPlane)
		return c
	}
	var auth *ca.Authority
	var err error
	if m := opts.meshOf; m != nil {
		if m.root == nil {
			t.Fatal("meshOf needs the root authority's cluster")
		}
		c.caDir, auth = m.caDir, m.root
	} else {
		c.caDir = filepath.Join(root, "ca")
		if auth, err = ca.Init(ctx, ca.Config{Dir: c.caDir}, ca.InitOptions{TrustDomain: td}); err != nil {
			t.Fatal(err)
		}
	}
	d, err := local.Init(ctx, c.path, name, wiring.RootAuthority{CA: auth}, 0, false)
	if opts.meshOf == nil {
		auth.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
	c.dir = d
	if err := c.mintAdmin(); err != nil {
		t.Fatal(err)
	}
	if opts.rootAuthority {
		c.root, err = ca.Open(ctx, ca.Config{Dir: c.caDir})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.root.Close() })
	}
	c.startControlPlane()
	t.Cleanup(c.stopControlPlane)
	c.dialAdmin()
	return c
}

func (c *cluster) mintAdmin() error {
	iss, err := wiring.NewIssuer(c.dir, 0)
	if err != nil {
		return err
	}
	_, err = c.dir.MintAdmin(iss, time.Hour)
	return err
}

// startControlPlane runs the control plane on its address (the same one
// after a restart).
func (c *cluster) startControlPlane() {
	c.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	c.done = make(chan error, 1)
	c.cancel = cancel
	o := wiring.ControlPlaneOptions{Dir: c.path, Listen: c.addr, SVIDTTL: c.svidTTL, ReissueWindow: time.Second,
		Logger: testLogger(c.t).With("component", c.name+"/controlplane"), Ready: func(a string) { ready <- a }}
	if c.root != nil {
		o.RootAuthority = wiring.RootAuthority{CA: c.root}
	}
	go func() { c.done <- wiring.RunControlPlane(ctx, o) }()
	select {
	case c.addr = <-ready:
	case err := <-c.done:
		c.t.Fatalf("control plane: %v", err)
	case <-time.After(10 * time.Second):
		c.t.Fatal("control plane did not start")
	}
}

func (c *cluster) stopControlPlane() {
	if c.cancel == nil {
		return
	}
	c.cancel()
	c.cancel = nil
	select {
	case err := <-c.done:
		if err != nil && !errors.Is(err, context.Canceled) {
			c.t.Errorf("control plane: %v", err)
		}
	case <-time.After(10 * time.Second):
		c.t.Error("control plane did not stop")
	}
}

func (c *cluster) dialAdmin() {
	c.t.Helper()
	cert, key := c.dir.AdminPaths()
	admin, err := x509svid.Load(cert, key)
	if err != nil {
		c.t.Fatal(err)
	}
	want, _ := identity.ControlPlane(c.td, c.name)
	// The bundle on disk, read at each handshake: a root rotation changes it.
	v, _ := svid.NewVerifier(svid.VerifierConfig{TrustDomain: c.td, Bundles: diskBundle{c.dir}})
	tc := &tls.Config{
		MinVersion: tls.VersionTLS13, InsecureSkipVerify: true,
		Certificates: []tls.Certificate{tlsCert(admin)},
		VerifyConnection: v.VerifyConnection(svid.RoleServer, func(id spiffeid.ID) error {
			if id != want {
				return fmt.Errorf("got %s, want %s", id, want)
			}
			return nil
		}),
	}
	conn, err := grpc.NewClient(c.addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { conn.Close() })
	c.conn = conn
	c.admin = controlplanev1.NewAdminServiceClient(conn)
	c.fed = controlplanev1.NewFederationServiceClient(conn)
}

// diskBundle is a data directory's trust bundle as it is on disk now.
type diskBundle struct{ d *local.Dir }

func (b diskBundle) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	cur, err := b.d.ReadBundle()
	if err != nil {
		// A pending cluster has no bundle file: the bundle it was given.
		return b.d.Bundle.GetX509BundleForTrustDomain(td)
	}
	return cur.GetX509BundleForTrustDomain(td)
}

func tlsCert(s *x509svid.SVID) tls.Certificate {
	var chain [][]byte
	for _, c := range s.Certificates {
		chain = append(chain, c.Raw)
	}
	return tls.Certificate{Certificate: chain, PrivateKey: s.PrivateKey}
}

func (c *cluster) token(service string) string {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := c.admin.CreateRegistrationToken(ctx, &controlplanev1.CreateRegistrationTokenRequest{Namespace: "default", ServiceAccount: service, Service: service})
	if err != nil {
		c.t.Fatalf("registration token: %v", err)
	}
	return resp.GetToken()
}

func (c *cluster) apply(yamlDoc string) (*controlplanev1.ApplyResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := decodeResources(yamlDoc)
	if err != nil {
		return nil, err
	}
	return c.admin.Apply(ctx, &controlplanev1.ApplyRequest{Resources: res})
}

func (c *cluster) mustApply(yamlDoc string) {
	c.t.Helper()
	if _, err := c.apply(yamlDoc); err != nil {
		c.t.Fatalf("apply: %v", err)
	}
}

// workload is an echo app with its sidecar.
type workload struct {
	instance, service string
	sc                *proxy.Sidecar
	registry          *prometheus.Registry
	app               net.Listener
	cancel            context.CancelFunc
	done              chan error
}

type workloadOptions struct {
	upstreams   []string
	workloadAPI string
	dataDir     string
	token       string // a registration token; empty mints one
	protocol    controlplanev1.Protocol
	// serve runs the app on ln; nil means the echo app over HTTP/1.1.
	serve func(ln net.Listener) (stop func())
}

func (c *cluster) workload(instance, service string, o workloadOptions) *workload {
	c.t.Helper()
	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		c.t.Fatal(err)
	}
	if o.serve != nil {
		c.t.Cleanup(o.serve(app))
	} else {
		srv := &http.Server{Handler: echoApp(c.name, service, instance)}
		go srv.Serve(app)
		c.t.Cleanup(func() { srv.Close() })
	}
	ups := map[string]string{}
	for _, u := range o.upstreams {
		ups[u] = "127.0.0.1:0"
	}
	reg := prometheus.NewRegistry()
	token := o.token
	if token == "" {
		token = c.token(service)
	}
	sc, err := proxy.New(proxy.Config{
		TrustDomain: c.td, ControlPlane: c.addr, TrustBundle: c.dir.Bundle, Token: token,
		Instance: instance, Service: service, Namespace: "default", Protocol: o.protocol, Inbound: "127.0.0.1:0", App: app.Addr().String(),
		Upstreams: ups, Admin: "127.0.0.1:0", WorkloadAPI: o.workloadAPI, DataDir: o.dataDir, HealthInterval: 500 * time.Millisecond,
		Logger: testLogger(c.t).With("component", instance), Registry: reg,
	})
	if err != nil {
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := &workload{instance: instance, service: service, sc: sc, registry: reg, app: app, cancel: cancel, done: make(chan error, 1)}
	go func() { w.done <- sc.Run(ctx) }()
	c.t.Cleanup(w.stop)
	deadline := time.Now().Add(15 * time.Second)
	for !sc.Ready() {
		select {
		case err := <-w.done:
			c.t.Fatalf("sidecar %s: %v", instance, err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("sidecar %s not ready", instance)
		}
	}
	return w
}

func (w *workload) stop() {
	if w.cancel == nil {
		return
	}
	w.cancel()
	w.cancel = nil
	select {
	case <-w.done:
	case <-time.After(10 * time.Second):
	}
}

// waitEndpoints waits until w's snapshot lists n healthy endpoints of upstream.
func (w *workload) waitEndpoints(t testing.TB, upstream string, n int) {
	t.Helper()
	waitUntil(t, 10*time.Second, fmt.Sprintf("%s sees %d endpoints of %s", w.instance, n, upstream), func() bool {
		for _, svc := range w.sc.Snapshot().GetServices() {
			if svc.GetName() != upstream {
				continue
			}
			healthy := 0
			for _, ep := range svc.GetEndpoints() {
				if ep.GetHealth() == controlplanev1.Health_HEALTH_HEALTHY {
					healthy++
				}
			}
			return healthy >= n
		}
		return false
	})
}

// url is the local outbound listener of upstream on w.
func (w *workload) url(upstream string) string {
	return "http://" + w.sc.Addrs().Upstreams[upstream] + "/"
}

type echoReply struct {
	Cluster, Service, Instance, Caller string
}

func echoApp(cluster, service, instance string) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		caller := ""
		for part := range strings.SplitSeq(r.Header.Get(proxy.HeaderXFCC), ";") {
			if v, ok := strings.CutPrefix(part, "URI="); ok {
				caller = v
			}
		}
		if r.URL.Query().Get("fail") == instance {
			rw.WriteHeader(http.StatusServiceUnavailable)
		}
		json.NewEncoder(rw).Encode(echoReply{Cluster: cluster, Service: service, Instance: instance, Caller: caller})
	})
}

// get does one request and decodes the echo reply.
func get(client *http.Client, url string) (int, echoReply, error) {
	resp, err := client.Get(url)
	if err != nil {
		return 0, echoReply{}, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var r echoReply
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, &r); err != nil {
			return resp.StatusCode, r, fmt.Errorf("decode %q: %w", body, err)
		}
	}
	return resp.StatusCode, r, nil
}

// load runs requests from n goroutines until stop is closed and counts
// the failures (anything but a 200 from the echo app).
type load struct {
	mu       sync.Mutex
	ok, fail int
	errs     []string
	wg       sync.WaitGroup
	stop     chan struct{}
}

func startLoad(url string, n int, maxDuration time.Duration) *load {
	l := &load{stop: make(chan struct{})}
	client := &http.Client{Timeout: 10 * time.Second}
	deadline := time.Now().Add(maxDuration)
	for range n {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for i := 0; i < 1_000_000 && time.Now().Before(deadline); i++ {
				select {
				case <-l.stop:
					return
				default:
				}
				code, _, err := get(client, url)
				l.mu.Lock()
				if err != nil || code != http.StatusOK {
					l.fail++
					if len(l.errs) < 10 {
						l.errs = append(l.errs, fmt.Sprintf("code %d err %v", code, err))
					}
				} else {
					l.ok++
				}
				l.mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	return l
}

func (l *load) finish() (ok, fail int, errs []string) {
	close(l.stop)
	l.wg.Wait()
	return l.ok, l.fail, l.errs
}

func decodeResources(doc string) ([]*controlplanev1.Resource, error) {
	objs, err := resource.Decode([]byte(doc))
	if err != nil {
		return nil, err
	}
	var out []*controlplanev1.Resource
	for _, o := range objs {
		p, err := resource.ToProto(o)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// metric sums the samples of a counter family whose labels include match.
func metric(t testing.TB, reg *prometheus.Registry, name string, match map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, lp := range m.GetLabel() {
				labels[lp.GetName()] = lp.GetValue()
			}
			for k, v := range match {
				if labels[k] != v {
					continue next
				}
			}
			switch {
			case m.GetCounter() != nil:
				sum += m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				sum += m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				sum += float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return sum
}

func jsonDecode(r io.Reader, v any) error { return json.NewDecoder(r).Decode(v) }

func waitUntil(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for: %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func newCSR(t testing.TB) []byte {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func x509ParseFirst(chain [][]byte) (*x509.Certificate, error) {
	if len(chain) == 0 {
		return nil, errors.New("empty chain")
	}
	return x509.ParseCertificate(chain[0])
}
