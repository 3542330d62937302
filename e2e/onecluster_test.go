package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/local"
)

func frontendID() string { return "spiffe://" + trustDomain + "/ns/default/sa/frontend" }

// One cluster: frontend calls backend through two sidecars with mTLS; the
// backend app sees the caller's verified identity; both backends serve.
func TestFrontendToBackendThroughSidecars(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	b0 := east.workload("backend-0", "backend", workloadOptions{})
	east.workload("backend-1", "backend", workloadOptions{})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	fe.waitEndpoints(t, "backend", 2)

	client := &http.Client{Timeout: 5 * time.Second}
	seen := map[string]int{}
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; i < 400 && (len(seen) < 2 || i < 40); i++ {
		code, r, err := get(client, fe.url("backend"))
		if err != nil || code != http.StatusOK {
			t.Fatalf("request %d: code %d, err %v", i, code, err)
		}
		if r.Caller != frontendID() {
			t.Fatalf("backend saw caller %q, want %q", r.Caller, frontendID())
		}
		seen[r.Instance]++
		if time.Now().After(deadline) {
			break
		}
	}
	if len(seen) != 2 {
		t.Errorf("instances that served: %v, want backend-0 and backend-1", seen)
	}
	// A caller cannot forge its identity header: the sidecar replaces it.
	req, _ := http.NewRequest("GET", fe.url("backend"), nil)
	req.Header.Set("X-Forwarded-Client-Cert", "By=x;URI=spiffe://"+trustDomain+"/ns/default/sa/admin")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if got := metric(t, b0.registry, "strait_proxy_requests_total", map[string]string{"direction": "inbound", "source": frontendID(), "response_class": "2xx"}); got == 0 {
		t.Errorf("backend-0 inbound 2xx requests from frontend: got %v, want > 0", got)
	}
	if got := metric(t, fe.registry, "strait_proxy_requests_total", map[string]string{"direction": "outbound", "destination": "backend"}); got < 40 {
		t.Errorf("frontend outbound requests: got %v, want >= 40", got)
	}
}

func TestForgedHeaderIsReplaced(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	east.workload("backend-0", "backend", workloadOptions{})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	fe.waitEndpoints(t, "backend", 1)
	req, _ := http.NewRequest("GET", fe.url("backend"), nil)
	req.Header.Set("X-Forwarded-Client-Cert", "By=x;URI=spiffe://"+trustDomain+"/ns/default/sa/admin")
	req.Header.Set("X-Strait-Caller", "spiffe://"+trustDomain+"/ns/default/sa/admin")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r echoReply
	if err := jsonDecode(resp.Body, &r); err != nil {
		t.Fatal(err)
	}
	if r.Caller != frontendID() {
		t.Errorf("backend saw caller %q, want the verified %q", r.Caller, frontendID())
	}
}

// AuthorizationPolicy decides who may call; a change applies to open
// connections too.
func TestAuthorizationPolicy(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	b0 := east.workload("backend-0", "backend", workloadOptions{})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	fe.waitEndpoints(t, "backend", 1)
	client := &http.Client{Timeout: 5 * time.Second}
	if code, _, err := get(client, fe.url("backend")); err != nil || code != 200 {
		t.Fatalf("before any policy: code %d err %v, want 200", code, err)
	}
	east.mustApply(`
apiVersion: strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: backend-callers, namespace: default}
spec:
  service: backend
  from:
    - spiffeID: spiffe://strait.example/ns/default/sa/billing
`)
	waitUntil(t, 10*time.Second, "frontend denied", func() bool {
		code, _, _ := get(client, fe.url("backend"))
		return code != 200
	})
	if got := metric(t, b0.registry, "strait_proxy_tls_handshake_failures_total", map[string]string{"direction": "inbound", "reason": "unauthorized"}); got == 0 {
		t.Errorf("unauthorized handshake failures on backend-0: got 0, want > 0")
	}
	east.mustApply(`
apiVersion: strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: backend-callers, namespace: default}
spec:
  service: backend
  from:
    - spiffeID: spiffe://strait.example/ns/default/sa/frontend
`)
	waitUntil(t, 10*time.Second, "frontend allowed again", func() bool {
		code, _, _ := get(client, fe.url("backend"))
		return code == 200
	})
	east.mustApply(`
apiVersion: strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-frontend, namespace: default}
spec:
  service: backend
  action: DENY
  from:
    - namespace: default
      serviceAccount: frontend
`)
	waitUntil(t, 10*time.Second, "DENY wins over ALLOW", func() bool {
		code, _, _ := get(client, fe.url("backend"))
		return code != 200
	})
	if got := metric(t, b0.registry, "strait_proxy_connections_revoked_total", nil); got == 0 {
		t.Errorf("open connections closed on policy change: got 0, want > 0")
	}
}

