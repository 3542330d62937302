package proxy

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// reportCP is a control plane that issues SVIDs for the token "good",
// accepts every registration, records health reports and streams the
// snapshots it is given on Watch.
type reportCP struct {
	controlplanev1.UnimplementedDiscoveryServiceServer
	mu      sync.Mutex
	reports []*controlplanev1.ReportHealthRequest
	got     chan struct{} // a report arrived
	snaps   chan *controlplanev1.Snapshot
}

func (f *reportCP) Register(context.Context, *controlplanev1.RegisterRequest) (*controlplanev1.RegisterResponse, error) {
	return &controlplanev1.RegisterResponse{Lease: durationpb.New(time.Minute)}, nil
}

func (f *reportCP) ReportHealth(_ context.Context, req *controlplanev1.ReportHealthRequest) (*controlplanev1.ReportHealthResponse, error) {
	f.mu.Lock()
	f.reports = append(f.reports, proto.Clone(req).(*controlplanev1.ReportHealthRequest))
	f.mu.Unlock()
	select {
	case f.got <- struct{}{}:
	default:
	}
	return &controlplanev1.ReportHealthResponse{}, nil
}

func (f *reportCP) Watch(_ *controlplanev1.WatchRequest, stream controlplanev1.DiscoveryService_WatchServer) error {
	for {
		select {
		case <-stream.Context().Done():
			return nil
		case s := <-f.snaps:
			if err := stream.Send(&controlplanev1.WatchResponse{Snapshot: s}); err != nil {
				return err
			}
		}
	}
}

func (f *reportCP) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.reports)
}

func (f *reportCP) last() *controlplanev1.ReportHealthRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reports[len(f.reports)-1]
}

func startReportCP(t *testing.T, c *catest.CA) (*reportCP, string) {
	t.Helper()
	s := c.SVID(t, "spiffe://example.org/cluster/east/controlplane", time.Hour)
	cert := tls.Certificate{Leaf: s.Certificates[0], PrivateKey: s.PrivateKey}
	for _, c := range s.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		ClientAuth: tls.RequestClientCert})))
	f := &reportCP{got: make(chan struct{}, 1), snaps: make(chan *controlplanev1.Snapshot, 4)}
	controlplanev1.RegisterIdentityServiceServer(srv, &tokenCP{ca: c})
	controlplanev1.RegisterDiscoveryServiceServer(srv, f)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return f, ln.Addr().String()
}

func (f *reportCP) await(t *testing.T, within time.Duration) {
	t.Helper()
	select {
	case <-f.got:
	case <-time.After(within):
		t.Fatalf("no health report within %s", within)
	}
}

// The sidecar reports the bundle it holds and the issuer of its SVID, on
// its interval and, debounced, soon after a change: a root rotation waits
// for every node's acknowledgement, not for the next interval.
func TestHealthReportPromptAfterChange(t *testing.T) {
	c := catest.New(t, "example.org")
	f, cp := startReportCP(t, c)
	a := testAgent(t, c, cp, "good", "")
	a.cfg.Instance, a.cfg.Service, a.cfg.Namespace, a.cfg.App = "cart-0", "cart", "shop", "127.0.0.1:1"
	a.cfg.HealthInterval = time.Hour
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := a.bootstrap(ctx); err != nil {
		t.Fatal(err)
	}
	a.firstOnce.Do(func() { close(a.firstSnapshot) })
	done := make(chan error, 1)
	go func() { done <- a.healthLoop(ctx, "127.0.0.1:15006") }()
	defer func() {
		cancel()
		<-done
	}()

	f.await(t, 10*time.Second) // the first report, right after registering
	r := f.last()
	if want := a.creds.Bundle().Digest(); r.GetBundleDigest() != want {
		t.Errorf("bundle digest = %q, want %q", r.GetBundleDigest(), want)
	}
	if want := svid.IssuerFingerprint(a.creds.SVID().Certificates); r.GetSvidIssuer() != want || want == "" {
		t.Errorf("SVID issuer = %q, want %q", r.GetSvidIssuer(), want)
	}

	// Changes that come together are reported once, about reportDebounce
	// later; the health interval is an hour.
	start := time.Now()
	for range 5 {
		a.kickReport()
	}
	f.await(t, 5*time.Second)
	if d := time.Since(start); d < reportDebounce {
		t.Errorf("reported %s after the change, want the %s debounce first", d, reportDebounce)
	}
	time.Sleep(3 * reportDebounce)
	if n := f.count(); n != 2 {
		t.Errorf("%d reports after a burst of changes, want 2 (the first and one for the burst)", n)
	}
}

// A change of SVID or bundle asks for a report.
func TestCredentialChangeKicksReport(t *testing.T) {
	c := catest.New(t, "example.org")
	s, err := New(Config{TrustDomain: spiffeid.RequireTrustDomainFromString("example.org"), ControlPlane: "127.0.0.1:1", TrustBundle: c.Bundle(),
		Instance: "cart-0", Service: "cart", Namespace: "shop", Inbound: "127.0.0.1:0", App: "127.0.0.1:1",
		Registry: prometheus.NewRegistry(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.credentialsLoop(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	// credentialsLoop subscribes to changes when it starts: change the SVID
	// until one is noticed.
	sv := c.SVID(t, "spiffe://example.org/ns/shop/sa/cart", time.Hour)
	deadline := time.After(5 * time.Second)
	for {
		if err := s.creds.SetSVID(sv); err != nil {
			t.Fatal(err)
		}
		select {
		case <-s.agent.reportNow:
			return
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			t.Fatal("an SVID change asked for no report")
		}
	}
}

// A snapshot's reissue hint reaches the SVID renewal, and the first
// snapshot of each configuration stream asks for a report (the control
// plane forgets a node's report when its streams close).
func TestSnapshotReissueAndReportOnNewStream(t *testing.T) {
	c := catest.New(t, "example.org")
	f, cp := startReportCP(t, c)
	a := testAgent(t, c, cp, "good", "")
	a.cfg.Instance, a.cfg.Service = "cart-0", "cart"
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := a.bootstrap(ctx); err != nil {
		t.Fatal(err)
	}
	f.snaps <- &controlplanev1.Snapshot{Version: 1, Cluster: "east"}
	f.snaps <- &controlplanev1.Snapshot{Version: 2, Cluster: "east", Reissue: &controlplanev1.Reissue{
		Issuer: "sha256:0000000000000000000000000000000000000000000000000000000000000000", Window: durationpb.New(time.Minute)}}
	done := make(chan error, 1)
	go func() { done <- a.watchLoop(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	select {
	case <-a.reportNow:
	case <-time.After(10 * time.Second):
		t.Fatal("the first snapshot of the stream asked for no report")
	}
	deadline := time.Now().Add(10 * time.Second)
	for a.id.PendingReissue().IsZero() {
		if time.Now().After(deadline) {
			t.Fatal("the snapshot's reissue hint scheduled no renewal")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if at := a.id.PendingReissue(); at.After(time.Now().Add(time.Minute)) {
		t.Errorf("renewal scheduled at %v, past the one-minute window", at)
	}
	select {
	case <-a.reportNow:
		t.Error("a later snapshot on the same stream asked for a report")
	case <-time.After(100 * time.Millisecond):
	}
}
