package store

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func res(kind, ns, name, spec string) Resource {
	return Resource{APIVersion: "strait.dev/v1alpha1", Kind: kind, Namespace: ns, Name: name, Spec: []byte(spec)}
}

func equalResources(a, b []Resource) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		if x.APIVersion != y.APIVersion || x.Kind != y.Kind || x.Namespace != y.Namespace || x.Name != y.Name ||
			!bytes.Equal(x.Spec, y.Spec) || x.Generation != y.Generation {
			return false
		}
	}
	return true
}

func TestApplyActionsAndGenerations(t *testing.T) {
	s, _ := openTest(t)
	v2 := res("Route", "shop", "r", `{"b":1}`)
	v2.APIVersion = "strait.dev/v1beta1"
	steps := []struct {
		name string
		in   []Resource
		want []ApplyResult
	}{
		{
			name: "create two",
			in:   []Resource{res("Route", "shop", "r", `{"b":1}`), res("Mesh", "", "m", `{"a":1}`)},
			want: []ApplyResult{{"Route", "shop", "r", ActionCreated, 1}, {"Mesh", "", "m", ActionCreated, 1}},
		},
		{
			name: "same bytes",
			in:   []Resource{res("Route", "shop", "r", `{"b":1}`)},
			want: []ApplyResult{{"Route", "shop", "r", ActionUnchanged, 1}},
		},
		{
			name: "spec changed",
			in:   []Resource{res("Route", "shop", "r", `{"b":2}`), res("Mesh", "", "m", `{"a":1}`)},
			want: []ApplyResult{{"Route", "shop", "r", ActionConfigured, 2}, {"Mesh", "", "m", ActionUnchanged, 1}},
		},
		{
			name: "whitespace is a change (specs are compared as bytes)",
			in:   []Resource{res("Route", "shop", "r", `{"b": 2}`)},
			want: []ApplyResult{{"Route", "shop", "r", ActionConfigured, 3}},
		},
		{
			name: "apiVersion changed",
			in:   []Resource{v2},
			want: []ApplyResult{{"Route", "shop", "r", ActionConfigured, 4}},
		},
		{
			name: "same name in another namespace is another object",
			in:   []Resource{res("Route", "other", "r", `{"b":1}`)},
			want: []ApplyResult{{"Route", "other", "r", ActionCreated, 1}},
		},
	}
	for _, st := range steps {
		plan, err := s.Plan(st.in)
		if err != nil {
			t.Fatalf("%s: Plan: %v", st.name, err)
		}
		got, err := s.Apply(st.in)
		if err != nil {
			t.Fatalf("%s: Apply: %v", st.name, err)
		}
		if len(got) != len(st.want) {
			t.Fatalf("%s: got %d results, want %d", st.name, len(got), len(st.want))
		}
		for i := range got {
			if got[i] != st.want[i] {
				t.Errorf("%s: result %d: got %+v, want %+v", st.name, i, got[i], st.want[i])
			}
			if plan[i] != st.want[i] {
				t.Errorf("%s: plan %d: got %+v, want %+v", st.name, i, plan[i], st.want[i])
			}
		}
		for _, r := range st.in {
			stored, err := s.Get(r.Kind, r.Namespace, r.Name)
			if err != nil {
				t.Fatalf("%s: Get: %v", st.name, err)
			}
			if !bytes.Equal(stored.Spec, r.Spec) || stored.APIVersion != r.APIVersion {
				t.Errorf("%s: stored %s/%s: got %s %s, want %s %s", st.name, r.Namespace, r.Name, stored.APIVersion, stored.Spec, r.APIVersion, r.Spec)
			}
		}
	}
}

func TestPlanStoresNothing(t *testing.T) {
	s, _ := openTest(t)
	rev := s.Revision()
	if _, err := s.Plan([]Resource{res("Mesh", "", "m", `{}`)}); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.List("", "", ""); len(got) != 0 {
		t.Fatalf("after Plan: got %d resources, want 0", len(got))
	}
	if got := s.Revision(); got != rev {
		t.Fatalf("after Plan: got revision %d, want %d", got, rev)
	}
}

func TestApplyIsAtomic(t *testing.T) {
	good := res("Mesh", "", "m", `{"a":1}`)
	tests := []struct {
		name    string
		bad     Resource
		wantErr string
	}{
		{"empty kind", res("", "shop", "r", `{}`), "kind is empty"},
		{"kind with slash", res("Route/x", "shop", "r", `{}`), "kind"},
		{"lower-case kind", res("route", "shop", "r", `{}`), "kind"},
		{"empty name", res("Route", "shop", "", `{}`), "name is empty"},
		{"name with slash", res("Route", "shop", "a/b", `{}`), "name"},
		{"name with NUL", res("Route", "shop", "a\x00b", `{}`), "name"},
		{"upper-case name", res("Route", "shop", "Web", `{}`), "name"},
		{"long name", res("Route", "shop", strings.Repeat("a", 254), `{}`), "name"},
		{"namespace with NUL", res("Route", "sh\x00op", "r", `{}`), "namespace"},
		{"namespace with dot", res("Route", "shop.x", "r", `{}`), "namespace"},
		{"empty apiVersion", Resource{Kind: "Route", Name: "r", Spec: []byte(`{}`)}, "apiVersion is empty"},
		{"bad apiVersion", Resource{APIVersion: "strait.dev/", Kind: "Route", Name: "r", Spec: []byte(`{}`)}, "apiVersion"},
		{"empty spec", res("Route", "shop", "r", ``), "spec is empty"},
		{"invalid JSON", res("Route", "shop", "r", `{"a":`), "spec is not valid JSON"},
		{"duplicate", good, "both Mesh m"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openTest(t)
			rev := s.Revision()
			_, err := s.Apply([]Resource{good, res("Route", "shop", "ok", `{}`), tc.bad})
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Apply: got error %v, want ErrInvalid mentioning %q", err, tc.wantErr)
			}
			if !strings.Contains(err.Error(), "resource 3 (counting from 1)") && tc.name != "duplicate" {
				t.Errorf("Apply: got error %v, want it to name resource 3 (counting from 1)", err)
			}
			if got, _ := s.List("", "", ""); len(got) != 0 {
				t.Fatalf("after failed Apply: got %d stored resources, want 0", len(got))
			}
			if got := s.Revision(); got != rev {
				t.Fatalf("after failed Apply: got revision %d, want %d", got, rev)
			}
		})
	}
}