// The control plane dies with traffic flowing: traffic goes on with the
// last snapshot; it comes back on the same data directory with nothing lost.
func TestControlPlaneRestartLosesNothing(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	east.workload("backend-0", "backend", workloadOptions{})
	east.workload("backend-1", "backend", workloadOptions{})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	fe.waitEndpoints(t, "backend", 2)
	east.mustApply(`
apiVersion: strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend, namespace: default}
spec:
  service: backend
  retries: {attempts: 2}
`)
	l := startLoad(fe.url("backend"), 4, 30*time.Second)
	time.Sleep(500 * time.Millisecond)
	east.stopControlPlane()
	time.Sleep(2 * time.Second) // traffic without a control plane
	east.startControlPlane()
	time.Sleep(2 * time.Second)
	ok, fail, errs := l.finish()
	if fail != 0 || ok == 0 {
		t.Errorf("requests across the control plane restart: %d ok, %d failed (%v), want all ok", ok, fail, errs)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	list, err := east.admin.List(ctx, &controlplanev1.ListRequest{Kind: "TrafficPolicy"})
	if err != nil || len(list.GetResources()) != 1 {
		t.Fatalf("TrafficPolicy after restart: %v, %v; want the one applied", list, err)
	}
	waitUntil(t, 15*time.Second, "all three instances registered and streaming after restart", func() bool {
		sctx, scancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer scancel()
		st, err := east.admin.Status(sctx, &controlplanev1.StatusRequest{})
		if err != nil || len(st.GetInstances()) != 3 {
			return false
		}
		for _, n := range st.GetNodes() {
			if !n.GetConnected() {
				return false
			}
		}
		return len(st.GetNodes()) == 3
	})
}

// SVIDs are renewed at half life under load with zero failed requests.
func TestSVIDRotationUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("takes ~15s")
	}
	east := newCluster(t, "east", clusterOptions{svidTTL: 20 * time.Second})
	b0 := east.workload("backend-0", "backend", workloadOptions{})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	fe.waitEndpoints(t, "backend", 1)
	first := b0.sc.Credentials().SVID().Certificates[0].SerialNumber
	firstFE := fe.sc.Credentials().SVID().Certificates[0].SerialNumber
	l := startLoad(fe.url("backend"), 4, 40*time.Second)
	waitUntil(t, 30*time.Second, "both SVIDs renewed twice", func() bool {
		return b0.sc.Credentials().SVID().Certificates[0].SerialNumber.Cmp(first) != 0 &&
			fe.sc.Credentials().SVID().Certificates[0].SerialNumber.Cmp(firstFE) != 0 &&
			metric(t, b0.registry, "strait_proxy_svid_expiry_timestamp_seconds", nil) > 0
	})
	time.Sleep(3 * time.Second)
	ok, fail, errs := l.finish()
	if fail != 0 || ok == 0 {
		t.Errorf("requests during rotation: %d ok, %d failed (%v), want all ok", ok, fail, errs)
	}
}

