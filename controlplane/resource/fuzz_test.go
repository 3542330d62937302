package resource

import (
	"errors"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
)

// FuzzDecodeValidate checks that no input makes the package panic, that
// every failure is reported as *Error values (or ErrEmpty), and that what
// validates survives the wire (ToProto, FromProto) and the printer (Encode,
// Decode) with the same effective configuration.
func FuzzDecodeValidate(f *testing.F) {
	for _, s := range []string{
		example,
		trafficDoc("  service: backend\n"),
		trafficDoc("  service: backend\n  retries: {attempts: 1E1, perTryTimeout: 0s, retryOn: [5xx]}\n"),
		trafficDoc("  service: backend\n  retries: {atempts: two, attempts: 11}\n  timeouts: {connect: -1s}\n"),
		authzDoc("  action: DENY\n", "    - spiffeIDPrefix: spiffe://strait.example/\n    - {namespace: ops, serviceAccount: a.b}\n"),
		authzDoc("", "    - spiffeID: spiffe://other.example/x\n    - {}\n"),
		`[{"apiVersion":"strait.dev/v1alpha1","kind":"TrafficPolicy","metadata":{"name":"a"},"spec":{"service":"a"}}]`,
		`{"apiVersion":"strait.dev/v1alpha1","kind":"TrafficPolicy","metadata":{"name":"a","labels":{"x":"y"}},"spec":{"service":"a","service":"b"}}`,
		"--- {kind: a}\n...\nkind: [\n",
		"a: &x [*x]\n",
		"a: !!binary aGVsbG8=\n? [a, b]\n: c\n",
		"",
		"---\n",
		"\xef\xbb\xbf{",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		objs, err := Decode(data)
		if err != nil {
			checkError(t, err)
			return
		}
		if len(objs) == 0 {
			t.Fatal("Decode returned no objects and no error")
		}
		for _, obj := range objs {
			typed, err := Validate(obj, td)
			if err != nil {
				checkError(t, err)
				continue
			}
			r, err := ToProto(obj)
			if err != nil {
				if len(obj.Metadata.Labels) == 0 {
					t.Fatalf("ToProto of a valid object: %v", err)
				}
				continue
			}
			wire, err := FromProto(r)
			if err != nil {
				t.Fatalf("FromProto(ToProto()): %v", err)
			}
			wire.Doc = obj.Doc
			sameEffect(t, "wire", typed, wire)

			text, err := Encode([]Object{obj})
			if err != nil {
				t.Fatalf("Encode of a valid object: %v", err)
			}
			again, err := Decode(text)
			if err != nil || len(again) != 1 {
				t.Fatalf("Decode(Encode()) = %d objects, %v\n%s", len(again), err, text)
			}
			sameEffect(t, "text", typed, again[0])
		}
	})
}

// checkError checks that err is ErrEmpty or made of *Error values that name
// at least one problem.
func checkError(t *testing.T, err error) {
	t.Helper()
	if errors.Is(err, ErrEmpty) {
		return
	}
	errs := []error{err}
	if multi, ok := err.(interface{ Unwrap() []error }); ok {
		errs = multi.Unwrap()
	}
	for _, e := range errs {
		fe, ok := e.(*Error)
		if !ok {
			t.Fatalf("got %T %v, want *Error", e, e)
		}
		if len(fe.Fields) == 0 || strings.TrimSpace(fe.Error()) == "" {
			t.Fatalf("error lists no problems: %#v", fe)
		}
	}
}

// sameEffect validates obj again and checks it configures the same as want.
func sameEffect(t *testing.T, how string, want Typed, obj Object) {
	t.Helper()
	got, err := Validate(obj, td)
	if err != nil {
		t.Fatalf("%s round trip no longer validates: %v", how, err)
	}
	if got.ObjectMeta().Name != want.ObjectMeta().Name || got.ObjectMeta().Namespace != want.ObjectMeta().Namespace {
		t.Fatalf("%s round trip: got %v, want %v", how, got.ObjectMeta(), want.ObjectMeta())
	}
	var a, b proto.Message
	switch w := want.(type) {
	case *TrafficPolicy:
		a, b = w.Proto(), got.(*TrafficPolicy).Proto()
	case *AuthorizationPolicy:
		a, b = BuildAuthorization([]*AuthorizationPolicy{w}), BuildAuthorization([]*AuthorizationPolicy{got.(*AuthorizationPolicy)})
	}
	if !proto.Equal(a, b) {
		t.Fatalf("%s round trip changed the effect:\ngot  %v\nwant %v", how, b, a)
	}
}
