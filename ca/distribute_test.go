package ca_test

import (
	"bytes"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/bundlesig"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/svid"
)

// activeRoot returns the certificate of the active root.
func (h *rotationHarness) activeRoot() *x509.Certificate {
	h.t.Helper()
	for _, r := range h.a.Status().Roots {
		if r.State != ca.RootActive {
			continue
		}
		for _, c := range h.a.Bundle().Roots() {
			if strings.HasSuffix(c.Subject.CommonName, " "+r.ID) {
				return c
			}
		}
	}
	h.t.Fatal("no active root in the bundle")
	return nil
}

func kidOf(t *testing.T, token string) string {
	t.Helper()
	enc, _, _ := strings.Cut(token, ".")
	raw, err := base64.RawURLEncoding.DecodeString(enc)
	if err != nil {
		t.Fatal(err)
	}
	var h struct{ Kid string }
	if err := json.Unmarshal(raw, &h); err != nil {
		t.Fatal(err)
	}
	return h.Kid
}

// Every step of a rotation leaves a signed bundle that a member holding the
// bundle from before the step accepts: prepare, activate (same bundle, new
// signer: not newer), retire, and taint then revoke.
func TestSignedBundleFollowsRotation(t *testing.T) {
	h := newRotationHarness(t)
	ctx := t.Context()
	steps := []struct {
		name    string
		do      func() error
		changes bool // the step changes the bundle (sequence+1)
	}{
		{"prepare", func() error { _, err := h.a.Prepare(ctx, ca.PrepareOptions{}); return err }, true},
		{"activate", func() error { return h.a.Activate(ctx) }, false},
		{"retire", func() error { return h.a.Retire(ctx, ca.RetireOptions{Acknowledged: true}) }, true},
		{"prepare again", func() error { _, err := h.a.Prepare(ctx, ca.PrepareOptions{}); return err }, true},
		{"activate again", func() error { return h.a.Activate(ctx) }, false},
		{"taint", func() error { return h.a.Taint(ctx, h.a.Status().Roots[1].ID) }, false},
		{"revoke", func() error { return h.a.Revoke(ctx, h.a.Status().Roots[1].ID) }, true},
	}
	held := h.a.Bundle()
	for _, s := range steps {
		h.clk.Advance(time.Minute)
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		h.reopen()
		token, err := h.a.SignedBundle()
		if err != nil {
			t.Fatalf("%s: SignedBundle: %v", s.name, err)
		}
		if again, err := h.a.SignedBundle(); err != nil || again != token {
			t.Fatalf("%s: second SignedBundle: got a different token (%v), want the cached one", s.name, err)
		}
		if got, want := kidOf(t, token), svid.Fingerprint(h.activeRoot()); got != want {
			t.Fatalf("%s: signed by %s, want the active root %s", s.name, got, want)
		}
		cur := h.a.Bundle()
		got, err := bundlesig.Verify(held, token)
		switch {
		case s.changes && err != nil:
			t.Fatalf("%s: Verify against bundle %d: %v", s.name, held.Sequence(), err)
		case !s.changes && !errors.Is(err, bundlesig.ErrNotNewer):
			t.Fatalf("%s: Verify against the same bundle %d: got %v, want ErrNotNewer", s.name, held.Sequence(), err)
		case got == nil || got.Sequence() != cur.Sequence() || got.Digest() != cur.Digest():
			t.Fatalf("%s: Verify returned %v, want bundle %d %s", s.name, got, cur.Sequence(), cur.Digest())
		}
		held = cur
	}
	if got := held.Sequence(); got != 5 {
		t.Fatalf("bundle sequence after the walk: got %d, want 5", got)
	}
}

