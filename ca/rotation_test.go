package ca_test

import (
	"context"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/svid"
)

// rotationHarness is a CA on disk with an injected clock, reopened from disk
// after every step to prove the step was persisted.
type rotationHarness struct {
	t   *testing.T
	dir string
	clk *fakeClock
	a   *ca.Authority
}

func newRotationHarness(t *testing.T) *rotationHarness {
	clk := newClock()
	dir := t.TempDir()
	a, err := ca.Init(t.Context(), ca.Config{Dir: dir, Clock: clk.Now}, ca.InitOptions{TrustDomain: spiffeid.RequireTrustDomainFromString(td)})
	if err != nil {
		t.Fatal(err)
	}
	h := &rotationHarness{t: t, dir: dir, clk: clk, a: a}
	t.Cleanup(func() { h.a.Close() })
	if _, err := a.CreateIntermediate(t.Context(), "east", 0, false); err != nil {
		t.Fatal(err)
	}
	return h
}

// reopen closes and reopens the authority, checking nothing changed.
func (h *rotationHarness) reopen() {
	h.t.Helper()
	before := h.a.Status()
	if err := h.a.Close(); err != nil {
		h.t.Fatal(err)
	}
	a, err := ca.Open(h.t.Context(), ca.Config{Dir: h.dir, Clock: h.clk.Now})
	if err != nil {
		h.t.Fatalf("reopen: %v", err)
	}
	h.a = a
	if after := a.Status(); !reflect.DeepEqual(normalize(before), normalize(after)) {
		h.t.Fatalf("status changed across reopen:\n before %+v\n after  %+v", before, after)
	}
}

// normalize drops monotonic clock readings so statuses compare by value.
func normalize(s ca.Status) ca.Status {
	for i := range s.Roots {
		s.Roots[i].Changed = s.Roots[i].Changed.UTC()
		s.Roots[i].NotBefore, s.Roots[i].NotAfter = s.Roots[i].NotBefore.UTC(), s.Roots[i].NotAfter.UTC()
	}
	for i := range s.Intermediates {
		s.Intermediates[i].NotBefore, s.Intermediates[i].NotAfter = s.Intermediates[i].NotBefore.UTC(), s.Intermediates[i].NotAfter.UTC()
	}
	return s
}

func (h *rotationHarness) states() map[string]ca.RootState {
	out := map[string]ca.RootState{}
	for _, r := range h.a.Status().Roots {
		out[r.ID] = r.State
	}
	return out
}

// refused checks that err is ErrTransition mentioning want and that the
// refused step changed nothing.
func (h *rotationHarness) refused(before ca.Status, err error, want string) {
	h.t.Helper()
	if !errors.Is(err, ca.ErrTransition) || !strings.Contains(err.Error(), want) {
		h.t.Fatalf("got error %v, want ErrTransition mentioning %q", err, want)
	}
	if after := h.a.Status(); !reflect.DeepEqual(before, after) {
		h.t.Fatalf("a refused transition changed the state:\n before %+v\n after  %+v", before, after)
	}
}

func (h *rotationHarness) verifier() *svid.Verifier {
	b := h.a.Bundle()
	v, err := svid.NewVerifier(svid.VerifierConfig{TrustDomain: b.TrustDomain(), Bundles: b, Clock: h.clk.Now})
	if err != nil {
		h.t.Fatal(err)
	}
	return v
}

