package identity

import (
	"testing"
)

// FuzzParse checks that Parse never panics, that whatever it accepts
// round-trips exactly and stays within the limits, and that Classify agrees
// with the builders.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"spiffe://strait.example/ns/default/sa/web",
		"spiffe://strait.example/cluster/east/gateway",
		"spiffe://strait.example",
		"spiffe://a/b/../c",
		"spiffe://xn--bcher-kva.example/%41",
		"SPIFFE://x/y",
		"spiffe://x:1/y",
		"spiffe://user@x/y",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := Parse(s)
		if err != nil {
			return
		}
		if id.String() != s {
			t.Fatalf("Parse(%q) round-trips to %q", s, id)
		}
		if len(s) > MaxIDLength {
			t.Fatalf("Parse accepted %d bytes", len(s))
		}
		again, err := Parse(id.String())
		if err != nil || again != id {
			t.Fatalf("re-parse of %q: %v, %v", id, again, err)
		}
		info := Classify(id)
		var rebuilt string
		switch info.Kind {
		case KindWorkload:
			w, err := Workload(id.TrustDomain(), info.Namespace, info.ServiceAccount)
			if err != nil {
				t.Fatalf("Workload(%+v): %v", info, err)
			}
			rebuilt = w.String()
		case KindGateway:
			g, err := Gateway(id.TrustDomain(), info.Cluster)
			if err != nil {
				t.Fatalf("Gateway(%+v): %v", info, err)
			}
			rebuilt = g.String()
		default:
			return
		}
		if rebuilt != s {
			t.Fatalf("Classify(%q) rebuilds as %q", s, rebuilt)
		}
	})
}