// The inbound listener refuses certificates that are forged, expired, or
// from another trust domain, and counts each by reason.
func TestInboundRefusesBadClientCertificates(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	b0 := east.workload("backend-0", "backend", workloadOptions{})
	id := spiffeid.RequireFromString(frontendID())

	// Forged: self-signed, right SPIFFE ID.
	forgedKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "frontend"}, URIs: []*url.URL{id.URL()},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &forgedKey.PublicKey, forgedKey)
	forged := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: forgedKey}

	// Expired: a real chain from the cluster's intermediate, in the past.
	past := func() time.Time { return time.Now().Add(-3 * time.Hour) }
	oldIssuer, err := ca.NewIssuer(ca.IssuerConfig{TrustDomain: east.td, Chain: east.dir.Chain, Signer: east.dir.Signer, Clock: past})
	if err != nil {
		t.Fatal(err)
	}
	expiredSVID, err := oldIssuer.MintSVID(id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// Another trust domain.
	other := catest.New(t, "other.example")
	foreign := other.SVID(t, "spiffe://other.example/ns/default/sa/frontend", time.Hour)

	for _, tc := range []struct {
		name   string
		cert   tls.Certificate
		reason string
	}{
		{"forged", forged, "untrusted"},
		{"expired", tlsCert(expiredSVID), "expired"},
		{"other trust domain", tlsCert(foreign), "wrong_trust_domain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := metric(t, b0.registry, "strait_proxy_tls_handshake_failures_total", map[string]string{"direction": "inbound", "reason": tc.reason})
			conn, err := tls.Dial("tcp", b0.sc.Addrs().Inbound, &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{tc.cert}, NextProtos: []string{"http/1.1"}})
			if err == nil {
				// TLS 1.3: the client learns of the refusal on its first read.
				conn.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
				conn.SetReadDeadline(time.Now().Add(5 * time.Second))
				_, err = conn.Read(make([]byte, 1))
				conn.Close()
			}
			if err == nil {
				t.Fatal("handshake succeeded, want refused")
			}
			// The sidecar counts the failure once its handshake returns,
			// which may be just after the client read the refusal.
			var after float64
			waitUntil(t, 5*time.Second, "the sidecar to count the handshake failure", func() bool {
				after = metric(t, b0.registry, "strait_proxy_tls_handshake_failures_total", map[string]string{"direction": "inbound", "reason": tc.reason})
				return after != before
			})
			if after != before+1 {
				t.Errorf("handshake failures with reason %s: got %v, want %v", tc.reason, after, before+1)
			}
		})
	}
}

// Malformed resources and tokens are refused with a message naming the
// problem, and change nothing.
func TestMalformedInputRefused(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	_, err := east.apply(`
apiVersion: strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend, namespace: default}
spec:
  service: backend
  retries: {attempts: 2}
---
apiVersion: strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: broken, namespace: default}
spec:
  service: backend
  retries: {atempts: 2}
`)
	if err == nil {
		// Client-side decoding may accept it; the server must refuse.
		t.Fatal("apply of an unknown field succeeded")
	}
	if !strings.Contains(err.Error(), "atempts") {
		t.Errorf("error %q does not name the field", err)
	}
	list, lerr := east.admin.List(context.Background(), &controlplanev1.ListRequest{})
	if lerr != nil || len(list.GetResources()) != 0 {
		t.Errorf("after a refused apply: %d resources stored (%v), want none", len(list.GetResources()), lerr)
	}

	// Tokens: garbage, then a real token used twice.
	conn, err := grpc.NewClient(east.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{InsecureSkipVerify: true})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ident := controlplanev1.NewIdentityServiceClient(conn)
	csr := newCSR(t)
	certify := func(tok string) error {
		_, err := ident.Certify(context.Background(), &controlplanev1.CertifyRequest{Csr: csr,
			Credential: &controlplanev1.Credential{Kind: &controlplanev1.Credential_RegistrationToken{RegistrationToken: tok}}})
		return err
	}
	for _, tok := range []string{"", "garbage", "strt1_AAAA_BBBB", strings.Repeat("x", 10000)} {
		if err := certify(tok); status.Code(err) != codes.Unauthenticated && status.Code(err) != codes.InvalidArgument {
			t.Errorf("token %.20q: got %v, want Unauthenticated or InvalidArgument", tok, err)
		}
	}
	tok := east.token("backend")
	if err := certify(tok); err != nil {
		t.Fatalf("first use of a token: %v", err)
	}
	// Replayed with the same CSR it is a retry (an SVID for a key only the
	// first caller holds); with any other key it is refused.
	if err := certify(tok); err != nil {
		t.Errorf("the same redemption repeated: %v", err)
	}
	csr = newCSR(t)
	if err := certify(tok); status.Code(err) != codes.Unauthenticated {
		t.Errorf("second use of a token for another key: got %v, want Unauthenticated", err)
	}
	// A workload SVID is not an admin identity.
	_, err = ident.Certify(context.Background(), &controlplanev1.CertifyRequest{Csr: []byte("not a csr"),
		Credential: &controlplanev1.Credential{Kind: &controlplanev1.Credential_RegistrationToken{RegistrationToken: east.token("backend")}}})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("garbage CSR: got %v, want InvalidArgument", err)
	}
	_, err = controlplanev1.NewAdminServiceClient(conn).Status(context.Background(), &controlplanev1.StatusRequest{})
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("admin API without a client certificate: got %v, want Unauthenticated", err)
	}
}