func TestRotationLifecycle(t *testing.T) {
	h := newRotationHarness(t)
	ctx := t.Context()
	rootA := h.a.Status().Roots[0].ID
	if seq := h.a.Bundle().Sequence(); seq != 1 {
		t.Fatalf("initial bundle sequence: got %d, want 1", seq)
	}

	// Nothing to activate or retire yet.
	st := h.a.Status()
	h.refused(st, h.a.Activate(ctx), "no prepared root")
	h.refused(st, h.a.Retire(ctx, ca.RetireOptions{}), "no old root")
	h.refused(st, h.a.Taint(ctx, rootA), "is active")

	// A remote cluster's intermediate, signed from its CSR under root A.
	_, westCSR := catest.CSR(t, nil)
	if _, err := h.a.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: "west", CSR: westCSR}); err != nil {
		t.Fatal(err)
	}
	iss, err := h.a.Issuer("east")
	if err != nil {
		t.Fatal(err)
	}
	before, err := iss.MintSVID(web, time.Hour)
	if err != nil {
		t.Fatal(err)
	}

	// prepare: B joins the bundle, A keeps signing.
	h.clk.Advance(time.Minute)
	prepared, err := h.a.Prepare(ctx, ca.PrepareOptions{})
	if err != nil {
		t.Fatalf("prepare: %v", err)
	}
	rootB := prepared.ID
	h.reopen()
	if got, want := h.states(), map[string]ca.RootState{rootA: ca.RootActive, rootB: ca.RootPrepared}; !reflect.DeepEqual(got, want) {
		t.Fatalf("after prepare: got %v, want %v", got, want)
	}
	if b := h.a.Bundle(); b.Sequence() != 2 || len(b.Roots()) != 2 {
		t.Fatalf("after prepare: bundle seq %d with %d roots, want 2 with 2", b.Sequence(), len(b.Roots()))
	}
	h.refused(h.a.Status(), func() error { _, err := h.a.Prepare(ctx, ca.PrepareOptions{}); return err }(), "activate it first")

	// activate: B signs; east's intermediate (key held here) is re-signed
	// with the same key, so the SVID issued before still chains, now to B.
	h.clk.Advance(time.Minute)
	if err := h.a.Activate(ctx); err != nil {
		t.Fatalf("activate: %v", err)
	}
	h.reopen()
	if got, want := h.states(), map[string]ca.RootState{rootA: ca.RootOld, rootB: ca.RootActive}; !reflect.DeepEqual(got, want) {
		t.Fatalf("after activate: got %v, want %v", got, want)
	}
	iss, _ = h.a.Issuer("east")
	oldLeafNewChain := append([]*x509.Certificate{before.Certificates[0]}, iss.Chain()...)
	if _, chains, err := h.verifier().Verify(oldLeafNewChain, svid.RoleClient); err != nil {
		t.Fatalf("SVID issued before activate, with the re-signed intermediate: %v", err)
	} else if root := chains[0][len(chains[0])-1]; !strings.Contains(root.Subject.CommonName, rootB) {
		t.Fatalf("re-signed chain ends at %q, want root %s", root.Subject.CommonName, rootB)
	}

	// West's intermediate, signed from a CSR, was re-signed under B too.
	for _, im := range h.a.Status().Intermediates {
		if im.RootID != rootB || im.State != "valid" {
			t.Fatalf("intermediate of %s after activate: %s under %s, want valid under %s", im.Cluster, im.State, im.RootID, rootB)
		}
	}
	// Leaves issued under A's chain live up to MaxSVIDTTL after A stopped
	// signing: retire waits for them.
	activated := h.clk.Now()
	h.clk.Advance(time.Minute)
	h.refused(h.a.Status(), h.a.Retire(ctx, ca.RetireOptions{}), "may be in use until")
	if ra := h.a.Status().Roots[0].RetireAfter; ra == nil || !ra.Equal(activated.Add(ca.MaxSVIDTTL)) {
		t.Fatalf("status retire_after: got %v, want %s", ra, activated.Add(ca.MaxSVIDTTL))
	}
	h.clk.Advance(ca.MaxSVIDTTL)
	if err := h.a.Retire(ctx, ca.RetireOptions{}); err != nil {
		t.Fatalf("retire: %v", err)
	}
	h.reopen()
	if got, want := h.states(), map[string]ca.RootState{rootA: ca.RootRetired, rootB: ca.RootActive}; !reflect.DeepEqual(got, want) {
		t.Fatalf("after retire: got %v, want %v", got, want)
	}
	if b := h.a.Bundle(); b.Sequence() != 3 || len(b.Roots()) != 1 {
		t.Fatalf("after retire: bundle seq %d with %d roots, want 3 with 1", b.Sequence(), len(b.Roots()))
	}
	// By the time A could be retired, every leaf issued with a chain to A
	// has expired: nothing valid chained to the root that left.
	if _, _, err := h.verifier().Verify(before.Certificates, svid.RoleClient); svid.ReasonOf(err) != svid.ReasonExpired {
		t.Fatalf("SVID issued under A, after retire: got %v, want expired", err)
	}
	if _, _, err := h.verifier().Verify(oldLeafNewChain, svid.RoleClient); svid.ReasonOf(err) != svid.ReasonExpired {
		t.Fatalf("same leaf with the re-signed chain: got %v, want expired (not untrusted)", err)
	}
	fresh, err := iss.MintSVID(web, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := h.verifier().Verify(fresh.Certificates, svid.RoleClient); err != nil {
		t.Fatalf("SVID issued after retire: %v", err)
	}
	keys, _ := filepath.Glob(filepath.Join(h.dir, "keys", "root-*"))
	if len(keys) != 1 {
		t.Fatalf("root key files after retire: got %d, want 1 (the retired root's key is destroyed)", len(keys))
	}
}

