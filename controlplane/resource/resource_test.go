package resource

import (
	"encoding/json"
	"errors"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

var td = spiffeid.RequireTrustDomainFromString("strait.example")

// example is the documentation's example: a full TrafficPolicy and an
// AuthorizationPolicy using every kind of source.
const example = `apiVersion: strait.dev/v1alpha1
kind: TrafficPolicy
metadata:
  name: backend
  namespace: default
spec:
  service: backend
  timeouts:
    connect: 1s
    request: 15s
  retries:
    attempts: 2
    perTryTimeout: 2s
    retryOn: [connect-failure, reset, 5xx, gateway-error, retriable-4xx]
    budget:
      percent: 20
      minPerSecond: 10
  loadBalancing:
    policy: P2C_EWMA
  outlierDetection:
    consecutiveErrors: 5
    baseEjectionTime: 30s
    maxEjectionPercent: 50
  connectionLimits:
    maxConnections: 1024
    maxPendingRequests: 1024
    maxRequests: 1024
---
apiVersion: strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: backend-callers, namespace: default}
spec:
  service: backend
  action: ALLOW
  from:
    - spiffeID: spiffe://strait.example/ns/default/sa/frontend
    - spiffeIDPrefix: spiffe://strait.example/ns/ops/
    - namespace: monitoring
      serviceAccount: prometheus
    - namespace: audit
`

// trafficDoc returns a TrafficPolicy document named backend with the given
// spec lines (indented by two spaces).
func trafficDoc(spec string) string {
	return "apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: backend}\nspec:\n" + spec
}

// authzDoc returns an AuthorizationPolicy document named callers for service
// backend with the given from list (indented by four spaces) and extra spec
// lines.
func authzDoc(extra, from string) string {
	return "apiVersion: strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: callers}\nspec:\n  service: backend\n" + extra + "  from:\n" + from
}

// mustLoad decodes and validates, failing the test on error.
func mustLoad(t *testing.T, in string) []Typed {
	t.Helper()
	typed, err := Load([]byte(in), td)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return typed
}

func dur(d time.Duration) *durationpb.Duration { return durationpb.New(d) }

func TestDecodeAndValidateExample(t *testing.T) {
	objs, err := Decode([]byte(example))
	if err != nil {
		t.Fatalf("Decode: %v", err)
	}
	if got, want := len(objs), 2; got != want {
		t.Fatalf("got %d objects, want %d", got, want)
	}
	for i, want := range []struct {
		kind, namespace, name string
		typ                   any
	}{
		{KindTrafficPolicy, "default", "backend", &TrafficPolicy{}},
		{KindAuthorizationPolicy, "default", "backend-callers", &AuthorizationPolicy{}},
	} {
		obj := objs[i]
		if obj.Doc != i+1 || obj.Kind != want.kind || obj.Metadata.Name != want.name || obj.APIVersion != APIVersion {
			t.Errorf("object %d: got doc %d %s %s %s, want doc %d %s %s %s", i, obj.Doc, obj.APIVersion, obj.Kind, obj.Metadata.Name, i+1, APIVersion, want.kind, want.name)
		}
		typed, err := Validate(obj, td)
		if err != nil {
			t.Fatalf("Validate object %d: %v", i, err)
		}
		if reflect.TypeOf(typed) != reflect.TypeOf(want.typ) {
			t.Errorf("object %d: got %T, want %T", i, typed, want.typ)
		}
		if ns, svc := ServiceKey(typed); ns != want.namespace || svc != "backend" {
			t.Errorf("object %d: ServiceKey got %s/%s, want %s/backend", i, ns, svc, want.namespace)
		}
		if typed.Kind() != want.kind {
			t.Errorf("object %d: Kind() got %s, want %s", i, typed.Kind(), want.kind)
		}
	}
}

func TestNamespaceDefaults(t *testing.T) {
	typed := mustLoad(t, trafficDoc("  service: backend\n"))
	if got := typed[0].ObjectMeta().Namespace; got != "default" {
		t.Errorf("namespace: got %q, want %q", got, "default")
	}
}

func TestTrafficPolicyProto(t *testing.T) {
	tests := []struct {
		name string
		spec string
		want func(p *controlplanev1.TrafficPolicy)
	}{
		{
			name: "only the service: all defaults",
			spec: "  service: backend\n",
			want: func(*controlplanev1.TrafficPolicy) {},
		},
		{
			name: "empty sections: all defaults",
			spec: "  service: backend\n  timeouts: {}\n  retries: {budget: {}}\n  loadBalancing: {}\n  outlierDetection: {}\n  connectionLimits: {}\n",
			want: func(*controlplanev1.TrafficPolicy) {},
		},
		{
			name: "null sections: all defaults",
			spec: "  service: backend\n  timeouts:\n  retries: null\n",
			want: func(*controlplanev1.TrafficPolicy) {},
		},
		{
			name: "retries disabled, others default",
			spec: "  service: backend\n  retries: {attempts: 0}\n",
			want: func(p *controlplanev1.TrafficPolicy) { p.Retries.Attempts = 0 },
		},
		{
			name: "zero per-try timeout is unset on the wire",
			spec: "  service: backend\n  retries: {perTryTimeout: 0s}\n",
			want: func(*controlplanev1.TrafficPolicy) {},
		},
		{
			name: "every field set",
			spec: `  service: backend
  timeouts: {connect: 500ms, request: 1m30s}
  retries:
    attempts: 10
    perTryTimeout: 2s
    retryOn: [5xx, retriable-4xx]
    budget: {percent: 100, minPerSecond: 0}
  loadBalancing: {policy: ROUND_ROBIN}
  outlierDetection: {consecutiveErrors: 1, baseEjectionTime: 1m, maxEjectionPercent: 0}
  connectionLimits: {maxConnections: 1, maxPendingRequests: 2, maxRequests: 4294967295}
`,
			want: func(p *controlplanev1.TrafficPolicy) {
				p.ConnectTimeout = dur(500 * time.Millisecond)
				p.RequestTimeout = dur(90 * time.Second)
				p.Retries = &controlplanev1.RetryPolicy{Attempts: 10, PerTryTimeout: dur(2 * time.Second),
					RetryOn: []string{"5xx", "retriable-4xx"}, BudgetPercent: 100, MinRetriesPerSecond: 0}
				p.LoadBalancer = controlplanev1.LoadBalancer_LOAD_BALANCER_ROUND_ROBIN
				p.OutlierDetection = &controlplanev1.OutlierDetection{ConsecutiveErrors: 1, BaseEjectionTime: dur(time.Minute)}
				p.ConnectionLimits = &controlplanev1.ConnectionLimits{MaxConnections: 1, MaxPendingRequests: 2, MaxRequests: 4294967295}
			},
		},
		{
			name: "least request",
			spec: "  service: backend\n  loadBalancing: {policy: LEAST_REQUEST}\n",
			want: func(p *controlplanev1.TrafficPolicy) {
				p.LoadBalancer = controlplanev1.LoadBalancer_LOAD_BALANCER_LEAST_REQUEST
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			typed := mustLoad(t, trafficDoc(tt.spec))
			tp, ok := typed[0].(*TrafficPolicy)
			if !ok {
				t.Fatalf("got %T, want *TrafficPolicy", typed[0])
			}
			want := DefaultTrafficPolicy()
			tt.want(want)
			if got := tp.Proto(); !proto.Equal(got, want) {
				t.Errorf("got  %v\nwant %v", got, want)
			}
		})
	}
}

func TestDefaultTrafficPolicy(t *testing.T) {
	want := &controlplanev1.TrafficPolicy{
		ConnectTimeout: dur(time.Second),
		RequestTimeout: dur(15 * time.Second),
		Retries: &controlplanev1.RetryPolicy{
			Attempts:            2,
			RetryOn:             []string{"connect-failure", "reset", "gateway-error"},
			BudgetPercent:       20,
			MinRetriesPerSecond: 10,
		},
		LoadBalancer:     controlplanev1.LoadBalancer_LOAD_BALANCER_P2C_EWMA,
		OutlierDetection: &controlplanev1.OutlierDetection{ConsecutiveErrors: 5, BaseEjectionTime: dur(30 * time.Second), MaxEjectionPercent: 50},
		ConnectionLimits: &controlplanev1.ConnectionLimits{MaxConnections: 1024, MaxPendingRequests: 1024, MaxRequests: 1024},
		Failover:         &controlplanev1.Failover{SlowStart: dur(10 * time.Second), Staleness: dur(30 * time.Second)},
	}
	if got := DefaultTrafficPolicy(); !proto.Equal(got, want) {
		t.Errorf("got  %v\nwant %v", got, want)
	}
	// The defaults are fresh each time: changing one result leaves the next alone.
	DefaultTrafficPolicy().Retries.RetryOn[0] = "changed"
	if got := DefaultTrafficPolicy().Retries.RetryOn[0]; got != "connect-failure" {
		t.Errorf("defaults were shared: got %q, want %q", got, "connect-failure")
	}
	var nilPolicy *TrafficPolicy
	if got := nilPolicy.Proto(); !proto.Equal(got, want) {
		t.Errorf("nil policy: got %v, want the defaults", got)
	}
}

// wantField is an expected field error: its path and a part of its message.
type wantField struct{ path, msg string }

// checkFields compares an *Error's fields to want: the same paths in any
// order, each message containing the wanted text.
func checkFields(t *testing.T, err error, want []wantField) *Error {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want %v", want)
	}
	e, ok := errors.AsType[*Error](err)
	if !ok {
		t.Fatalf("got %T %v, want an *Error", err, err)
	}
	got := map[string]string{}
	for _, f := range e.Fields {
		got[f.Path] = f.Message
	}
	for _, w := range want {
		msg, ok := got[w.path]
		if !ok {
			t.Errorf("no error for path %q; got:\n%v", w.path, err)
			continue
		}
		if !strings.Contains(msg, w.msg) {
			t.Errorf("%s: got message %q, want it to contain %q", w.path, msg, w.msg)
		}
	}
	if len(e.Fields) != len(want) {
		t.Errorf("got %d errors, want %d:\n%v", len(e.Fields), len(want), err)
	}
	return e
}