// A cluster that sent a CSR keeps its key across activation: the root
// authority re-signs its public key under the new root, and leaves the
// cluster issued before verify with the new certificate in their chain.
func TestActivateResignsIntermediatesFromCSRs(t *testing.T) {
	h := newRotationHarness(t)
	ctx := t.Context()
	westKey, westCSR := catest.CSR(t, nil)
	westOld, err := h.a.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: "west", CSR: westCSR, TTL: 30 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.a.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: "south", CSR: func() []byte { _, c := catest.CSR(t, nil); return c }(), TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	// West's own issuer, as west's control plane holds it.
	west, err := ca.NewIssuer(ca.IssuerConfig{TrustDomain: h.a.TrustDomain(), Chain: []*x509.Certificate{westOld}, Signer: westKey, Clock: h.clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := west.MintSVID(web, 3*time.Hour)
	if err != nil {
		t.Fatal(err)
	}

	h.clk.Advance(2 * time.Hour) // south's intermediate has expired
	if _, err := h.a.Prepare(ctx, ca.PrepareOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := h.a.Activate(ctx); err != nil {
		t.Fatal(err)
	}
	h.reopen()
	rootB := h.activeRoot()

	westNew, ok := h.a.Intermediate("west")
	switch {
	case !ok:
		t.Fatal("Intermediate(west): none after activate")
	case westNew.Equal(westOld):
		t.Fatal("west's intermediate was not re-signed")
	case !bytes.Equal(westNew.RawSubjectPublicKeyInfo, westOld.RawSubjectPublicKeyInfo):
		t.Fatal("re-signed intermediate has another public key, want west's")
	case !westNew.NotAfter.Equal(westOld.NotAfter):
		t.Fatalf("re-signed intermediate expires %s, want %s as before", westNew.NotAfter, westOld.NotAfter)
	case len(westNew.Subject.OrganizationalUnit) != 1 || westNew.Subject.OrganizationalUnit[0] != "west":
		t.Fatalf("re-signed intermediate is for %v, want west", westNew.Subject.OrganizationalUnit)
	}
	if err := westNew.CheckSignatureFrom(rootB); err != nil {
		t.Fatalf("re-signed intermediate does not chain to the active root: %v", err)
	}
	_, chains, err := h.verifier().Verify([]*x509.Certificate{leaf.Certificates[0], westNew}, svid.RoleClient)
	if err != nil {
		t.Fatalf("leaf issued by west before activate, with the re-signed intermediate: %v", err)
	}
	if top := chains[0][len(chains[0])-1]; !top.Equal(rootB) {
		t.Fatalf("chain ends at %q, want the active root %q", top.Subject, rootB.Subject)
	}

	// South had expired: it stays as it was, and is not distributed.
	for _, im := range h.a.Status().Intermediates {
		if im.Cluster == "south" && im.State != "expired" {
			t.Fatalf("south after activate: %s, want expired (not revived)", im.State)
		}
	}
	if _, ok := h.a.Intermediate("south"); !ok {
		t.Fatal("Intermediate(south): the expired record is gone, want it reported")
	}
	if _, ok := h.a.Intermediate("nowhere"); ok {
		t.Fatal("Intermediate(nowhere): got one, want none")
	}
	all := h.a.Intermediates()
	if len(all) != 2 || !all["west"].Equal(westNew) || all["east"] == nil || all["south"] != nil {
		t.Fatalf("Intermediates: got %v, want east and west (re-signed), not the expired south", keys(all))
	}
	if err := all["east"].CheckSignatureFrom(rootB); err != nil {
		t.Fatalf("east (key held here) does not chain to the active root: %v", err)
	}
}

func keys(m map[string]*x509.Certificate) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestRetireAcknowledged(t *testing.T) {
	h := newRotationHarness(t)
	ctx := t.Context()
	_, csr := catest.CSR(t, nil)
	if _, err := h.a.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: "west", CSR: csr}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.a.Prepare(ctx, ca.PrepareOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := h.a.Activate(ctx); err != nil {
		t.Fatal(err)
	}
	h.clk.Advance(time.Minute)
	// Without acknowledgements, retire waits for leaves under the old root
	// and says how to avoid waiting.
	h.refused(h.a.Status(), h.a.Retire(ctx, ca.RetireOptions{}), "strait ca rotate retire' through the root authority's control plane")
	seq := h.a.Bundle().Sequence()
	if err := h.a.Retire(ctx, ca.RetireOptions{Acknowledged: true}); err != nil {
		t.Fatalf("retire, acknowledged: %v", err)
	}
	h.reopen()
	if b := h.a.Bundle(); b.Sequence() != seq+1 || len(b.Roots()) != 1 || !b.Contains(h.activeRoot()) {
		t.Fatalf("after an acknowledged retire: bundle %d with %d roots, want %d with the active root only", b.Sequence(), len(b.Roots()), seq+1)
	}
}