func TestTaintAndRevoke(t *testing.T) {
	h := newRotationHarness(t)
	ctx := t.Context()
	rootA := h.a.Status().Roots[0].ID
	iss, _ := h.a.Issuer("east")
	underA, err := iss.MintSVID(web, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.a.Prepare(ctx, ca.PrepareOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := h.a.Activate(ctx); err != nil {
		t.Fatal(err)
	}
	st := h.a.Status()
	h.refused(st, h.a.Revoke(ctx, rootA), "taint it before revoking")
	h.refused(st, h.a.Taint(ctx, "nope"), `no root "nope"`)
	if err := h.a.Taint(ctx, rootA); err != nil {
		t.Fatalf("taint: %v", err)
	}
	h.reopen()
	if got := h.states()[rootA]; got != ca.RootTainted {
		t.Fatalf("after taint: root A is %s, want tainted", got)
	}
	st = h.a.Status()
	h.refused(st, h.a.Retire(ctx, ca.RetireOptions{}), "revoke it instead")
	h.refused(st, func() error { _, err := h.a.Prepare(ctx, ca.PrepareOptions{}); return err }(), "revoke it first")
	// Still trusted until revoked: nothing breaks at taint time.
	if _, _, err := h.verifier().Verify(underA.Certificates, svid.RoleClient); err != nil {
		t.Fatalf("SVID under tainted root before revoke: %v", err)
	}
	seq := h.a.Bundle().Sequence()
	if err := h.a.Revoke(ctx, rootA); err != nil {
		t.Fatalf("revoke: %v", err)
	}
	h.reopen()
	if got := h.states()[rootA]; got != ca.RootRevoked {
		t.Fatalf("after revoke: root A is %s, want revoked", got)
	}
	if got := h.a.Bundle().Sequence(); got != seq+1 {
		t.Fatalf("bundle sequence after revoke: got %d, want %d", got, seq+1)
	}
	if _, _, err := h.verifier().Verify(underA.Certificates, svid.RoleClient); svid.ReasonOf(err) != svid.ReasonUntrusted {
		t.Fatalf("SVID under revoked root: got %v, want untrusted", err)
	}
	// The next slot is free again.
	if _, err := h.a.Prepare(ctx, ca.PrepareOptions{}); err != nil {
		t.Fatalf("prepare after revoke: %v", err)
	}
}

func TestRetireForce(t *testing.T) {
	h := newRotationHarness(t)
	ctx := t.Context()
	_, csr := catest.CSR(t, nil)
	if _, err := h.a.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: "west", CSR: csr}); err != nil {
		t.Fatal(err)
	}
	h.a.Prepare(ctx, ca.PrepareOptions{})
	h.a.Activate(ctx)
	h.refused(h.a.Status(), h.a.Retire(ctx, ca.RetireOptions{}), "may be in use until")
	if err := h.a.Retire(ctx, ca.RetireOptions{Force: true}); err != nil {
		t.Fatalf("retire --force: %v", err)
	}
	for _, im := range h.a.Status().Intermediates {
		if im.State != "valid" {
			t.Fatalf("%s intermediate state after retire: got %s, want valid (re-signed at activate)", im.Cluster, im.State)
		}
	}
}

