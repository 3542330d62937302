package e2e

import (
	"context"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// A failing backend: retries hide its 503s from the caller, within the
// budget, and passive outlier ejection takes it out of rotation.
func TestRetriesAndOutlierEjection(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	east.workload("backend-0", "backend", workloadOptions{})
	east.workload("backend-1", "backend", workloadOptions{})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	east.mustApply(`
apiVersion: strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend, namespace: default}
spec:
  service: backend
  retries:
    attempts: 2
    retryOn: [5xx, connect-failure]
    budget: {percent: 50, minPerSecond: 20}
  outlierDetection: {consecutiveErrors: 3, baseEjectionTime: 30s, maxEjectionPercent: 50}
`)
	fe.waitEndpoints(t, "backend", 2)
	waitUntil(t, 10*time.Second, "policy in force on frontend", func() bool {
		for _, svc := range fe.sc.Snapshot().GetServices() {
			if svc.GetPolicy().GetOutlierDetection().GetConsecutiveErrors() == 3 {
				return true
			}
		}
		return false
	})
	client := &http.Client{Timeout: 5 * time.Second}
	for i := range 60 {
		code, r, err := get(client, fe.url("backend")+"?fail=backend-1")
		if err != nil || code != http.StatusOK {
			t.Fatalf("request %d: code %d err %v; retries should have hidden backend-1's 503", i, code, err)
		}
		if r.Instance != "backend-0" {
			t.Fatalf("request %d answered by %s, want backend-0", i, r.Instance)
		}
	}
	if got := metric(t, fe.registry, "strait_proxy_retries_total", map[string]string{"outcome": "sent"}); got == 0 || got > 10 {
		t.Errorf("retries sent: got %v, want a few (ejection should stop them)", got)
	}
	ejected := false
	for _, st := range fe.sc.UpstreamStats("backend") {
		if st.Key == "backend-1" {
			ejected = st.Ejected
		}
	}
	if !ejected {
		t.Errorf("backend-1 not ejected after consecutive 503s: %+v", fe.sc.UpstreamStats("backend"))
	}
}

// Connection limits: requests beyond maxRequests are refused at once by
// the caller's sidecar, not queued without bound.
func TestConnectionLimits(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	release := make(chan struct{})
	slow := func(ln net.Listener) func() {
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-release:
			case <-time.After(10 * time.Second):
			}
		})}
		go srv.Serve(ln)
		return func() { srv.Close() }
	}
	east.workload("backend-0", "backend", workloadOptions{serve: slow})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	east.mustApply(`
apiVersion: strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend, namespace: default}
spec:
  service: backend
  retries: {attempts: 0}
  connectionLimits: {maxConnections: 4, maxPendingRequests: 2, maxRequests: 2}
`)
	fe.waitEndpoints(t, "backend", 1)
	waitUntil(t, 10*time.Second, "limits in force", func() bool {
		for _, svc := range fe.sc.Snapshot().GetServices() {
			if svc.GetPolicy().GetConnectionLimits().GetMaxRequests() == 2 {
				return true
			}
		}
		return false
	})
	var wg sync.WaitGroup
	codes := make(chan int, 6)
	for range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(fe.url("backend"))
			if err != nil {
				codes <- 0
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			codes <- resp.StatusCode
		}()
	}
	time.Sleep(time.Second)
	close(release)
	wg.Wait()
	close(codes)
	count := map[int]int{}
	for c := range codes {
		count[c]++
	}
	if count[http.StatusOK] != 2 || count[http.StatusServiceUnavailable] != 4 {
		t.Errorf("with maxRequests 2 and 6 concurrent requests: got status counts %v, want 2×200 and 4×503", count)
	}
}

// gRPC (HTTP/2) passes through both sidecars: h2c from the app, h2 with
// mTLS between sidecars, h2c to the server app, trailers intact.
func TestGRPCThroughSidecars(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	serveGRPC := func(ln net.Listener) func() {
		s := grpc.NewServer()
		h := health.NewServer()
		h.SetServingStatus("strait.test", healthpb.HealthCheckResponse_SERVING)
		healthpb.RegisterHealthServer(s, h)
		go s.Serve(ln)
		return s.Stop
	}
	east.workload("backend-0", "backend", workloadOptions{serve: serveGRPC})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	fe.waitEndpoints(t, "backend", 1)
	conn, err := grpc.NewClient(fe.sc.Addrs().Upstreams["backend"], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for range 20 {
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "strait.test"})
		if err != nil {
			t.Fatalf("gRPC through the mesh: %v", err)
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("got %v, want SERVING", resp.GetStatus())
		}
	}
	// A gRPC error status travels back in the trailers.
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "unknown"})
	if err == nil {
		t.Fatal("Check of an unknown service succeeded, want NotFound")
	}
}

// An opaque TCP service: bytes are relayed over mTLS between sidecars.
func TestOpaqueTCP(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	tcpEcho := func(ln net.Listener) func() {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { io.Copy(c, c); c.Close() }()
			}
		}()
		return func() { ln.Close() }
	}
	b0 := east.workload("backend-0", "backend", workloadOptions{serve: tcpEcho, protocol: controlplanev1.Protocol_PROTOCOL_TCP})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	fe.waitEndpoints(t, "backend", 1)
	waitUntil(t, 10*time.Second, "backend known as TCP", func() bool {
		for _, svc := range fe.sc.Snapshot().GetServices() {
			if svc.GetProtocol() == controlplanev1.Protocol_PROTOCOL_TCP {
				return true
			}
		}
		return false
	})
	c, err := net.Dial("tcp", fe.sc.Addrs().Upstreams["backend"])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	msg := []byte("not HTTP at all\x00\x01\x02")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != string(msg) {
		t.Fatalf("echo through the mesh: got %q, %v; want %q", got, err, msg)
	}
	waitUntil(t, 5*time.Second, "TCP bytes counted", func() bool {
		return metric(t, b0.registry, "strait_proxy_tcp_bytes_total", map[string]string{"direction": "inbound"}) >= float64(2*len(msg))
	})
}

// Watch pushes a sidecar only what changed for it.
func TestWatchPushesOnlyRelevantChanges(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	east.workload("backend-0", "backend", workloadOptions{})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	fe.waitEndpoints(t, "backend", 1)
	time.Sleep(500 * time.Millisecond) // let registration churn settle
	before := fe.sc.Snapshot().GetVersion()
	east.mustApply(`
apiVersion: strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: payments, namespace: default}
spec: {service: payments}
`)
	time.Sleep(time.Second) // well past the debounce
	if got := fe.sc.Snapshot().GetVersion(); got != before {
		t.Errorf("a policy for payments pushed frontend a new snapshot: version %d -> %d", before, got)
	}
	east.mustApply(`
apiVersion: strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend, namespace: default}
spec: {service: backend, timeouts: {request: 3s}}
`)
	waitUntil(t, 5*time.Second, "frontend gets backend's policy", func() bool {
		return fe.sc.Snapshot().GetVersion() > before
	})
}
