package gateway

import (
	"crypto/x509"
	"testing"
	"time"

	"github.com/straitmesh/strait/ca/catest"
)

func TestChainTableSharesAndForgets(t *testing.T) {
	ca := catest.New(t, testTD)
	parse := func(sv [][]byte) []*x509.Certificate {
		var out []*x509.Certificate
		for _, der := range sv {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, c)
		}
		return out
	}
	raw := func(id string) [][]byte {
		var out [][]byte
		for _, c := range ca.SVID(t, id, time.Hour).Certificates {
			out = append(out, c.Raw)
		}
		return out
	}
	a, b := raw(workloadID("default", "a")), raw(workloadID("default", "b"))
	var tab chainTable
	first, r1 := tab.acquire(parse(a))
	again, r2 := tab.acquire(parse(a)) // the same chain, parsed again by another handshake
	other, r3 := tab.acquire(parse(b))
	if &first[0] != &again[0] {
		t.Error("two connections presenting the same chain keep two parsed copies")
	}
	if &other[0] == &first[0] {
		t.Error("different chains share one copy")
	}
	r1()
	r1() // twice is harmless
	if len(tab.m) != 2 {
		t.Errorf("%d chains kept after one of two holders let go, want 2", len(tab.m))
	}
	r2()
	r3()
	if len(tab.m) != 0 {
		t.Errorf("%d chains kept after every holder let go, want 0", len(tab.m))
	}
}

func TestEntryConnectionsShareTheirChain(t *testing.T) {
	p := newPair(t, gwOptions{}, gwOptions{})
	c1 := mustTunnel(t, p.east, p.sidecar, echoHeader())
	defer c1.Close()
	c2 := mustTunnel(t, p.east, p.sidecar, echoHeader())
	defer c2.Close()
	p.east.mu.Lock()
	var chains [][]*x509.Certificate
	for ec := range p.east.entries {
		chains = append(chains, ec.chain)
	}
	p.east.mu.Unlock()
	if len(chains) != 2 || &chains[0][0] != &chains[1][0] {
		t.Errorf("entry connections of one sidecar hold %d chains, not one shared copy", len(chains))
	}
}
