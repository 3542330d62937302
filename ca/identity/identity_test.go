package identity

import (
	"errors"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestParse(t *testing.T) {
	long := "spiffe://td.example/" + strings.Repeat("a/", 1100)
	tests := []struct {
		name    string
		in      string
		wantErr string
	}{
		{name: "workload", in: "spiffe://strait.example/ns/default/sa/web"},
		{name: "root path", in: "spiffe://strait.example"},
		{name: "wrong scheme", in: "https://strait.example/x", wantErr: "scheme"},
		{name: "upper-case trust domain", in: "spiffe://Strait.example/x", wantErr: "trust domain characters"},
		{name: "query", in: "spiffe://strait.example/x?y=1", wantErr: "path segment characters"},
		{name: "port", in: "spiffe://strait.example:443/x", wantErr: "trust domain characters"},
		{name: "empty segment", in: "spiffe://strait.example//x", wantErr: "empty segment"},
		{name: "dot segment", in: "spiffe://strait.example/./x", wantErr: "dot segment"},
		{name: "trailing slash", in: "spiffe://strait.example/x/", wantErr: "trailing slash"},
		{name: "too long", in: long, wantErr: "more than the limit of 2048"},
		{name: "long segment", in: "spiffe://td.example/" + strings.Repeat("a", 254), wantErr: "path segment of 254 bytes"},
		{name: "long trust domain", in: "spiffe://" + strings.Repeat("a", 256) + "/x", wantErr: "trust domain is 256 bytes"},
		{name: "empty", in: "", wantErr: "empty"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id, err := Parse(tc.in)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("Parse(%q): got error %v, want none", tc.in, err)
				}
				if id.String() != tc.in {
					t.Fatalf("Parse(%q) = %q, want the input back", tc.in, id)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Parse(%q): got error %v, want one containing %q", tc.in, err, tc.wantErr)
			}
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("Parse(%q): error %v does not wrap ErrInvalid", tc.in, err)
			}
		})
	}
}

func TestBuildersAndClassify(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("strait.example")
	w, err := Workload(td, "shop", "web")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := w.String(), "spiffe://strait.example/ns/shop/sa/web"; got != want {
		t.Fatalf("Workload = %q, want %q", got, want)
	}
	if info := Classify(w); info.Kind != KindWorkload || info.Namespace != "shop" || info.ServiceAccount != "web" {
		t.Fatalf("Classify(%s) = %+v, want workload shop/web", w, info)
	}
	gw, err := Gateway(td, "east")
	if err != nil {
		t.Fatal(err)
	}
	if info := Classify(gw); info.Kind != KindGateway || info.Cluster != "east" {
		t.Fatalf("Classify(%s) = %+v, want gateway of east", gw, info)
	}
	cp, _ := ControlPlane(td, "west")
	if got := Classify(cp).Kind; got != KindControlPlane {
		t.Fatalf("Classify(%s).Kind = %v, want controlplane", cp, got)
	}
	adm, _ := Admin(td, "west")
	if got := Classify(adm).Kind; got != KindAdmin {
		t.Fatalf("Classify(%s).Kind = %v, want admin", adm, got)
	}
	other := spiffeid.RequireFromString("spiffe://strait.example/cluster/east/something")
	if got := Classify(other).Kind; got != KindOther {
		t.Fatalf("Classify(%s).Kind = %v, want other", other, got)
	}

	for _, bad := range []struct{ ns, sa string }{{"", "a"}, {"a", ""}, {"A", "b"}, {"a/b", "c"}, {"a", strings.Repeat("x", 254)}} {
		if _, err := Workload(td, bad.ns, bad.sa); err == nil {
			t.Errorf("Workload(%q, %q): got no error, want one", bad.ns, bad.sa)
		}
	}
	for _, bad := range []string{"", "East", "-east", "east-", "e_st", strings.Repeat("a", 64)} {
		if _, err := Gateway(td, bad); err == nil {
			t.Errorf("Gateway(%q): got no error, want one", bad)
		}
	}
	if _, err := Workload(spiffeid.TrustDomain{}, "a", "b"); err == nil {
		t.Error("Workload with zero trust domain: got no error, want one")
	}
}

func TestCheckLeaf(t *testing.T) {
	if err := CheckLeaf(spiffeid.RequireFromString("spiffe://strait.example")); err == nil {
		t.Fatal("CheckLeaf(root path): got no error, want one")
	}
	if err := CheckLeaf(spiffeid.ID{}); err == nil {
		t.Fatal("CheckLeaf(zero): got no error, want one")
	}
	if err := CheckLeaf(spiffeid.RequireFromString("spiffe://strait.example/x")); err != nil {
		t.Fatalf("CheckLeaf(/x): got %v, want nil", err)
	}
}

func TestParseTrustDomain(t *testing.T) {
	for in, want := range map[string]string{
		"strait.example":               "strait.example",
		"spiffe://strait.example/ns/a": "strait.example",
	} {
		td, err := ParseTrustDomain(in)
		if err != nil || td.Name() != want {
			t.Errorf("ParseTrustDomain(%q) = %v, %v; want %q", in, td, err, want)
		}
	}
	for _, bad := range []string{"", "Strait.example", "a b", strings.Repeat("a", 256)} {
		if _, err := ParseTrustDomain(bad); err == nil {
			t.Errorf("ParseTrustDomain(%q): got no error, want one", bad)
		}
	}
}