// TestResourceKeysInjective checks the key encoding on tuples that a naive
// "/"-joined key would confuse (validation refuses most of them anyway).
func TestResourceKeysInjective(t *testing.T) {
	tuples := [][3]string{
		{"a/b", "c", "d"}, {"a", "b/c", "d"}, {"a", "b", "c/d"},
		{"a", "", "b"}, {"a", "b", ""}, {"ab", "", ""}, {"", "ab", ""}, {"a", "bc", "d"}, {"ab", "c", "d"},
	}
	seen := map[string][3]string{}
	for _, tu := range tuples {
		k := resourceKey(tu[0], tu[1], tu[2])
		if prev, dup := seen[string(k)]; dup {
			t.Fatalf("resourceKey(%q) = resourceKey(%q)", tu, prev)
		}
		seen[string(k)] = tu
		kind, ns, name, err := splitResourceKey(k)
		if err != nil || kind != tu[0] || ns != tu[1] || name != tu[2] {
			t.Fatalf("splitResourceKey(resourceKey(%q)) = %q %q %q, %v", tu, kind, ns, name, err)
		}
	}
	s, _ := openTest(t)
	if _, err := s.Apply([]Resource{res("Route", "a", "b", `{}`)}); err != nil {
		t.Fatal(err)
	}
	for _, q := range [][3]string{{"Route", "a\x00b", ""}, {"Route\x00a", "b", ""}, {"Route", "", "a\x00b"}} {
		if _, err := s.Get(q[0], q[1], q[2]); !errors.Is(err, ErrNotFound) {
			t.Errorf("Get(%q): got %v, want ErrNotFound", q, err)
		}
		if err := s.Delete(q[0], q[1], q[2]); !errors.Is(err, ErrNotFound) {
			t.Errorf("Delete(%q): got %v, want ErrNotFound", q, err)
		}
	}
}

func TestListFilters(t *testing.T) {
	s, _ := openTest(t)
	all := []Resource{
		res("Route", "shop", "b", `{}`), res("Mesh", "", "m", `{}`), res("Route", "shop", "a", `{}`),
		res("Route", "billing", "a", `{}`), res("RouteX", "shop", "a", `{}`), res("Policy", "shop", "a", `{}`),
	}
	if _, err := s.Apply(all); err != nil {
		t.Fatal(err)
	}
	ids := func(rs []Resource) string {
		var b []string
		for _, r := range rs {
			b = append(b, r.Kind+":"+r.Namespace+":"+r.Name)
		}
		return strings.Join(b, " ")
	}
	tests := []struct {
		kind, ns, name string
		want           string
	}{
		{"", "", "", "Mesh::m Policy:shop:a Route:billing:a Route:shop:a Route:shop:b RouteX:shop:a"},
		{"Route", "", "", "Route:billing:a Route:shop:a Route:shop:b"},
		{"Route", "shop", "", "Route:shop:a Route:shop:b"},
		{"Route", "shop", "a", "Route:shop:a"},
		{"", "shop", "", "Policy:shop:a Route:shop:a Route:shop:b RouteX:shop:a"},
		{"", "", "a", "Policy:shop:a Route:billing:a Route:shop:a RouteX:shop:a"},
		{"Nope", "", "", ""},
	}
	for _, tc := range tests {
		got, err := s.List(tc.kind, tc.ns, tc.name)
		if err != nil {
			t.Fatal(err)
		}
		if ids(got) != tc.want {
			t.Errorf("List(%q, %q, %q): got %q, want %q", tc.kind, tc.ns, tc.name, ids(got), tc.want)
		}
	}
}

func TestGetAndDelete(t *testing.T) {
	s, _ := openTest(t)
	if _, err := s.Get("Mesh", "", "m"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get missing: got %v, want ErrNotFound", err)
	}
	if _, err := s.Apply([]Resource{res("Mesh", "", "m", `{"a":1}`)}); err != nil {
		t.Fatal(err)
	}
	got, err := s.Get("Mesh", "", "m")
	if err != nil || string(got.Spec) != `{"a":1}` || got.Generation != 1 {
		t.Fatalf("Get: got %+v, %v; want spec {\"a\":1} generation 1", got, err)
	}
	if err := s.Delete("Mesh", "", "m"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if err := s.Delete("Mesh", "", "m"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second Delete: got %v, want ErrNotFound", err)
	}
	// Re-creating starts over at generation 1.
	r, err := s.Apply([]Resource{res("Mesh", "", "m", `{"a":1}`)})
	if err != nil || r[0].Action != ActionCreated || r[0].Generation != 1 {
		t.Fatalf("re-create: got %+v, %v; want created generation 1", r, err)
	}
}