// An app using go-spiffe's workloadapi gets its SVID and bundle from the
// sidecar's Workload API socket.
func TestWorkloadAPI(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	dir, err := os.MkdirTemp("", "wl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := dir + "/agent.sock"
	b0 := east.workload("backend-0", "backend", workloadOptions{workloadAPI: sock})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+sock)))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	sv, err := src.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	if want := b0.sc.Credentials().SVID().ID; sv.ID != want {
		t.Errorf("Workload API SVID: got %s, want %s", sv.ID, want)
	}
	if _, err := src.GetX509BundleForTrustDomain(east.td); err != nil {
		t.Errorf("Workload API bundle: %v", err)
	}
	if _, _, err := x509svid.Verify(sv.Certificates, src); err != nil {
		t.Errorf("SVID from the Workload API does not verify against its bundle: %v", err)
	}
}

// A new root enters the trust bundle (rotation's prepare step) with
// traffic flowing: every sidecar takes it, reports its digest, and no
// request fails.
func TestBundleUpdateUnderLoad(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	b0 := east.workload("backend-0", "backend", workloadOptions{})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	fe.waitEndpoints(t, "backend", 1)
	l := startLoad(fe.url("backend"), 4, 30*time.Second)
	time.Sleep(300 * time.Millisecond)

	ctx := context.Background()
	auth, err := ca.Open(ctx, ca.Config{Dir: east.caDir})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := auth.Prepare(ctx, ca.PrepareOptions{}); err != nil {
		t.Fatal(err)
	}
	next := auth.Bundle()
	auth.Close()
	if len(next.Roots()) != 2 {
		t.Fatalf("prepared bundle has %d roots, want 2", len(next.Roots()))
	}
	if err := local.WriteBundle(east.dir.Path, next); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 15*time.Second, "both sidecars hold the new bundle and the control plane sees them in sync", func() bool {
		if fe.sc.Credentials().Bundle().Digest() != next.Digest() || b0.sc.Credentials().Bundle().Digest() != next.Digest() {
			return false
		}
		st, err := east.admin.Status(ctx, &controlplanev1.StatusRequest{})
		if err != nil || st.GetBundleDigest() != next.Digest() {
			return false
		}
		for _, n := range st.GetNodes() {
			if n.GetBundleDigest() != next.Digest() {
				return false
			}
		}
		return true
	})
	time.Sleep(500 * time.Millisecond)
	ok, fail, errs := l.finish()
	if fail != 0 || ok == 0 {
		t.Errorf("requests during the bundle update: %d ok, %d failed (%v), want all ok", ok, fail, errs)
	}
}
