package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/registry"
	"github.com/straitmesh/strait/controlplane/store"
)

// TestClusterScopedCallersNeedTheirClustersIntermediate: an admin or
// gateway SVID of this cluster signed by another cluster's intermediate
// (any intermediate of the mesh may sign any SPIFFE ID) is refused; the
// same identity signed by this cluster's own is served.
func TestClusterScopedCallersNeedTheirClustersIntermediate(t *testing.T) {
	e := newTestEnv(t) // cluster "east"
	west := e.ca.IssuerFor(t, "west")
	info := &grpc.UnaryServerInfo{FullMethod: controlplanev1.AdminService_CreateRegistrationToken_FullMethodName}
	served := 0
	handler := func(context.Context, any) (any, error) {
		served++
		return &controlplanev1.CreateRegistrationTokenResponse{}, nil
	}
	call := func(id string, forged bool) error {
		s := e.ca.SVID(t, id, time.Hour)
		if forged {
			var err error
			if s, err = west.MintSVID(spiffeid.RequireFromString(id), time.Hour); err != nil {
				t.Fatal(err)
			}
		}
		ctx := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{PeerCertificates: s.Certificates}}})
		_, err := e.srv.unaryInterceptor(ctx, &controlplanev1.CreateRegistrationTokenRequest{Namespace: "default", ServiceAccount: "backend"}, info, handler)
		return err
	}
	admin := "spiffe://" + testTD + "/cluster/east/admin"
	if err := call(admin, true); err == nil {
		t.Fatalf("east's admin API served an admin SVID signed by west's intermediate: %v", err)
	}
	if err := call(admin, false); err != nil {
		t.Fatalf("east's own admin SVID: %v", err)
	}
	if served != 1 {
		t.Errorf("the handler ran %d times, want once", served)
	}
	info.FullMethod = controlplanev1.FederationService_ReportPeers_FullMethodName
	if err := call("spiffe://"+testTD+"/cluster/east/gateway", true); err == nil {
		t.Error("east's federation API served a gateway SVID signed by west's intermediate")
	}
}

// callerCtx is the context authenticate gives a call by id (an SVID of the
// test CA).
func callerCtx(t *testing.T, e *testEnv, id string) context.Context {
	t.Helper()
	sv := e.ca.SVID(t, id, time.Hour)
	sid := spiffeid.RequireFromString(id)
	return context.WithValue(context.Background(), callerKey{}, &caller{id: sid, info: identity.Classify(sid), leaf: sv.Certificates[0]})
}

// TestWatchUnderAnotherIdentityLeavesInstanceHealthy: a workload that
// opens and closes a Watch under another identity's instance name does not
// make that instance count as gone while its own stream stays open.
func TestWatchUnderAnotherIdentityLeavesInstanceHealthy(t *testing.T) {
	e := newTestEnv(t)
	var now atomic.Int64
	now.Store(time.Now().UnixNano())
	e.srv.cfg.Clock = func() time.Time { return time.Unix(0, now.Load()) }
	ctx := context.Background()
	victim := "spiffe://" + testTD + "/ns/default/sa/backend"
	attacker := "spiffe://" + testTD + "/ns/evil/sa/mallory"
	if err := e.reg.Register(ctx, registry.Instance{Name: "backend-0", Service: "backend", Namespace: "default", Address: "127.0.0.1:15006"}, spiffeid.RequireFromString(victim)); err != nil {
		t.Fatal(err)
	}
	if err := e.srv.rebuild(ctx); err != nil {
		t.Fatal(err)
	}
	// The victim's sidecar is connected and stays connected.
	vctx, vcancel := context.WithCancel(callerCtx(t, e, victim))
	defer vcancel()
	go e.srv.watch(vctx, &controlplanev1.WatchRequest{Node: "backend-0"}, func(*controlplanev1.WatchResponse) error { return nil })
	// The attacker names the victim's instance as its node, then leaves.
	actx, acancel := context.WithCancel(callerCtx(t, e, attacker))
	done := make(chan struct{})
	go func() {
		defer close(done)
		e.srv.watch(actx, &controlplanev1.WatchRequest{Node: "backend-0"}, func(*controlplanev1.WatchResponse) error { return nil })
	}()
	time.Sleep(100 * time.Millisecond)
	acancel()
	<-done
	now.Add(int64(3 * time.Second))
	if err := e.srv.rebuild(ctx); err != nil {
		t.Fatal(err)
	}
	e.srv.mu.Lock()
	w := e.srv.world
	e.srv.mu.Unlock()
	for _, in := range w.instances {
		if in.Name == "backend-0" && in.Health != controlplanev1.Health_HEALTH_HEALTHY {
			t.Fatalf("victim's instance backend-0 (owned by %s, its stream still open) is %s after %s opened and closed a Watch naming it", victim, in.Health, attacker)
		}
	}
}

