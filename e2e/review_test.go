package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/local"
	"github.com/straitmesh/strait/internal/wiring"
)

// mint issues an SVID for a workload identity from the cluster's
// intermediate, as if the workload had proved it.
func (c *cluster) mint(t testing.TB, sa string) *x509svid.SVID {
	t.Helper()
	iss, err := wiring.NewIssuer(c.dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	s, err := iss.MintSVID(spiffeid.RequireFromString("spiffe://"+trustDomain+"/ns/default/sa/"+sa), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// dialAs opens a control-plane connection presenting sv.
func (c *cluster) dialAs(t testing.TB, sv *x509svid.SVID) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(c.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		InsecureSkipVerify: true, Certificates: []tls.Certificate{tlsCert(sv)}})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// A caller cannot reach an HTTP service's app as raw TCP (which would
// skip the identity-header handling): the ALPN must match the protocol.
func TestInboundRefusesTCPALPNOnHTTPService(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	b0 := east.workload("backend-0", "backend", workloadOptions{})
	fe := east.mint(t, "frontend")
	conn, err := tls.Dial("tcp", b0.sc.Addrs().Inbound, &tls.Config{InsecureSkipVerify: true,
		Certificates: []tls.Certificate{tlsCert(fe)}, NextProtos: []string{"strait-tcp/1"}})
	if err == nil {
		conn.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-Client-Cert: URI=spiffe://strait.example/ns/prod/sa/admin\r\n\r\n"))
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	if err == nil {
		t.Fatal("a strait-tcp/1 connection to an HTTP service was accepted")
	}
}

// Naming our header in Connection does not get it removed on the way to
// the app; Upgrade requests are refused (hijacked connections would escape
// revocation).
func TestIdentityHeaderSurvivesHopByHop(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	b0 := east.workload("backend-0", "backend", workloadOptions{})
	fe := east.mint(t, "frontend")
	conn, err := tls.Dial("tcp", b0.sc.Addrs().Inbound, &tls.Config{InsecureSkipVerify: true,
		Certificates: []tls.Certificate{tlsCert(fe)}, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	roundTrip := func(raw string) *http.Response {
		t.Helper()
		if _, err := io.WriteString(conn, raw); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	resp := roundTrip("GET / HTTP/1.1\r\nHost: x\r\nConnection: X-Forwarded-Client-Cert\r\nX-Forwarded-Client-Cert: URI=spiffe://strait.example/ns/prod/sa/admin\r\n\r\n")
	var r echoReply
	if err := jsonDecode(resp.Body, &r); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if r.Caller != frontendID() {
		t.Errorf("app saw caller %q, want %q", r.Caller, frontendID())
	}
	resp = roundTrip("GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotImplemented {
		t.Errorf("upgrade request: got %d, want 501", resp.StatusCode)
	}
}

// One workload cannot take over another's configuration stream by naming
// its node, nor register itself as an instance of another service.
func TestWorkloadCannotPoseAsAnother(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	east.workload("backend-0", "backend", workloadOptions{})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	fe.waitEndpoints(t, "backend", 1)

	intruder := east.dialAs(t, east.mint(t, "backend"))
	disc := controlplanev1.NewDiscoveryServiceClient(intruder)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := disc.Watch(ctx, &controlplanev1.WatchRequest{Node: "frontend-0", Upstreams: []string{"backend"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	east.workload("backend-1", "backend", workloadOptions{})
	fe.waitEndpoints(t, "backend", 2) // frontend's own stream still gets updates

	// backend's identity was never given a token for frontend.
	_, err = disc.Register(context.Background(), &controlplanev1.RegisterRequest{Instance: &controlplanev1.Instance{
		Name: "evil-0", Service: "frontend", Namespace: "default", Address: "127.0.0.1:1"}})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "frontend") {
		t.Errorf("registering as an instance of another service: got %v, want PermissionDenied", err)
	}
	// Nor can it take over frontend's instance record.
	_, err = disc.ReportHealth(context.Background(), &controlplanev1.ReportHealthRequest{Instance: "frontend-0", Health: controlplanev1.Health_HEALTH_UNHEALTHY})
	if err == nil {
		t.Error("reporting the health of another workload's instance succeeded")
	}
}

// A caller cannot ask for an SVID longer-lived than the cluster issues.
func TestSVIDLifetimeCapped(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{svidTTL: 2 * time.Minute})
	conn := east.dialAs(t, east.mint(t, "backend"))
	resp, err := controlplanev1.NewIdentityServiceClient(conn).Certify(context.Background(),
		&controlplanev1.CertifyRequest{Csr: newCSR(t), TtlSeconds: 24 * 3600})
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509ParseFirst(resp.GetCertificateChain())
	if err != nil {
		t.Fatal(err)
	}
	if life := time.Until(leaf.NotAfter); life > 2*time.Minute+time.Second {
		t.Errorf("SVID lives %s more, want at most the cluster's 2m", life)
	}
}

// Removing a root from the bundle cuts sessions already open under it: a
// caller whose chain ends at a root that leaves the bundle is disconnected,
// not merely refused next time.
func TestRootRemovalCutsOpenSessions(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	b0 := east.workload("backend-0", "backend", workloadOptions{})
	// A second root joins the bundle (as during a rotation, or a peer's).
	other := catest.New(t, trustDomain, catest.Options{Cluster: "other"})
	r1 := east.dir.Bundle.Roots()
	both, err := bundle.New(east.td, east.dir.Bundle.Sequence()+1, append(r1, other.Bundle().Roots()...))
	if err != nil {
		t.Fatal(err)
	}
	if err := local.WriteBundle(east.dir.Path, both); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "backend trusts both roots", func() bool {
		return b0.sc.Credentials().Bundle().Digest() == both.Digest()
	})
	// A caller under the second root opens a keep-alive connection.
	guest := other.SVID(t, "spiffe://"+trustDomain+"/ns/default/sa/guest", time.Hour)
	conn, err := tls.Dial("tcp", b0.sc.Addrs().Inbound, &tls.Config{InsecureSkipVerify: true,
		Certificates: []tls.Certificate{tlsCert(guest)}, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	io.WriteString(conn, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("guest under the second root: %v, %v; want 200", resp, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()

	// The second root leaves the bundle.
	only, err := bundle.New(east.td, both.Sequence()+1, r1)
	if err != nil {
		t.Fatal(err)
	}
	if err := local.WriteBundle(east.dir.Path, only); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "backend holds the bundle without the second root", func() bool {
		return b0.sc.Credentials().Bundle().Digest() == only.Digest()
	})
	waitUntil(t, 5*time.Second, "backend closes the guest's open connection", func() bool {
		return metric(t, b0.registry, "strait_proxy_connections_revoked_total", map[string]string{"reason": "untrusted"}) > 0
	})
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(conn, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	if _, err := http.ReadResponse(br, nil); err == nil {
		t.Error("the guest's connection still answers after its root left the bundle")
	}
}