func TestInitAndOpenErrors(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	tdID := spiffeid.RequireTrustDomainFromString(td)
	if _, err := ca.Open(ctx, ca.Config{Dir: dir}); !errors.Is(err, ca.ErrNotInitialized) {
		t.Fatalf("Open(empty dir): got %v, want ErrNotInitialized", err)
	}
	a, err := ca.Init(ctx, ca.Config{Dir: dir}, ca.InitOptions{TrustDomain: tdID})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.Open(ctx, ca.Config{Dir: dir}); !errors.Is(err, ca.ErrBusy) {
		t.Fatalf("second Open while locked: got %v, want ErrBusy", err)
	}
	ro, err := ca.Open(ctx, ca.Config{Dir: dir, ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only Open while locked: %v", err)
	}
	if _, err := ro.Prepare(ctx, ca.PrepareOptions{}); !errors.Is(err, ca.ErrReadOnly) {
		t.Fatalf("Prepare on read-only: got %v, want ErrReadOnly", err)
	}
	ro.Close()
	first := a.Status().Roots[0].ID
	a.Close()
	if _, err := ca.Init(ctx, ca.Config{Dir: dir}, ca.InitOptions{TrustDomain: tdID}); !errors.Is(err, ca.ErrExists) {
		t.Fatalf("Init over an existing CA: got %v, want ErrExists", err)
	}
	a, err = ca.Init(ctx, ca.Config{Dir: dir}, ca.InitOptions{TrustDomain: tdID, Force: true})
	if err != nil {
		t.Fatalf("Init --force: %v", err)
	}
	defer a.Close()
	if a.Status().Roots[0].ID == first {
		t.Fatal("Init --force kept the old root")
	}
	backups, _ := filepath.Glob(filepath.Join(dir, "state.json.replaced-*"))
	if len(backups) != 1 {
		t.Fatalf("backups of the replaced state: got %d, want 1", len(backups))
	}
	info, err := os.Stat(filepath.Join(dir, a.Status().Roots[0].Key))
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("root key file mode: got %v, %v; want 0600", info.Mode().Perm(), err)
	}

	// A corrupted state file is an error naming the file, not a panic.
	a.Close()
	if err := os.WriteFile(filepath.Join(dir, "state.json"), []byte(`{"version":1,"trust_domain":"x","roots":[{"id":"a","state":"active","cert":"junk"}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.Open(ctx, ca.Config{Dir: dir}); err == nil || !strings.Contains(err.Error(), "state.json") {
		t.Fatalf("Open(corrupt state): got %v, want an error naming state.json", err)
	}
}

// TestRootIDFromCertificate: a cluster that holds only the bundle names a
// root as the CA does (svid.RootID of its certificate).
func TestRootIDFromCertificate(t *testing.T) {
	c := catest.New(t, "strait.example")
	ids := map[string]bool{}
	for _, r := range c.Authority.Status().Roots {
		ids[r.ID] = true
	}
	for _, cert := range c.Bundle().Roots() {
		if id := svid.RootID(cert); !ids[id] {
			t.Errorf("svid.RootID of a bundle root = %s, not among the CA's root IDs %v", id, ids)
		}
	}
}
