package wiring

import (
	"context"
	"log/slog"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	"github.com/straitmesh/strait/controlplane/local"
	"github.com/straitmesh/strait/internal/clock"
)

// rotatingCluster is a root authority and a second cluster ("west") whose
// trust follows it, as a relay would make it.
type rotatingCluster struct {
	ca      *ca.Authority
	clock   *clock.Manual
	dir     *local.Dir
	current *atomic.Pointer[bundle.Bundle]
	trust   *trust
}

func newRotatingCluster(t *testing.T) *rotatingCluster {
	t.Helper()
	// The CA lives in the past, so that what it signs is valid now.
	clk := clock.NewManual(time.Now().Add(-3 * time.Hour)) // certificates signed at different steps differ in time, as in a real rotation
	root := catest.New(t, "strait.example", catest.Options{Clock: clk.Now})
	d, err := local.Init(context.Background(), filepath.Join(t.TempDir(), "west"), "west", RootAuthority{CA: root.Authority}, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	cur := &atomic.Pointer[bundle.Bundle]{}
	cur.Store(d.Bundle)
	tr, err := newTrust(d, cur, time.Hour, time.Now, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return &rotatingCluster{ca: root.Authority, clock: clk, dir: d, current: cur, trust: tr}
}

// prepareAndActivate takes prepare and activate on the CA, relays the
// prepared bundle to west, and returns west's re-signed intermediate (not
// yet offered).
func (r *rotatingCluster) prepareAndActivate(t *testing.T) []byte {
	t.Helper()
	ctx := context.Background()
	r.clock.Advance(time.Hour)
	if _, err := r.ca.Prepare(ctx, ca.PrepareOptions{}); err != nil {
		t.Fatal(err)
	}
	jws, err := r.ca.SignedBundle()
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := r.trust.OfferBundle(jws); !ok || err != nil {
		t.Fatalf("prepared bundle not installed: %v %v", ok, err)
	}
	r.clock.Advance(time.Hour)
	if err := r.ca.Activate(ctx); err != nil {
		t.Fatal(err)
	}
	im, ok := r.ca.Intermediate("west")
	if !ok {
		t.Fatal("no intermediate recorded for west")
	}
	return im.Raw
}

// A peer relays IntermediateUpdates it composes itself: any linked cluster
// has seen west's previous intermediate (it is in every chain west's nodes
// present), and between activate and retire that certificate still
// verifies under the bundle in force. Offered after the re-signed one, it
// must not put the old intermediate back in force: west's issuer would
// move back under the old root, its nodes would be told to re-issue under
// it, and the retire gate would never open (or retire would cut west).
func TestOfferIntermediateRefusesRollback(t *testing.T) {
	r := newRotatingCluster(t)
	old := r.trust.Intermediate()
	resigned := r.prepareAndActivate(t)
	if ok, err := r.trust.OfferIntermediate([][]byte{resigned}); !ok || err != nil {
		t.Fatalf("re-signed intermediate not installed: %v %v", ok, err)
	}
	want := svid.Fingerprint(r.trust.Intermediate())

	if ok, err := r.trust.OfferIntermediate([][]byte{old.Raw}); ok {
		t.Fatalf("the previous intermediate was installed again (err %v)", err)
	}
	if got := svid.Fingerprint(r.trust.Intermediate()); got != want {
		t.Fatalf("intermediate in force is %s, want the re-signed %s", got, want)
	}
	// What is on disk is what a restart puts in force.
	d, err := local.Load(r.dir.Path)
	if err != nil {
		t.Fatal(err)
	}
	if got := svid.Fingerprint(d.Chain[0]); got != want {
		t.Fatalf("intermediate on disk is %s, want the re-signed %s", got, want)
	}
	// The issuer signs under the re-signed intermediate.
	id, err := identity.Workload(r.dir.TrustDomain, "default", "web")
	if err != nil {
		t.Fatal(err)
	}
	sv, err := r.trust.issuer.MintSVID(id, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if got := svid.IssuerFingerprint(sv.Certificates); got != want {
		t.Fatalf("issuer signs under %s, want %s", got, want)
	}
}