func TestValidateErrors(t *testing.T) {
	tests := []struct {
		name string
		doc  string
		want []wantField
	}{
		// Unknown fields.
		{"unknown field with suggestion", trafficDoc("  service: backend\n  retries: {atempts: 2}\n"),
			[]wantField{{"spec.retries.atempts", `unknown field; did you mean "attempts"?`}}},
		{"unknown field differing in case", trafficDoc("  service: backend\n  retries: {pertrytimeout: 1s}\n"),
			[]wantField{{"spec.retries.pertrytimeout", `did you mean "perTryTimeout"?`}}},
		{"unknown field without suggestion", trafficDoc("  service: backend\n  zzz: 1\n"),
			[]wantField{{"spec.zzz", "unknown field; known fields: service, timeouts, retries, loadBalancing, outlierDetection, connectionLimits"}}},
		{"unknown field with odd characters", trafficDoc("  service: backend\n  \"a b\": 1\n"),
			[]wantField{{`spec["a b"]`, "unknown field"}}},
		// Wrong types.
		{"string for integer", trafficDoc("  service: backend\n  retries: {attempts: two}\n"),
			[]wantField{{"spec.retries.attempts", `must be an integer, got "two"`}}},
		{"quoted number for integer", trafficDoc("  service: backend\n  retries: {attempts: \"2\"}\n"),
			[]wantField{{"spec.retries.attempts", `must be an integer, got "2"`}}},
		{"fraction for integer", trafficDoc("  service: backend\n  retries: {attempts: 1.5}\n"),
			[]wantField{{"spec.retries.attempts", "must be an integer, got 1.5"}}},
		{"scalar for object", trafficDoc("  service: backend\n  retries: 3\n"),
			[]wantField{{"spec.retries", "must be an object, got 3"}}},
		{"object for list", trafficDoc("  service: backend\n  retries: {retryOn: {a: b}}\n"),
			[]wantField{{"spec.retries.retryOn", "must be a list, got an object"}}},
		{"YAML boolean for string", trafficDoc("  service: yes\n"),
			[]wantField{{"spec.service", "must be a string, got true (YAML reads"}}},
		{"number for duration", trafficDoc("  service: backend\n  timeouts: {connect: 1}\n"),
			[]wantField{{"spec.timeouts.connect", `must be a duration such as "1s" or "500ms", got 1`}}},
		{"bad duration", trafficDoc("  service: backend\n  timeouts: {request: soon}\n"),
			[]wantField{{"spec.timeouts.request", `must be a duration such as "1s" or "500ms", got "soon"`}}},
		// Ranges.
		{"attempts above range", trafficDoc("  service: backend\n  retries: {attempts: 11}\n"),
			[]wantField{{"spec.retries.attempts", "must be between 0 and 10, got 11"}}},
		{"negative integer", trafficDoc("  service: backend\n  retries: {budget: {minPerSecond: -1}}\n"),
			[]wantField{{"spec.retries.budget.minPerSecond", "must be at least 0, got -1"}}},
		{"budget percent zero", trafficDoc("  service: backend\n  retries: {budget: {percent: 0}}\n"),
			[]wantField{{"spec.retries.budget.percent", "must be between 1 and 100, got 0"}}},
		{"beyond uint32", trafficDoc("  service: backend\n  connectionLimits: {maxRequests: 4294967296}\n"),
			[]wantField{{"spec.connectionLimits.maxRequests", "must be at least 1, got 4294967296"}}},
		{"huge number", trafficDoc("  service: backend\n  connectionLimits: {maxConnections: 1e300}\n"),
			[]wantField{{"spec.connectionLimits.maxConnections", "must be at least 1, got 1e+300"}}},
		{"zero connection limit", trafficDoc("  service: backend\n  connectionLimits: {maxPendingRequests: 0}\n"),
			[]wantField{{"spec.connectionLimits.maxPendingRequests", "must be at least 1, got 0"}}},
		{"ejection percent above 100", trafficDoc("  service: backend\n  outlierDetection: {maxEjectionPercent: 101}\n"),
			[]wantField{{"spec.outlierDetection.maxEjectionPercent", "must be between 0 and 100, got 101"}}},
		{"zero consecutive errors", trafficDoc("  service: backend\n  outlierDetection: {consecutiveErrors: 0}\n"),
			[]wantField{{"spec.outlierDetection.consecutiveErrors", "must be at least 1, got 0"}}},
		{"negative duration", trafficDoc("  service: backend\n  timeouts: {connect: -1s}\n"),
			[]wantField{{"spec.timeouts.connect", `must not be negative, got "-1s"`}}},
		{"zero timeout", trafficDoc("  service: backend\n  timeouts: {request: 0s}\n"),
			[]wantField{{"spec.timeouts.request", "must be positive, got 0s"}}},
		{"zero ejection time", trafficDoc("  service: backend\n  outlierDetection: {baseEjectionTime: 0s}\n"),
			[]wantField{{"spec.outlierDetection.baseEjectionTime", "must be positive, got 0s"}}},
		{"per-try above default request timeout", trafficDoc("  service: backend\n  retries: {perTryTimeout: 20s}\n"),
			[]wantField{{"spec.retries.perTryTimeout", "must not exceed the request timeout (15s), got 20s"}}},
		{"per-try above set request timeout", trafficDoc("  service: backend\n  timeouts: {request: 1s}\n  retries: {perTryTimeout: 2s}\n"),
			[]wantField{{"spec.retries.perTryTimeout", "must not exceed the request timeout (1s), got 2s"}}},
		// Required fields.
		{"missing service", trafficDoc("  timeouts: {connect: 1s}\n"),
			[]wantField{{"spec.service", "required"}}},
		{"null service", trafficDoc("  service: null\n"),
			[]wantField{{"spec.service", "required"}}},
		{"missing spec", "apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: backend}\n",
			[]wantField{{"spec", "required"}}},
		{"missing name", "apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nspec: {service: backend}\n",
			[]wantField{{"metadata.name", "required"}}},
		// Enumerations.
		{"bad load balancer", trafficDoc("  service: backend\n  loadBalancing: {policy: RANDOM}\n"),
			[]wantField{{"spec.loadBalancing.policy", `must be one of P2C_EWMA, LEAST_REQUEST, ROUND_ROBIN, got "RANDOM"`}}},
		{"load balancer in lower case", trafficDoc("  service: backend\n  loadBalancing: {policy: round_robin}\n"),
			[]wantField{{"spec.loadBalancing.policy", `did you mean "ROUND_ROBIN"?`}}},
		{"bad retry condition", trafficDoc("  service: backend\n  retries: {retryOn: [reset, 5XX]}\n"),
			[]wantField{{"spec.retries.retryOn[1]", `got "5XX"; did you mean "5xx"?`}}},
		{"duplicate retry condition", trafficDoc("  service: backend\n  retries: {retryOn: [reset, 5xx, reset]}\n"),
			[]wantField{{"spec.retries.retryOn[2]", `duplicate condition "reset"`}}},
		{"empty retry conditions", trafficDoc("  service: backend\n  retries: {retryOn: []}\n"),
			[]wantField{{"spec.retries.retryOn", "must list at least one condition"}}},
		{"bad action", authzDoc("  action: PERMIT\n", "    - namespace: ops\n"),
			[]wantField{{"spec.action", `must be one of ALLOW, DENY, got "PERMIT"`}}},
		// Names.
		{"bad service name", trafficDoc("  service: Backend_1\n"),
			[]wantField{{"spec.service", `must be a DNS-1123 label (lower-case letters, digits and '-', starting and ending with a letter or digit), got "Backend_1"`}}},
		{"bad name", strings.Replace(trafficDoc("  service: backend\n"), "name: backend", "name: -backend", 1),
			[]wantField{{"metadata.name", `must be a DNS-1123 label`}}},
		{"long name", strings.Replace(trafficDoc("  service: backend\n"), "name: backend", "name: "+strings.Repeat("a", 64), 1),
			[]wantField{{"metadata.name", "must be at most 63 characters, got 64"}}},
		{"bad namespace", strings.Replace(trafficDoc("  service: backend\n"), "name: backend", "name: backend, namespace: a.b", 1),
			[]wantField{{"metadata.namespace", `got "a.b"`}}},
		{"bad label key", strings.Replace(trafficDoc("  service: backend\n"), "name: backend", "name: backend, labels: {\"-x\": a}", 1),
			[]wantField{{`metadata.labels["-x"]`, "key name must be"}}},
		{"bad label prefix", strings.Replace(trafficDoc("  service: backend\n"), "name: backend", "name: backend, labels: {\"A_B/x\": a}", 1),
			[]wantField{{`metadata.labels["A_B/x"]`, "key prefix must be"}}},
		{"bad label value", strings.Replace(trafficDoc("  service: backend\n"), "name: backend", "name: backend, labels: {x: \"a b\"}", 1),
			[]wantField{{`metadata.labels["x"]`, `value must be empty or`}}},
		// Envelope.
		{"bad apiVersion", strings.Replace(trafficDoc("  service: backend\n"), "strait.dev/v1alpha1", "strait.dev/v1", 1),
			[]wantField{{"apiVersion", `unsupported version "strait.dev/v1"; supported: strait.dev/v1alpha1`}}},
		{"missing apiVersion", "kind: TrafficPolicy\nmetadata: {name: backend}\nspec: {service: backend}\n",
			[]wantField{{"apiVersion", "required; supported: strait.dev/v1alpha1"}}},
		{"unknown kind", strings.Replace(trafficDoc("  service: backend\n"), "kind: TrafficPolicy", "kind: TraficPolicy", 1),
			[]wantField{{"kind", `unknown kind "TraficPolicy"; supported kinds: AuthorizationPolicy, ServiceExport, TrafficPolicy; did you mean "TrafficPolicy"?`}}},
		{"missing kind", "apiVersion: strait.dev/v1alpha1\nmetadata: {name: backend}\nspec: {service: backend}\n",
			[]wantField{{"kind", "required; supported kinds: AuthorizationPolicy, ServiceExport, TrafficPolicy"}}},
		// SPIFFE IDs.
		{"not a SPIFFE ID", authzDoc("", "    - spiffeID: https://strait.example/ns/a/sa/b\n"),
			[]wantField{{"spec.from[0].spiffeID", "must be a SPIFFE ID with a path: identity: invalid SPIFFE ID"}}},
		{"SPIFFE ID without a path", authzDoc("", "    - spiffeID: spiffe://strait.example\n"),
			[]wantField{{"spec.from[0].spiffeID", "has no path"}}},
		{"SPIFFE ID with upper case trust domain", authzDoc("", "    - spiffeID: spiffe://Strait.example/a\n"),
			[]wantField{{"spec.from[0].spiffeID", "invalid SPIFFE ID"}}},
		{"foreign trust domain", authzDoc("", "    - spiffeID: spiffe://other.example/ns/a/sa/b\n"),
			[]wantField{{"spec.from[0].spiffeID", `trust domain "other.example" is not this mesh's trust domain "strait.example"`}}},
		{"prefix without slash", authzDoc("", "    - spiffeIDPrefix: spiffe://strait.example/ns/ops\n"),
			[]wantField{{"spec.from[0].spiffeIDPrefix", `must end with "/" so that it matches whole path segments`}}},
		{"prefix in foreign trust domain", authzDoc("", "    - spiffeIDPrefix: spiffe://other.example/ns/ops/\n"),
			[]wantField{{"spec.from[0].spiffeIDPrefix", `trust domain "other.example" is not`}}},
		{"prefix with empty segment", authzDoc("", "    - spiffeIDPrefix: spiffe://strait.example/ns//\n"),
			[]wantField{{"spec.from[0].spiffeIDPrefix", `must be a SPIFFE ID followed by "/"`}}},
		// Sources.
		{"two kinds of source", authzDoc("", "    - {spiffeID: spiffe://strait.example/a, namespace: ops}\n"),
			[]wantField{{"spec.from[0]", "set exactly one of spiffeID, spiffeIDPrefix and namespace, got spiffeID and namespace"}}},
		{"empty source", authzDoc("", "    - {}\n"),
			[]wantField{{"spec.from[0]", "set one of spiffeID, spiffeIDPrefix and namespace"}}},
		{"service account without namespace", authzDoc("", "    - serviceAccount: prometheus\n"),
			[]wantField{{"spec.from[0].serviceAccount", "requires namespace"}}},
		{"bad namespace shorthand", authzDoc("", "    - namespace: Ops\n"),
			[]wantField{{"spec.from[0].namespace", "must be a DNS-1123 label"}}},
		{"bad service account", authzDoc("", "    - {namespace: ops, serviceAccount: \"a/b\"}\n"),
			[]wantField{{"spec.from[0].serviceAccount", "must be a DNS-1123 subdomain"}}},
		{"no sources", authzDoc("", "    []\n"),
			[]wantField{{"spec.from", "required"}}},
		{"missing from", "apiVersion: strait.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: callers}\nspec: {service: backend}\n",
			[]wantField{{"spec.from", "required"}}},
		{"misspelt source field", authzDoc("", "    - spiffeId: spiffe://strait.example/a\n"),
			[]wantField{{"spec.from[0].spiffeId", `did you mean "spiffeID"?`}, {"spec.from[0]", "set one of"}}},
		// Several at once.
		{"all errors collected", `apiVersion: strait.dev/v1
kind: TrafficPolicy
metadata: {name: Backend}
spec:
  retries: {atempts: 2, attempts: 20}
  loadBalancing: {policy: RANDOM}
`, []wantField{
			{"apiVersion", "unsupported version"},
			{"metadata.name", "DNS-1123"},
			{"spec.service", "required"},
			{"spec.retries.atempts", "unknown field"},
			{"spec.retries.attempts", "must be between 0 and 10, got 20"},
			{"spec.loadBalancing.policy", "must be one of"},
		}},
		{"unknown kind still checks metadata", "apiVersion: strait.dev/v1alpha1\nkind: Gadget\nmetadata: {name: A}\nspec: {}\n",
			[]wantField{{"kind", `unknown kind "Gadget"`}, {"metadata.name", "DNS-1123"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs, err := Decode([]byte(tt.doc))
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			typed, err := Validate(objs[0], td)
			if typed != nil {
				t.Errorf("got %T, want nil on error", typed)
			}
			e := checkFields(t, err, tt.want)
			if e.Doc != 1 {
				t.Errorf("got document %d, want 1", e.Doc)
			}
		})
	}
}

func TestValidateWithoutTrustDomain(t *testing.T) {
	objs, err := Decode([]byte(authzDoc("", "    - spiffeID: spiffe://any.example/a\n    - namespace: ops\n")))
	if err != nil {
		t.Fatal(err)
	}
	_, err = Validate(objs[0], spiffeid.TrustDomain{})
	checkFields(t, err, []wantField{{"spec.from[1].namespace", "cannot be resolved to a SPIFFE ID without the trust domain"}})
}

func TestDecodeErrors(t *testing.T) {
	valid := trafficDoc("  service: backend\n")
	tests := []struct {
		name string
		in   string
		doc  int
		want []wantField
	}{
		{"YAML syntax error in document 2 names its line", valid + "---\nkind: [x\n", 2,
			[]wantField{{"", "invalid YAML: yaml: line 7: did not find expected"}}},
		{"duplicate YAML key", "kind: a\nkind: b\n", 1,
			[]wantField{{"", `invalid YAML: yaml: unmarshal errors: line 2: key "kind" already set in map`}}},
		{"scalar document", valid + "---\nhello\n", 2,
			[]wantField{{"", `must be an object with apiVersion, kind, metadata and spec, got "hello"`}}},
		{"list document", "- a\n", 1,
			[]wantField{{"", "must be an object with apiVersion, kind, metadata and spec, got a list"}}},
		{"unknown top-level field", valid + "status: {}\n", 1,
			[]wantField{{"status", "unknown field; known fields: apiVersion, kind, metadata, spec"}}},
		{"unknown metadata field with suggestion", strings.Replace(valid, "name: backend", "name: backend, namespase: x", 1), 1,
			[]wantField{{"metadata.namespase", `did you mean "namespace"?`}}},
		{"metadata not an object", "apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: backend\n", 1,
			[]wantField{{"metadata", `must be an object, got "backend"`}}},
		{"kind not a string", "kind: [a]\napiVersion: 1\n", 1,
			[]wantField{{"kind", "must be a string, got a list"}, {"apiVersion", "must be a string, got 1"}}},
		{"label not a string", strings.Replace(valid, "name: backend", "name: backend, labels: {tier: 1}", 1), 1,
			[]wantField{{`metadata.labels["tier"]`, "must be a string, got 1"}}},
		{"spec not an object", "kind: TrafficPolicy\nspec: 3\n", 1,
			[]wantField{{"spec", "must be an object, got 3"}}},
		{"text after a document end marker", "kind: a\n...\nname: b\n", 2,
			[]wantField{{"name", "unknown field"}}},
		{"JSON syntax error", `[{"kind": "a"},`, 1,
			[]wantField{{"", "invalid JSON"}}},
		{"JSON duplicate key", `{"kind": "a", "spec": {"service": "x", "service": "y"}}`, 1,
			[]wantField{{"", "invalid JSON: spec.service: duplicate field"}}},
		{"JSON list element not an object", `[{"kind": "TrafficPolicy"}, 3]`, 2,
			[]wantField{{"", "must be an object with apiVersion, kind, metadata and spec, got 3"}}},
		{"deep nesting", "spec: " + strings.Repeat("[", 100) + strings.Repeat("]", 100) + "\n", 1,
			[]wantField{{"", "nested more than 64 levels deep"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs, err := Decode([]byte(tt.in))
			if objs != nil {
				t.Errorf("got %d objects, want none on error", len(objs))
			}
			e := checkFields(t, err, tt.want)
			if e.Doc != tt.doc {
				t.Errorf("got document %d, want %d", e.Doc, tt.doc)
			}
			if want := "document " + strconv.Itoa(tt.doc); !strings.HasPrefix(err.Error(), want) {
				t.Errorf("got %q, want it to start with %q", err, want)
			}
		})
	}
}

func TestDecodeReportsEveryBadDocument(t *testing.T) {
	in := "kind: [a]\n---\n" + trafficDoc("  service: backend\n") + "---\nstatus: 1\n"
	_, err := Decode([]byte(in))
	multi, ok := err.(interface{ Unwrap() []error })
	if !ok {
		t.Fatalf("got %T %v, want joined errors", err, err)
	}
	var docs []int
	for _, e := range multi.Unwrap() {
		if fe, ok := errors.AsType[*Error](e); ok {
			docs = append(docs, fe.Doc)
		}
	}
	if want := []int{1, 3}; !reflect.DeepEqual(docs, want) {
		t.Errorf("got documents %v, want %v", docs, want)
	}
}

func TestLoadNamesTheBadDocument(t *testing.T) {
	in := example + "---\n" + trafficDoc("  service: backend\n  retries: {attempts: 11}\n")
	_, err := Load([]byte(in), td)
	e := checkFields(t, err, []wantField{{"spec.retries.attempts", "must be between 0 and 10"}})
	if e.Doc != 3 || e.Kind != KindTrafficPolicy || e.Namespace != "default" || e.Name != "backend" {
		t.Errorf("got document %d %s %s/%s, want document 3 TrafficPolicy default/backend", e.Doc, e.Kind, e.Namespace, e.Name)
	}
	want := "document 3 (TrafficPolicy default/backend): spec.retries.attempts: must be between 0 and 10, got 11"
	if err.Error() != want {
		t.Errorf("got %q, want %q", err.Error(), want)
	}
}

func TestDecodeEmpty(t *testing.T) {
	for _, in := range []string{"", "   \n\n", "# only a comment\n", "---\n---\n", "---\n# c\n---\n", "\xef\xbb\xbf"} {
		_, err := Decode([]byte(in))
		if !errors.Is(err, ErrEmpty) {
			t.Errorf("Decode(%q): got %v, want ErrEmpty", in, err)
		}
	}
	if !strings.Contains(ErrEmpty.Error(), "no objects") {
		t.Errorf("got %q, want it to say there are no objects", ErrEmpty)
	}
}

func TestDecodeSeparators(t *testing.T) {
	tests := []struct {
		name  string
		in    string
		kinds []string
	}{
		{"leading separator", "---\nkind: a\n", []string{"a"}},
		{"separator with comment", "kind: a\n--- # next\nkind: b\n", []string{"a", "b"}},
		{"content on the separator line", "--- {kind: a}\n---\nkind: b\n", []string{"a", "b"}},
		{"CRLF line ends", "kind: a\r\n---\r\nkind: b\r\n", []string{"a", "b"}},
		{"empty documents skipped", "---\n\n---\nkind: a\n---\n---\n", []string{"a"}},
		{"dashes inside a value are not a separator", "kind: '---x'\n", []string{"---x"}},
		{"byte order mark", "\xef\xbb\xbfkind: a\n", []string{"a"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs, err := Decode([]byte(tt.in))
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			var kinds []string
			for i, o := range objs {
				kinds = append(kinds, o.Kind)
				if o.Doc != i+1 {
					t.Errorf("object %d: got doc %d, want %d", i, o.Doc, i+1)
				}
			}
			if !reflect.DeepEqual(kinds, tt.kinds) {
				t.Errorf("got kinds %q, want %q", kinds, tt.kinds)
			}
		})
	}
}

func TestJSONInput(t *testing.T) {
	traffic := `{"apiVersion": "strait.dev/v1alpha1", "kind": "TrafficPolicy",
	  "metadata": {"name": "backend", "namespace": "shop"},
	  "spec": {"service": "backend", "retries": {"attempts": 3, "perTryTimeout": "500ms"}}}`
	authz := `{"apiVersion": "strait.dev/v1alpha1", "kind": "AuthorizationPolicy",
	  "metadata": {"name": "callers"},
	  "spec": {"service": "backend", "action": "DENY", "from": [{"namespace": "ops"}]}}`
	tests := []struct {
		name  string
		in    string
		kinds []string
	}{
		{"one object", traffic, []string{KindTrafficPolicy}},
		{"one object with tabs", "\t" + strings.ReplaceAll(traffic, "  ", "\t"), []string{KindTrafficPolicy}},
		{"a list", "[" + traffic + ",\n" + authz + "]", []string{KindTrafficPolicy, KindAuthorizationPolicy}},
		{"YAML flow mapping", `{apiVersion: strait.dev/v1alpha1, kind: TrafficPolicy, metadata: {name: a}, spec: {service: a}}`, []string{KindTrafficPolicy}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			typed := mustLoad(t, tt.in)
			var kinds []string
			for _, ty := range typed {
				kinds = append(kinds, ty.Kind())
			}
			if !reflect.DeepEqual(kinds, tt.kinds) {
				t.Fatalf("got kinds %v, want %v", kinds, tt.kinds)
			}
		})
	}
	tp := mustLoad(t, traffic)[0].(*TrafficPolicy).Proto()
	if tp.Retries.Attempts != 3 || tp.Retries.PerTryTimeout.AsDuration() != 500*time.Millisecond {
		t.Errorf("got retries %v, want 3 attempts with a 500ms per-try timeout", tp.Retries)
	}
}

func TestBuildAuthorization(t *testing.T) {
	policies := func(in string) []*AuthorizationPolicy {
		var out []*AuthorizationPolicy
		for _, ty := range mustLoad(t, in) {
			out = append(out, ty.(*AuthorizationPolicy))
		}
		return out
	}
	const two = `apiVersion: strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: z-callers, namespace: shop}
spec:
  service: backend
  from:
    - spiffeID: spiffe://strait.example/ns/default/sa/frontend
    - spiffeIDPrefix: spiffe://strait.example/ns/ops/
    - namespace: monitoring
      serviceAccount: prometheus
    - namespace: audit
    - spiffeID: spiffe://strait.example/ns/default/sa/frontend
---
apiVersion: strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: blocked, namespace: shop}
spec:
  service: backend
  action: DENY
  from:
    - spiffeIDPrefix: spiffe://strait.example/
---
apiVersion: strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: a-callers, namespace: shop}
spec:
  service: backend
  action: ALLOW
  from:
    - namespace: batch
`
	tests := []struct {
		name     string
		policies []*AuthorizationPolicy
		want     *controlplanev1.Authorization
	}{
		{"no policies: open to the trust domain", nil, &controlplanev1.Authorization{}},
		{"nil policies are skipped", []*AuthorizationPolicy{nil}, &controlplanev1.Authorization{}},
		{"allow and deny, ordered by name, shorthands resolved, duplicates dropped", policies(two), &controlplanev1.Authorization{
			Allow: []*controlplanev1.AuthorizationRule{
				{Policy: "shop/a-callers", SpiffeIdPrefixes: []string{"spiffe://strait.example/ns/batch/"}},
				{
					Policy: "shop/z-callers",
					SpiffeIds: []string{
						"spiffe://strait.example/ns/default/sa/frontend",
						"spiffe://strait.example/ns/monitoring/sa/prometheus",
					},
					SpiffeIdPrefixes: []string{"spiffe://strait.example/ns/ops/", "spiffe://strait.example/ns/audit/"},
				},
			},
			Deny: []*controlplanev1.AuthorizationRule{
				{Policy: "shop/blocked", SpiffeIdPrefixes: []string{"spiffe://strait.example/"}},
			},
		}},
		{"the example", policies(example[strings.Index(example, "---\n"):]), &controlplanev1.Authorization{
			Allow: []*controlplanev1.AuthorizationRule{{
				Policy: "default/backend-callers",
				SpiffeIds: []string{
					"spiffe://strait.example/ns/default/sa/frontend",
					"spiffe://strait.example/ns/monitoring/sa/prometheus",
				},
				SpiffeIdPrefixes: []string{"spiffe://strait.example/ns/ops/", "spiffe://strait.example/ns/audit/"},
			}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := BuildAuthorization(tt.policies); !proto.Equal(got, tt.want) {
				t.Errorf("got  %v\nwant %v", got, tt.want)
			}
		})
	}
}

func TestProtoRoundTrip(t *testing.T) {
	objs, err := Decode([]byte(example))
	if err != nil {
		t.Fatal(err)
	}
	for _, obj := range objs {
		r, err := ToProto(obj)
		if err != nil {
			t.Fatalf("ToProto: %v", err)
		}
		if r.GetNamespace() != "default" || r.GetKind() != obj.Kind || r.GetName() != obj.Metadata.Name || r.GetApiVersion() != obj.APIVersion {
			t.Errorf("got %v, want the object's identity", r)
		}
		if strings.ContainsAny(string(r.GetSpecJson()), " \n") {
			t.Errorf("spec %s is not compact", r.GetSpecJson())
		}
		back, err := FromProto(r)
		if err != nil {
			t.Fatalf("FromProto: %v", err)
		}
		back.Doc = obj.Doc
		if !reflect.DeepEqual(back, obj) {
			t.Errorf("round trip: got %+v, want %+v", back, obj)
		}
	}

	t.Run("empty namespace becomes default", func(t *testing.T) {
		r, err := ToProto(Object{APIVersion: APIVersion, Kind: KindTrafficPolicy, Metadata: Metadata{Name: "a", Generation: 7}, Spec: json.RawMessage(`{ "service" : "a" }`)})
		if err != nil {
			t.Fatal(err)
		}
		if r.GetNamespace() != "default" || string(r.GetSpecJson()) != `{"service":"a"}` || r.GetGeneration() != 7 {
			t.Errorf("got %v, want namespace default, compact spec and generation 7", r)
		}
		back, _ := FromProto(r)
		if back.Metadata.Generation != 7 {
			t.Errorf("got generation %d, want 7", back.Metadata.Generation)
		}
	})
	t.Run("labels are refused", func(t *testing.T) {
		_, err := ToProto(Object{Kind: KindTrafficPolicy, Metadata: Metadata{Name: "a", Labels: map[string]string{"x": "y"}}})
		checkFields(t, err, []wantField{{"metadata.labels", "not supported by the admin API yet"}})
	})
	t.Run("bad spec JSON is refused", func(t *testing.T) {
		_, err := ToProto(Object{Kind: KindTrafficPolicy, Metadata: Metadata{Name: "a"}, Spec: json.RawMessage(`{`)})
		checkFields(t, err, []wantField{{"spec", "invalid JSON"}})
		_, err = FromProto(&controlplanev1.Resource{Kind: KindTrafficPolicy, Name: "a", SpecJson: []byte(`{`)})
		checkFields(t, err, []wantField{{"spec", "invalid JSON"}})
	})
	t.Run("nil resource", func(t *testing.T) {
		if _, err := FromProto(nil); err == nil {
			t.Error("got no error, want one")
		}
	})
	t.Run("wire specs are validated strictly", func(t *testing.T) {
		obj, err := FromProto(&controlplanev1.Resource{ApiVersion: APIVersion, Kind: KindTrafficPolicy, Name: "a",
			SpecJson: []byte(`{"service":"a","retries":{"attempts":1,"attempts":2}}`)})
		if err != nil {
			t.Fatal(err)
		}
		_, err = Validate(obj, td)
		e := checkFields(t, err, []wantField{{"spec", "spec.retries.attempts: duplicate field"}})
		if e.Doc != 0 || !strings.HasPrefix(err.Error(), "TrafficPolicy default/a: ") {
			t.Errorf("got %q (doc %d), want it to start with the object's name and no document", err, e.Doc)
		}
		_, err = Validate(Object{APIVersion: APIVersion, Kind: KindTrafficPolicy, Metadata: Metadata{Name: "a"}, Spec: json.RawMessage(`[]`)}, td)
		checkFields(t, err, []wantField{{"spec", "must be an object, got a list"}})
	})
}

func TestEncodeRoundTrip(t *testing.T) {
	objs, err := Decode([]byte(example))
	if err != nil {
		t.Fatal(err)
	}
	out, err := Encode(objs)
	if err != nil {
		t.Fatalf("Encode: %v", err)
	}
	if !strings.HasPrefix(string(out), "apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n") || strings.Count(string(out), "\n---\n") != 1 {
		t.Errorf("got\n%s\nwant two documents, apiVersion first", out)
	}
	back, err := Decode(out)
	if err != nil {
		t.Fatalf("Decode(Encode()): %v\n%s", err, out)
	}
	if !reflect.DeepEqual(back, objs) {
		t.Errorf("round trip:\ngot  %+v\nwant %+v", back, objs)
	}
	if _, err := Encode([]Object{{Kind: "x", Spec: json.RawMessage("{")}}); err == nil {
		t.Error("Encode of a bad spec: got no error, want one")
	}
	if out, err := Encode(nil); err != nil || len(out) != 0 {
		t.Errorf("Encode(nil): got %q, %v, want nothing", out, err)
	}
}

func TestErrorString(t *testing.T) {
	two := []FieldError{{Path: "spec.a", Message: "required"}, {Path: "", Message: "whole"}}
	tests := []struct {
		name string
		err  *Error
		want string
	}{
		{"document and object", &Error{Doc: 2, Kind: "TrafficPolicy", Namespace: "default", Name: "b", Fields: two[:1]},
			"document 2 (TrafficPolicy default/b): spec.a: required"},
		{"several fields", &Error{Doc: 1, Kind: "TrafficPolicy", Fields: two},
			"document 1 (TrafficPolicy): 2 errors:\n  spec.a: required\n  whole"},
		{"no document", &Error{Kind: "TrafficPolicy", Name: "b", Fields: two[:1]},
			"TrafficPolicy b: spec.a: required"},
		{"document only", &Error{Doc: 3, Fields: two[1:]}, "document 3: whole"},
		{"hostile kind is quoted", &Error{Doc: 1, Kind: "a\nb", Fields: two[:1]},
			`document 1 ("a\nb"): spec.a: required`},
		{"no fields", &Error{Doc: 1}, "document 1: invalid"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.err.Error(); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestTooManyErrors(t *testing.T) {
	var b strings.Builder
	b.WriteString(trafficDoc("  service: backend\n"))
	for i := range 150 {
		b.WriteString("  x" + strconv.Itoa(i) + ": 1\n")
	}
	_, err := Load([]byte(b.String()), td)
	e, ok := errors.AsType[*Error](err)
	if !ok {
		t.Fatalf("got %v, want an *Error", err)
	}
	if got, want := len(e.Fields), maxFieldErrors+1; got != want {
		t.Fatalf("got %d fields, want %d", got, want)
	}
	if got, want := e.Fields[maxFieldErrors].Message, "50 more errors not shown"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestSuggest(t *testing.T) {
	candidates := []string{"attempts", "perTryTimeout", "retryOn", "budget"}
	tests := []struct{ in, want string }{
		{"atempts", "attempts"},
		{"attempt", "attempts"},
		{"PERTRYTIMEOUT", "perTryTimeout"},
		{"retry_on", "retryOn"},
		{"budgte", "budget"},
		{"colour", ""},
		{"x", ""},
		{"", ""},
		{strings.Repeat("a", 100), ""},
	}
	for _, tt := range tests {
		if got := suggest(tt.in, candidates); got != tt.want {
			t.Errorf("suggest(%q): got %q, want %q", tt.in, got, tt.want)
		}
	}
}

// TestSchemaTags checks every kind's schema: exported fields carry json
// tags, range tags parse, and only supported types appear.
func TestSchemaTags(t *testing.T) {
	seen := map[reflect.Type]bool{}
	var walk func(path string, typ reflect.Type)
	walk = func(path string, typ reflect.Type) {
		if typ == durationType || seen[typ] {
			return
		}
		seen[typ] = true
		switch typ.Kind() {
		case reflect.Pointer, reflect.Slice, reflect.Map:
			walk(path, typ.Elem())
		case reflect.Struct:
			for i := range typ.NumField() {
				f := typ.Field(i)
				if f.Tag.Get("json") == "" {
					t.Errorf("%s.%s has no json tag", path, f.Name)
				}
				if r := f.Tag.Get("range"); r != "" {
					if fi := schemaFields(typ); !slices.ContainsFunc(fi, func(x fieldInfo) bool { return x.index == i && x.bounded }) {
						t.Errorf("%s.%s: range tag %q does not parse", path, f.Name, r)
					}
				}
				walk(path+"."+f.Name, f.Type)
			}
		case reflect.String, reflect.Uint32, reflect.Uint64:
		default:
			t.Errorf("%s: unsupported type %s", path, typ)
		}
	}
	for name, k := range kinds {
		walk(name, reflect.TypeOf(k.new().spec()).Elem())
	}
	walk("Object", reflect.TypeFor[Metadata]())
}

func TestDurationJSON(t *testing.T) {
	var d Duration
	if err := json.Unmarshal([]byte(`"1m30s"`), &d); err != nil || time.Duration(d) != 90*time.Second {
		t.Errorf("got %v, %v, want 1m30s", d, err)
	}
	for _, bad := range []string{`90`, `"-1s"`, `"soon"`} {
		if err := json.Unmarshal([]byte(bad), &d); err == nil {
			t.Errorf("Unmarshal(%s): got no error, want one", bad)
		}
	}
	if b, _ := json.Marshal(Duration(1500 * time.Millisecond)); string(b) != `"1.5s"` {
		t.Errorf("got %s, want \"1.5s\"", b)
	}
}

func TestServiceExport(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("strait.example")
	objs, err := Load([]byte(`
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: backend, namespace: shop}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: payments}
spec: {toClusters: [west]}
`), td)
	if err != nil {
		t.Fatal(err)
	}
	all, some := objs[0].(*ServiceExport), objs[1].(*ServiceExport)
	if ns, svc := ServiceKey(all); ns != "shop" || svc != "backend" || !all.ExportedTo("anyone") {
		t.Fatalf("export without spec: %s/%s", ns, svc)
	}
	if !some.ExportedTo("west") || some.ExportedTo("east") {
		t.Fatalf("toClusters not honoured: %+v", some.Spec)
	}
	_, err = Load([]byte(`
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {name: payments}
spec: {toClusters: [West, west, west], toCluster: [x]}
`), td)
	for _, want := range []string{"spec.toClusters[0]", "spec.toClusters[2]", `"west" listed twice`, "spec.toCluster", `did you mean "toClusters"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not mention %s", err, want)
		}
	}
	_, err = Load([]byte("apiVersion: strait.dev/v1alpha1\nkind: ServiceExport\nmetadata: {name: a}\n"), td)
	if err == nil || !strings.Contains(err.Error(), "multicluster.x-k8s.io/v1alpha1") {
		t.Errorf("wrong apiVersion: %v", err)
	}
}

func TestTrafficPolicyFailover(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("strait.example")
	objs, err := Load([]byte(`
apiVersion: strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend}
spec:
  service: backend
  failover: {peers: [west, south], spillThreshold: 50, slowStart: 20s, staleness: 15s}
`), td)
	if err != nil {
		t.Fatal(err)
	}
	f := objs[0].(*TrafficPolicy).Proto().GetFailover()
	if len(f.GetPeers()) != 2 || f.GetPeers()[0] != "west" || f.GetSpillThresholdPercent() != 50 || f.GetSlowStart().AsDuration() != 20*time.Second || f.GetStaleness().AsDuration() != 15*time.Second || f.GetByRtt() {
		t.Fatalf("failover: %v", f)
	}
	_, err = Load([]byte(`
apiVersion: strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend}
spec:
  service: backend
  failover: {peers: [West, west, west], order: rtt, spillThreshold: 150, staleness: 0s, slowStart: -1s}
`), td)
	for _, want := range []string{"spec.failover.peers[0]", `"west" listed twice`, "spec.failover.order", "spec.failover.spillThreshold", "spec.failover.staleness", "spec.failover.slowStart"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("error %v does not mention %s", err, want)
		}
	}
}
