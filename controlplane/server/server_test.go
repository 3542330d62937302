package server

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/registry"
	"github.com/straitmesh/strait/controlplane/resource"
	"github.com/straitmesh/strait/controlplane/store"
)

const (
	testTD      = "strait.example"
	testCluster = "east"
)

var td = spiffeid.RequireTrustDomainFromString(testTD)

// testIssuer adapts *ca.Issuer to Issuer, as internal/wiring does (which
// this package's tests cannot import: wiring imports server).
type testIssuer struct{ i *ca.Issuer }

func (t testIssuer) IssueSVID(csr []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	chain, err := t.i.IssueSVID(ca.SVIDRequest{CSR: csr, ID: id, TTL: ttl})
	if errors.Is(err, ca.ErrCSRRefused) {
		return nil, fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	return chain, err
}

func (t testIssuer) CheckRequest(csr []byte, id spiffeid.ID) error { return t.i.CheckRequest(csr, id) }

func (t testIssuer) MintSVID(id spiffeid.ID, ttl time.Duration) (*x509svid.SVID, error) {
	return t.i.MintSVID(id, ttl)
}

var _ Issuer = testIssuer{}

// testEnv is a Server on real dependencies: a catest CA, a store in a
// temporary directory and the local registry on it. The bundle can be
// swapped through bundle.
type testEnv struct {
	srv    *Server
	ca     *catest.CA
	store  *store.Store
	reg    *registry.Local
	bundle *atomic.Pointer[bundle.Bundle]
}

func openStore(t *testing.T) *store.Store {
	t.Helper()
	st, err := store.Open(filepath.Join(t.TempDir(), "state.db"), store.Options{})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func newTestEnv(t *testing.T) *testEnv {
	t.Helper()
	c := catest.New(t, testTD, catest.Options{Cluster: testCluster})
	st := openStore(t)
	reg, err := registry.NewLocal(registry.LocalConfig{Store: st, Cluster: testCluster})
	if err != nil {
		t.Fatalf("registry.NewLocal: %v", err)
	}
	cur := &atomic.Pointer[bundle.Bundle]{}
	cur.Store(c.Bundle())
	srv, err := New(Config{
		Cluster: testCluster, TrustDomain: td, Issuer: testIssuer{c.Issuer}, Bundle: cur.Load,
		Store: st, Registry: reg,
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return &testEnv{srv: srv, ca: c, store: st, reg: reg, bundle: cur}
}

func TestNewValidatesConfig(t *testing.T) {
	c := catest.New(t, testTD, catest.Options{Cluster: testCluster})
	st := openStore(t)
	reg, err := registry.NewLocal(registry.LocalConfig{Store: st, Cluster: testCluster})
	if err != nil {
		t.Fatalf("registry.NewLocal: %v", err)
	}
	valid := func() Config {
		return Config{Cluster: testCluster, TrustDomain: td, Issuer: testIssuer{c.Issuer}, Bundle: c.Bundle, Store: st, Registry: reg}
	}
	tests := []struct {
		name    string
		mutate  func(*Config)
		wantErr string // empty: New succeeds
	}{
		{name: "valid", mutate: func(*Config) {}},
		{name: "no cluster", mutate: func(c *Config) { c.Cluster = "" }, wantErr: "cluster name required"},
		{name: "bad cluster name", mutate: func(c *Config) { c.Cluster = "East_1" }, wantErr: "cluster name"},
		{name: "no trust domain", mutate: func(c *Config) { c.TrustDomain = spiffeid.TrustDomain{} }, wantErr: "trust domain required"},
		{name: "no issuer", mutate: func(c *Config) { c.Issuer = nil }, wantErr: "issuer required"},
		{name: "no bundle", mutate: func(c *Config) { c.Bundle = nil }, wantErr: "bundle source required"},
		{name: "no store", mutate: func(c *Config) { c.Store = nil }, wantErr: "store required"},
		{name: "no registry", mutate: func(c *Config) { c.Registry = nil }, wantErr: "registry required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := valid()
			tt.mutate(&cfg)
			s, err := New(cfg)
			if tt.wantErr == "" {
				if err != nil || s == nil {
					t.Fatalf("New: got (%v, %v), want a server", s, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("New: got error %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestToStatus(t *testing.T) {
	existing := status.Error(codes.ResourceExhausted, "slow down")
	tests := []struct {
		name string
		err  error
		want codes.Code
	}{
		{name: "unauthenticated", err: fmt.Errorf("%w: no SVID", ErrUnauthenticated), want: codes.Unauthenticated},
		{name: "permission denied", err: fmt.Errorf("%w: not an admin", ErrPermissionDenied), want: codes.PermissionDenied},
		{name: "bad request", err: fmt.Errorf("%w: csr is required", ErrBadRequest), want: codes.InvalidArgument},
		{name: "store not found", err: fmt.Errorf("delete: %w", store.ErrNotFound), want: codes.NotFound},
		{name: "store token invalid", err: store.ErrTokenInvalid, want: codes.Unauthenticated},
		{name: "store token expired", err: store.ErrTokenExpired, want: codes.Unauthenticated},
		{name: "store token used", err: fmt.Errorf("redeem: %w", store.ErrTokenUsed), want: codes.Unauthenticated},
		{name: "store instance owned", err: fmt.Errorf("register: %w", store.ErrInstanceOwned), want: codes.PermissionDenied},
		{name: "store invalid", err: store.ErrInvalid, want: codes.InvalidArgument},
		{name: "registry invalid", err: &registry.FieldError{Field: "address", Reason: "required"}, want: codes.InvalidArgument},
		{name: "registry permission denied", err: fmt.Errorf("%w: other namespace", registry.ErrPermissionDenied), want: codes.PermissionDenied},
		{name: "context canceled", err: fmt.Errorf("list: %w", context.Canceled), want: codes.Canceled},
		{name: "context deadline", err: context.DeadlineExceeded, want: codes.DeadlineExceeded},
		{name: "plain error", err: errors.New("disk on fire"), want: codes.Internal},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := toStatus(tt.err)
			st, ok := status.FromError(got)
			if !ok {
				t.Fatalf("toStatus(%v) = %v: not a status error", tt.err, got)
			}
			if st.Code() != tt.want {
				t.Errorf("code: got %v, want %v", st.Code(), tt.want)
			}
			// The sentinel's words are in the code, not repeated in the message.
			if !strings.HasSuffix(tt.err.Error(), st.Message()) || strings.HasPrefix(st.Message(), "server: ") && errors.Is(tt.err, ErrBadRequest) {
				t.Errorf("message: got %q, want the end of %q", st.Message(), tt.err.Error())
			}
		})
	}

	t.Run("nil", func(t *testing.T) {
		if got := toStatus(nil); got != nil {
			t.Errorf("got %v, want nil", got)
		}
	})
	t.Run("status error passes through", func(t *testing.T) {
		if got := toStatus(existing); got != existing {
			t.Errorf("got %v, want the same error %v", got, existing)
		}
	})
}

// withCaller puts a verified caller in ctx, as authenticate does.
func withCaller(ctx context.Context, id string) context.Context {
	if id == "" {
		return ctx
	}
	sid := spiffeid.RequireFromString(id)
	return context.WithValue(ctx, callerKey{}, &caller{id: sid, info: identity.Classify(sid)})
}

func TestAuthorize(t *testing.T) {
	e := newTestEnv(t)
	const (
		none         = ""
		workload     = "spiffe://" + testTD + "/ns/default/sa/web"
		admin        = "spiffe://" + testTD + "/cluster/" + testCluster + "/admin"
		otherAdmin   = "spiffe://" + testTD + "/cluster/west/admin"
		gateway      = "spiffe://" + testTD + "/cluster/" + testCluster + "/gateway"
		controlplane = "spiffe://" + testTD + "/cluster/" + testCluster + "/controlplane"
		other        = "spiffe://" + testTD + "/some/other/thing"
	)
	callers := []struct{ name, id string }{
		{"no caller", none}, {"workload", workload}, {"admin", admin}, {"other cluster admin", otherAdmin},
		{"gateway", gateway}, {"controlplane", controlplane}, {"other", other},
	}
	// want: nil, ErrUnauthenticated or ErrPermissionDenied, per caller.
	certifyOnly := map[string]error{}
	discovery := map[string]error{none: ErrUnauthenticated, workload: nil, admin: ErrPermissionDenied, otherAdmin: ErrPermissionDenied,
		gateway: ErrPermissionDenied, controlplane: ErrPermissionDenied, other: ErrPermissionDenied}
	adminOnly := map[string]error{none: ErrUnauthenticated, workload: ErrPermissionDenied, admin: nil, otherAdmin: ErrPermissionDenied,
		gateway: ErrPermissionDenied, controlplane: ErrPermissionDenied, other: ErrPermissionDenied}
	methods := []struct {
		method string
		want   map[string]error
	}{
		{controlplanev1.IdentityService_Certify_FullMethodName, certifyOnly},
		{controlplanev1.DiscoveryService_Register_FullMethodName, discovery},
		{controlplanev1.DiscoveryService_ReportHealth_FullMethodName, discovery},
		{controlplanev1.DiscoveryService_Deregister_FullMethodName, discovery},
		{controlplanev1.DiscoveryService_Watch_FullMethodName, discovery},
		{controlplanev1.AdminService_Apply_FullMethodName, adminOnly},
		{controlplanev1.AdminService_List_FullMethodName, adminOnly},
		{controlplanev1.AdminService_Delete_FullMethodName, adminOnly},
		{controlplanev1.AdminService_CreateRegistrationToken_FullMethodName, adminOnly},
		{controlplanev1.AdminService_Status_FullMethodName, adminOnly},
		// A method the server does not know falls to the strictest rule.
		{"/strait.controlplane.v1.Unknown/Method", adminOnly},
	}
	for _, m := range methods {
		for _, c := range callers {
			t.Run(m.method+"/"+c.name, func(t *testing.T) {
				want := m.want[c.id]
				err := e.srv.authorize(withCaller(t.Context(), c.id), m.method)
				switch {
				case want == nil && err != nil:
					t.Errorf("got %v, want nil", err)
				case want != nil && !errors.Is(err, want):
					t.Errorf("got %v, want an error wrapping %v", err, want)
				}
			})
		}
	}
}

func TestSnapshotFor(t *testing.T) {
	mkInst := func(name, svc, ns, addr string, p controlplanev1.Protocol) registry.Instance {
		return registry.Instance{Name: name, Service: svc, Namespace: ns, Address: addr, Cluster: testCluster,
			SPIFFEID: "spiffe://" + testTD + "/ns/" + ns + "/sa/" + svc, Protocol: p, Health: controlplanev1.Health_HEALTH_HEALTHY}
	}
	backendDefault0 := mkInst("backend-0", "backend", "default", "10.0.0.1:15006", controlplanev1.Protocol_PROTOCOL_TCP)
	backendDefault1 := mkInst("backend-1", "backend", "default", "10.0.0.2:15006", controlplanev1.Protocol_PROTOCOL_TCP)
	backendShop := mkInst("backend-shop-0", "backend", "shop", "10.0.1.1:15006", controlplanev1.Protocol_PROTOCOL_TCP)
	frontend := mkInst("frontend-0", "frontend", "default", "10.0.0.3:15006", controlplanev1.Protocol_PROTOCOL_HTTP)

	connect := resource.Duration(3 * time.Second)
	backendPolicy := (&resource.TrafficPolicy{Spec: resource.TrafficPolicySpec{Service: "backend",
		Timeouts: &resource.Timeouts{Connect: &connect}}}).Proto()

	allowFrontend := &resource.AuthorizationPolicy{TrustDomain: td,
		Metadata: resource.Metadata{Name: "allow-frontend", Namespace: "default"},
		Spec: resource.AuthorizationPolicySpec{Service: "backend",
			From: []resource.Source{{Namespace: "default", ServiceAccount: "frontend"}}}}
	denyShop := &resource.AuthorizationPolicy{TrustDomain: td,
		Metadata: resource.Metadata{Name: "deny-shop", Namespace: "default"},
		Spec: resource.AuthorizationPolicySpec{Service: "backend", Action: resource.ActionDeny,
			From: []resource.Source{{Namespace: "shop"}}}}
	shopOnly := &resource.AuthorizationPolicy{TrustDomain: td,
		Metadata: resource.Metadata{Name: "shop-only", Namespace: "shop"},
		Spec: resource.AuthorizationPolicySpec{Service: "backend",
			From: []resource.Source{{Namespace: "shop"}}}}
	frontendPolicy := &resource.AuthorizationPolicy{TrustDomain: td,
		Metadata: resource.Metadata{Name: "frontend-open", Namespace: "default"},
		Spec: resource.AuthorizationPolicySpec{Service: "frontend",
			From: []resource.Source{{SPIFFEIDPrefix: "spiffe://" + testTD + "/ns/"}}}}

	c := catest.New(t, testTD, catest.Options{Cluster: testCluster})
	tb := bundleProto(c.Bundle())
	w := &world{
		version:   7,
		instances: []registry.Instance{backendDefault0, backendDefault1, backendShop, frontend},
		traffic:   map[string]*controlplanev1.TrafficPolicy{"default/backend": backendPolicy},
		authz: map[string][]*resource.AuthorizationPolicy{
			"default/backend":  {denyShop, allowFrontend},
			"shop/backend":     {shopOnly},
			"default/frontend": {frontendPolicy},
		},
		bundle: tb,
	}

	type wantSvc struct {
		name, ns  string
		protocol  controlplanev1.Protocol
		instances []string
		policy    *controlplanev1.TrafficPolicy
	}
	backendHere := wantSvc{name: "backend", ns: "default", protocol: controlplanev1.Protocol_PROTOCOL_TCP,
		instances: []string{"backend-0", "backend-1"}, policy: backendPolicy}
	tests := []struct {
		name      string
		ns        string
		req       *controlplanev1.WatchRequest
		wantSvcs  []wantSvc
		wantAllow []string // rule policies
		wantDeny  []string
	}{
		{
			name:     "upstream in caller's namespace",
			ns:       "default",
			req:      &controlplanev1.WatchRequest{Node: "n", Upstreams: []string{"backend"}},
			wantSvcs: []wantSvc{backendHere},
		},
		{
			name: "qualified upstream resolves to its namespace",
			ns:   "default",
			req:  &controlplanev1.WatchRequest{Node: "n", Upstreams: []string{"backend.shop"}},
			wantSvcs: []wantSvc{{name: "backend.shop", ns: "shop", protocol: controlplanev1.Protocol_PROTOCOL_TCP,
				instances: []string{"backend-shop-0"}, policy: resource.DefaultTrafficPolicy()}},
		},
		{
			name: "caller in another namespace resolves there",
			ns:   "shop",
			req:  &controlplanev1.WatchRequest{Node: "n", Upstreams: []string{"backend"}},
			wantSvcs: []wantSvc{{name: "backend", ns: "shop", protocol: controlplanev1.Protocol_PROTOCOL_TCP,
				instances: []string{"backend-shop-0"}, policy: resource.DefaultTrafficPolicy()}},
		},
		{
			name: "unknown upstream has no endpoints and the default policy",
			ns:   "default",
			req:  &controlplanev1.WatchRequest{Node: "n", Upstreams: []string{"nowhere"}},
			wantSvcs: []wantSvc{{name: "nowhere", ns: "default", protocol: controlplanev1.Protocol_PROTOCOL_HTTP,
				policy: resource.DefaultTrafficPolicy()}},
		},
		{
			name: "duplicates appear once, sorted",
			ns:   "default",
			req:  &controlplanev1.WatchRequest{Node: "n", Upstreams: []string{"frontend", "backend", "frontend", "backend"}},
			wantSvcs: []wantSvc{backendHere, {name: "frontend", ns: "default", protocol: controlplanev1.Protocol_PROTOCOL_HTTP,
				instances: []string{"frontend-0"}, policy: resource.DefaultTrafficPolicy()}},
		},
		{
			name: "no upstreams",
			ns:   "default",
			req:  &controlplanev1.WatchRequest{Node: "n"},
		},
		{
			name:      "authorization for the node's own service only",
			ns:        "default",
			req:       &controlplanev1.WatchRequest{Node: "n", Service: "backend"},
			wantAllow: []string{"default/allow-frontend"},
			wantDeny:  []string{"default/deny-shop"},
		},
		{
			name:      "authorization in the caller's namespace",
			ns:        "shop",
			req:       &controlplanev1.WatchRequest{Node: "n", Service: "backend"},
			wantAllow: []string{"shop/shop-only"},
		},
		{
			name: "service without policies",
			ns:   "default",
			req:  &controlplanev1.WatchRequest{Node: "n", Service: "nothing"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			upstreamsBefore := slices.Clone(tt.req.GetUpstreams())
			snap := snapshotFor(w, testCluster, tt.ns, tt.req)

			if !slices.Equal(tt.req.GetUpstreams(), upstreamsBefore) {
				t.Errorf("request upstreams: got %v after the call, want %v (unchanged)", tt.req.GetUpstreams(), upstreamsBefore)
			}
			if snap.GetVersion() != 0 {
				t.Errorf("version: got %d, want 0 (set by watch)", snap.GetVersion())
			}
			if snap.GetCluster() != testCluster {
				t.Errorf("cluster: got %q, want %q", snap.GetCluster(), testCluster)
			}
			if !proto.Equal(snap.GetBundle(), tb) {
				t.Errorf("bundle: got %v, want %v", snap.GetBundle(), tb)
			}

			if got, want := len(snap.GetServices()), len(tt.wantSvcs); got != want {
				t.Fatalf("services: got %d (%v), want %d", got, snap.GetServices(), want)
			}
			for i, want := range tt.wantSvcs {
				got := snap.GetServices()[i]
				if got.GetName() != want.name || got.GetNamespace() != want.ns {
					t.Errorf("service %d: got %s in %s, want %s in %s", i, got.GetName(), got.GetNamespace(), want.name, want.ns)
				}
				if got.GetProtocol() != want.protocol {
					t.Errorf("service %s protocol: got %v, want %v", want.name, got.GetProtocol(), want.protocol)
				}
				var insts []string
				for _, ep := range got.GetEndpoints() {
					insts = append(insts, ep.GetInstance())
				}
				if !slices.Equal(insts, want.instances) {
					t.Errorf("service %s endpoints: got %v, want %v", want.name, insts, want.instances)
				}
				if !proto.Equal(got.GetPolicy(), want.policy) {
					t.Errorf("service %s policy: got %v, want %v", want.name, got.GetPolicy(), want.policy)
				}
			}

			if snap.GetAuthorization() == nil {
				t.Fatal("authorization: got nil, want a message (empty means any member may call)")
			}
			var allow, deny []string
			for _, r := range snap.GetAuthorization().GetAllow() {
				allow = append(allow, r.GetPolicy())
			}
			for _, r := range snap.GetAuthorization().GetDeny() {
				deny = append(deny, r.GetPolicy())
			}
			if !slices.Equal(allow, tt.wantAllow) {
				t.Errorf("allow rules: got %v, want %v", allow, tt.wantAllow)
			}
			if !slices.Equal(deny, tt.wantDeny) {
				t.Errorf("deny rules: got %v, want %v", deny, tt.wantDeny)
			}
		})
	}

	t.Run("endpoint carries the instance", func(t *testing.T) {
		snap := snapshotFor(w, testCluster, "default", &controlplanev1.WatchRequest{Node: "n", Upstreams: []string{"backend"}})
		got := snap.GetServices()[0].GetEndpoints()[0]
		want := registry.ToEndpoint(backendDefault0)
		if !proto.Equal(got, want) {
			t.Errorf("got %v, want %v", got, want)
		}
	})
	t.Run("allow rule resolves the namespace shorthand", func(t *testing.T) {
		snap := snapshotFor(w, testCluster, "default", &controlplanev1.WatchRequest{Node: "n", Service: "backend"})
		want := []string{"spiffe://" + testTD + "/ns/default/sa/frontend"}
		if got := snap.GetAuthorization().GetAllow()[0].GetSpiffeIds(); !slices.Equal(got, want) {
			t.Errorf("got %v, want %v", got, want)
		}
	})
}

// applyYAML applies YAML resources through the store as the admin API does.
func applyYAML(t *testing.T, st *store.Store, doc string) []store.ApplyResult {
	t.Helper()
	objs, err := resource.Decode([]byte(doc))
	if err != nil {
		t.Fatalf("resource.Decode: %v", err)
	}
	var records []store.Resource
	for _, obj := range objs {
		if _, err := resource.Validate(obj, td); err != nil {
			t.Fatalf("resource.Validate: %v", err)
		}
		wire, err := resource.ToProto(obj)
		if err != nil {
			t.Fatalf("resource.ToProto: %v", err)
		}
		records = append(records, store.Resource{APIVersion: wire.GetApiVersion(), Kind: wire.GetKind(),
			Namespace: wire.GetNamespace(), Name: wire.GetName(), Spec: wire.GetSpecJson()})
	}
	res, err := st.Apply(records)
	if err != nil {
		t.Fatalf("store.Apply: %v", err)
	}
	return res
}

const backendPolicyYAML = `apiVersion: strait.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: backend
  namespace: default
spec:
  service: backend
  timeouts:
    connect: 2s
`

func TestRebuildBumpsVersionOnlyOnChange(t *testing.T) {
	e := newTestEnv(t)
	s := e.srv
	ctx := t.Context()
	version := func() uint64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.version
	}
	webID := spiffeid.RequireFromString("spiffe://" + testTD + "/ns/default/sa/backend")

	steps := []struct {
		name     string
		change   func(t *testing.T)
		wantBump bool
	}{
		{name: "first build", change: func(*testing.T) {}, wantBump: true},
		{name: "no change", change: func(*testing.T) {}},
		{name: "still no change", change: func(*testing.T) {}},
		{name: "apply a TrafficPolicy", change: func(t *testing.T) {
			if res := applyYAML(t, e.store, backendPolicyYAML); res[0].Action != store.ActionCreated {
				t.Fatalf("apply: got action %q, want %q", res[0].Action, store.ActionCreated)
			}
		}, wantBump: true},
		{name: "re-apply the same spec", change: func(t *testing.T) {
			if res := applyYAML(t, e.store, backendPolicyYAML); res[0].Action != store.ActionUnchanged {
				t.Fatalf("apply: got action %q, want %q", res[0].Action, store.ActionUnchanged)
			}
		}},
		{name: "change the TrafficPolicy", change: func(t *testing.T) {
			applyYAML(t, e.store, strings.Replace(backendPolicyYAML, "connect: 2s", "connect: 5s", 1))
		}, wantBump: true},
		{name: "register an instance", change: func(t *testing.T) {
			inst := registry.Instance{Name: "backend-0", Service: "backend", Namespace: "default", Address: "10.0.0.1:15006"}
			if err := e.reg.Register(t.Context(), inst, webID); err != nil {
				t.Fatalf("Register: %v", err)
			}
		}, wantBump: true},
		{name: "trust bundle sequence changes", change: func(t *testing.T) {
			cur := e.bundle.Load()
			next, err := bundle.New(cur.TrustDomain(), cur.Sequence()+1, cur.Roots())
			if err != nil {
				t.Fatalf("bundle.New: %v", err)
			}
			e.bundle.Store(next)
		}, wantBump: true},
		{name: "delete the TrafficPolicy", change: func(t *testing.T) {
			if err := e.store.Delete(resource.KindTrafficPolicy, "default", "backend"); err != nil {
				t.Fatalf("Delete: %v", err)
			}
		}, wantBump: true},
		{name: "no change at the end", change: func(*testing.T) {}},
	}
	for _, step := range steps {
		t.Run(step.name, func(t *testing.T) {
			before := version()
			step.change(t)
			if err := s.rebuild(ctx); err != nil {
				t.Fatalf("rebuild: %v", err)
			}
			after := version()
			switch {
			case step.wantBump && after <= before:
				t.Errorf("version: got %d after %d, want it to increase", after, before)
			case !step.wantBump && after != before:
				t.Errorf("version: got %d, want %d (unchanged)", after, before)
			}
			s.mu.Lock()
			wv := s.world.version
			s.mu.Unlock()
			if wv != after {
				t.Errorf("world version: got %d, want %d", wv, after)
			}
		})
	}
}

func TestRebuildReadsPolicy(t *testing.T) {
	e := newTestEnv(t)
	applyYAML(t, e.store, backendPolicyYAML)
	if err := e.srv.rebuild(t.Context()); err != nil {
		t.Fatalf("rebuild: %v", err)
	}
	e.srv.mu.Lock()
	w := e.srv.world
	e.srv.mu.Unlock()
	p := w.traffic["default/backend"]
	if p == nil {
		t.Fatalf("traffic: got %v, want a policy for default/backend", w.traffic)
	}
	if got, want := p.GetConnectTimeout().AsDuration(), 2*time.Second; got != want {
		t.Errorf("connect timeout: got %v, want %v", got, want)
	}
	if got, want := w.bundle.GetDigest(), e.ca.Bundle().Digest(); got != want {
		t.Errorf("bundle digest: got %q, want %q", got, want)
	}
}

func TestRebuildVersionSurvivesRestart(t *testing.T) {
	e := newTestEnv(t)
	if err := e.srv.rebuild(t.Context()); err != nil {
		t.Fatalf("rebuild: %v", err)
	}
	first := e.srv.version
	// A second server on the same store, as after a restart.
	again, err := New(Config{Cluster: testCluster, TrustDomain: td, Issuer: testIssuer{e.ca.Issuer}, Bundle: e.bundle.Load,
		Store: e.store, Registry: e.reg})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := again.rebuild(t.Context()); err != nil {
		t.Fatalf("rebuild: %v", err)
	}
	if again.version <= first {
		t.Errorf("version after restart: got %d, want more than %d", again.version, first)
	}
}