// TestCertifyRefusedCSRKeepsToken: a CSR the CA refuses (here naming
// another identity) does not spend the single-use registration token: a
// retry with a good CSR succeeds.
func TestCertifyRefusedCSRKeepsToken(t *testing.T) {
	e := newTestEnv(t)
	tok, _, err := e.store.MintToken(store.TokenRequest{Namespace: "default", ServiceAccount: "backend", Service: "backend"})
	if err != nil {
		t.Fatal(err)
	}
	cred := &controlplanev1.Credential{Kind: &controlplanev1.Credential_RegistrationToken{RegistrationToken: tok}}
	other, _ := url.Parse("spiffe://" + testTD + "/ns/default/sa/other")
	_, bad := catest.CSR(t, &x509.CertificateRequest{URIs: []*url.URL{other}})
	_, err = identityServer{s: e.srv}.Certify(context.Background(), &controlplanev1.CertifyRequest{Credential: cred, Csr: bad})
	if err == nil {
		t.Fatal("CSR naming another identity was signed")
	}
	t.Logf("first (refused) Certify: %v", err)
	_, good := catest.CSR(t, &x509.CertificateRequest{})
	if _, err := (identityServer{s: e.srv}).Certify(context.Background(), &controlplanev1.CertifyRequest{Credential: cred, Csr: good}); err != nil {
		t.Fatalf("a refused CSR spent the single-use token: retry with a valid CSR: %v", err)
	}
}

// TestExplainSummaryNamesExcludedExporters: with no endpoint anywhere, the
// summary does not claim that no peer exports the service when some do
// but are left out (e.g. with no instance running there).
func TestExplainSummaryNamesExcludedExporters(t *testing.T) {
	r := &controlplanev1.ExplainResponse{Namespace: "default", Service: "payments"}
	if got := explainSummary(r); !strings.Contains(got, "no linked peer exports it") {
		t.Errorf("nothing anywhere: %q", got)
	}
	r.Excluded = []string{"west: exports it, but no instance of it runs there"}
	if got := explainSummary(r); strings.Contains(got, "no linked peer exports it") || !strings.Contains(got, "left out") {
		t.Errorf("an exporter left out: %q", got)
	}
}

// TestActivateGateNeedsPreparedRootInForce: when the CA prepared a root but
// this cluster failed to put the bundle announcing it in force, every
// cluster still holds the old bundle; the activate gate stays shut (peers
// would otherwise first see the new root in a bundle it signed, and refuse
// it), and status asks Sync to catch up.
func TestActivateGateNeedsPreparedRootInForce(t *testing.T) {
	e := newTestEnv(t)
	rca := &syncCountingCA{blockingCA: blockingCA{roots: []RootInfo{
		{ID: "r1", State: "active", InBundle: true, Fingerprint: svid.Fingerprint(e.ca.Bundle().Roots()[0])},
		{ID: "r2", State: "prepared", InBundle: true, Fingerprint: "sha256:r2"}, // not in the bundle in force
	}}}
	e.srv.cfg.RootCA = rca
	if err := e.srv.rebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	st := e.srv.rotationStatus()
	if st.GetReady() || !strings.Contains(st.GetNext(), "waiting for this cluster to put the bundle with root r2 in force") {
		t.Errorf("next %q ready=%v, want the activate gate shut", st.GetNext(), st.GetReady())
	}
	if rca.syncs == 0 {
		t.Error("status did not try to catch the bundle up")
	}
}

type syncCountingCA struct {
	blockingCA
	syncs int
}

func (c *syncCountingCA) Sync() error { c.syncs++; return nil }

// TestCertifyRepeatsATokenForTheSameKey: a Certify whose answer was lost
// is repeated with the same token and key and gets an SVID; the spent
// token with any other key gets nothing.
func TestCertifyRepeatsATokenForTheSameKey(t *testing.T) {
	e := newTestEnv(t)
	tok, _, err := e.store.MintToken(store.TokenRequest{Namespace: "default", ServiceAccount: "backend", Service: "backend"})
	if err != nil {
		t.Fatal(err)
	}
	cred := &controlplanev1.Credential{Kind: &controlplanev1.Credential_RegistrationToken{RegistrationToken: tok}}
	key, csr := catest.CSR(t, &x509.CertificateRequest{})
	for i := range 2 {
		resp, err := identityServer{s: e.srv}.Certify(context.Background(), &controlplanev1.CertifyRequest{Credential: cred, Csr: csr})
		if err != nil {
			t.Fatalf("Certify %d with the same key: %v", i+1, err)
		}
		leaf, err := x509.ParseCertificate(resp.GetCertificateChain()[0])
		if err != nil {
			t.Fatal(err)
		}
		if !key.PublicKey.Equal(leaf.PublicKey) {
			t.Fatalf("Certify %d: SVID for another key", i+1)
		}
	}
	_, other := catest.CSR(t, &x509.CertificateRequest{})
	if _, err := (identityServer{s: e.srv}).Certify(context.Background(), &controlplanev1.CertifyRequest{Credential: cred, Csr: other}); !errors.Is(err, ErrUnauthenticated) {
		t.Errorf("spent token with another key: %v, want unauthenticated", err)
	}
}
