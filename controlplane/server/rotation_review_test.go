package server

import (
	"context"
	"crypto/x509"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/straitmesh/strait/ca/svid"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/store"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// blockingCA is a RootCA whose Activate waits until release is closed.
type blockingCA struct {
	mu        sync.Mutex
	roots     []RootInfo
	activated chan struct{} // closed when Activate starts
	release   chan struct{}
	retired   bool
}

func (c *blockingCA) Roots() []RootInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]RootInfo(nil), c.roots...)
}

func (c *blockingCA) Prepare(context.Context, time.Duration) error { return nil }

func (c *blockingCA) Activate(context.Context) error {
	close(c.activated)
	<-c.release
	c.mu.Lock()
	defer c.mu.Unlock()
	c.roots = []RootInfo{{ID: "r1", State: "old", InBundle: true, Fingerprint: "sha256:r1"}, {ID: "r2", State: "active", InBundle: true, Fingerprint: "sha256:r2"}}
	return nil
}

func (c *blockingCA) Retire(context.Context, bool, bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.retired = true
	return nil
}

func (c *blockingCA) Taint(context.Context, string) error         { return nil }
func (c *blockingCA) Revoke(context.Context, string) error        { return nil }
func (c *blockingCA) Intermediates() map[string]*x509.Certificate { return nil }

func (c *blockingCA) Sync() error { return nil }

// Cancelling an automatic rotation while the loop is taking a step must
// stick: the loop must not write back the record it read before the
// cancel (Running, with the step it took), which would carry the rotation
// on behind the operator's back.
func TestAutoRotateCancelDuringStep(t *testing.T) {
	e := newTestEnv(t)
	rca := &blockingCA{
		roots:     []RootInfo{{ID: "r1", State: "active", InBundle: true, Fingerprint: "sha256:r1"}, {ID: "r2", State: "prepared", InBundle: true, Fingerprint: svid.Fingerprint(e.ca.Bundle().Roots()[0])} /* in the bundle in force */},
		activated: make(chan struct{}),
		release:   make(chan struct{}),
	}
	e.srv.cfg.RootCA = rca
	if err := e.srv.rebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := e.store.PutAutoRotation(store.AutoRotation{Running: true, Started: time.Now(), Steps: []store.RotationStep{{Step: stepPrepare, Taken: time.Now()}}}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	loopDone := make(chan struct{})
	go func() { defer close(loopDone); e.srv.autoLoop(ctx) }()
	defer func() { cancel(); <-loopDone }()

	select {
	case <-rca.activated:
	case <-time.After(5 * time.Second):
		close(rca.release)
		t.Fatal("the automatic rotation did not take activate")
	}
	cancelled := make(chan error, 1)
	go func() {
		_, err := rotationServer{s: e.srv}.AutoRotate(context.Background(), &controlplanev1.AutoRotateRequest{Cancel: true})
		cancelled <- err
	}()
	time.Sleep(200 * time.Millisecond) // the cancel is in (or waiting for the step)
	close(rca.release)
	if err := <-cancelled; err != nil {
		t.Fatalf("cancel: %v", err)
	}
	time.Sleep(time.Second) // several ticks of the loop
	a, err := e.store.GetAutoRotation()
	if err != nil {
		t.Fatal(err)
	}
	if a.Running {
		t.Fatalf("the automatic rotation runs on after it was cancelled: %+v", a)
	}
	rca.mu.Lock()
	defer rca.mu.Unlock()
	if rca.retired {
		t.Fatal("the cancelled automatic rotation retired the old root")
	}
}

// With two gateways, the peer's rotation report that counts is the one
// from the gateway that heard from the peer last: a gateway whose streams
// from the peer moved to the other one keeps the last report it got, and
// that stale report must not hold the gates shut (or show an old state)
// because its gateway's name sorts last.
func TestRotationReportFromFreshestGateway(t *testing.T) {
	e := newTestEnv(t)
	s := e.srv
	now := time.Now()
	if err := e.store.PutLink(store.Link{ID: "l-west", Peer: "west", PeerGateways: []string{"127.0.0.1:1"}, Role: "issuer", Created: now}); err != nil {
		t.Fatal(err)
	}
	fresh := &federationv1.RotationReport{Cluster: "west", BundleSequence: 2, BundleDigest: "sha256:new", Nodes: 3, NodesBundleCurrent: 3, NodesSvidCurrent: 3}
	stale := &federationv1.RotationReport{Cluster: "west", BundleSequence: 1, BundleDigest: "sha256:old", Nodes: 3}
	s.mu.Lock()
	s.gateways["gw-a"] = &gatewayNode{name: "gw-a", streams: 1, entry: "127.0.0.1:15443", reported: now, reports: map[string]*controlplanev1.PeerReport{
		"west": {Peer: "west", ControlStreamUp: true, LastHeard: timestamppb.New(now), Rotation: fresh},
	}}
	s.gateways["gw-b"] = &gatewayNode{name: "gw-b", streams: 1, entry: "127.0.0.1:15444", reported: now, reports: map[string]*controlplanev1.PeerReport{
		"west": {Peer: "west", LastHeard: timestamppb.New(now.Add(-time.Minute)), Rotation: stale},
	}}
	s.mu.Unlock()
	if err := s.rebuild(t.Context()); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	got := s.world.fed.rotations["west"]
	s.mu.Unlock()
	if !proto.Equal(got, fresh) {
		t.Fatalf("west's rotation report is %v, want the one gw-a heard last: %v", got, fresh)
	}
}

// fakeTrust records what offerRotation offers.
type fakeTrust struct {
	mu      sync.Mutex
	signed  string
	offered []string
}

func (f *fakeTrust) Intermediate() *x509.Certificate { return nil }

func (f *fakeTrust) SignedBundle() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.signed
}

func (f *fakeTrust) OfferBundle(jws string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.offered = append(f.offered, jws)
	return false, nil
}

func (f *fakeTrust) OfferIntermediate([][]byte) (bool, error) { return false, nil }

// A cluster that holds the bundle in force but not its signed form (it
// joined after the last step, or never installed one by relay) keeps the
// signed form a peer relays, so that it can relay it on: that relay must
// reach Trust even though its sequence is not newer. Once the signed form
// is held, relays of the same sequence are not offered again.
func TestOfferRotationKeepsSignedFormOfBundleHeld(t *testing.T) {
	e := newTestEnv(t)
	tr := &fakeTrust{}
	e.srv.cfg.Trust = tr
	seq := e.bundle.Load().Sequence()
	reports := map[string]*controlplanev1.PeerReport{
		"west": {Peer: "west", SignedBundle: &federationv1.SignedBundle{Jws: "jws-same", Sequence: seq}},
	}
	e.srv.offerRotation(reports)
	if len(tr.offered) != 1 {
		t.Fatalf("offered %d signed bundles of the sequence held while none is kept, want 1", len(tr.offered))
	}
	tr.signed = "jws-same"
	e.srv.offerRotation(reports)
	if len(tr.offered) != 1 {
		t.Fatalf("the signed form of the bundle held was offered again once kept (%d offers)", len(tr.offered))
	}
}

// slowTrust answers Intermediate slowly, as a Trust under load may.
type slowTrust struct {
	fakeTrust
	inter *x509.Certificate
}

func (s *slowTrust) Intermediate() *x509.Certificate {
	time.Sleep(20 * time.Millisecond)
	return s.inter
}

// The watcher ownSVIDLoop starts each time round (is the intermediate still
// the one the SVID came from?) must not read the SVID the loop replaces
// once it renewed: it outlives the wait it was started for.
func TestOwnSVIDLoopWatcherDoesNotRace(t *testing.T) {
	e := newTestEnv(t)
	e.srv.cfg.SVIDTTL = time.Second // the CA's minimum
	sv, err := e.srv.renewOwnSVID()
	if err != nil {
		t.Fatal(err)
	}
	e.srv.cfg.Trust = &slowTrust{inter: sv.Certificates[1]}
	ctx, cancel := context.WithTimeout(context.Background(), 2500*time.Millisecond)
	defer cancel()
	e.srv.ownSVIDLoop(ctx, sv)
}

// Right after a control plane starts, its nodes have not reconnected yet:
// a report counting only the nodes attached so far (none, or the gateway
// alone) would call the cluster in sync and could open a gate (retire
// while the cluster's sidecars still present SVIDs under the old root).
// The report holds the cluster behind until its nodes had time to come
// back.
func TestRotationReportSettlesAfterStart(t *testing.T) {
	e := newTestEnv(t)
	s := e.srv
	s.mu.Lock()
	s.started = time.Now()
	s.mu.Unlock()
	if err := s.rebuild(t.Context()); err != nil {
		t.Fatal(err)
	}
	st := s.rotationStatus()
	if own := st.GetClusters()[0]; own.GetBundleInSync() || own.GetWaiting() == "" {
		t.Fatalf("a control plane started just now reports its cluster in sync: %v", own)
	}
	s.mu.Lock()
	s.started = time.Now().Add(-time.Minute)
	s.mu.Unlock()
	if err := s.rebuild(t.Context()); err != nil {
		t.Fatal(err)
	}
	st = s.rotationStatus()
	if own := st.GetClusters()[0]; !own.GetBundleInSync() {
		t.Fatalf("a control plane up for a minute with no nodes is not in sync: %v", own)
	}
}

// What nodes report is any valid UTF-8 of up to 128 bytes: abbreviating
// it for a rotation report must not cut a character in two. A report with
// invalid UTF-8 does not marshal, and it is in every gateway snapshot: one
// workload could end its cluster's gateway's configuration stream for
// good (and the status RPC).
func TestRotationReportAbbreviatesOnCharacterBoundary(t *testing.T) {
	e := newTestEnv(t)
	s := e.srv
	id := spiffeid.RequireFromString("spiffe://" + testTD + "/ns/default/sa/web")
	n, wake := s.attach("web-0", id)
	defer s.detach(n, wake)
	// "é" straddles byte 19, where digests are abbreviated.
	odd := "sha256:0123456789aé" + strings.Repeat("f", 40)
	s.noteDigest("web-0", id, odd, odd, controlplanev1.Health_HEALTH_HEALTHY)
	if err := s.rebuild(t.Context()); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	w := s.world
	s.mu.Unlock()
	if _, err := proto.Marshal(gatewaySnapshot(w, testCluster)); err != nil {
		t.Fatalf("the gateway snapshot does not marshal: %v", err)
	}
	if _, err := proto.Marshal(s.rotationStatus()); err != nil {
		t.Fatalf("the rotation status does not marshal: %v", err)
	}
}

// interTrust is a Trust whose intermediate can be set.
type interTrust struct {
	fakeTrust
	inter atomic.Pointer[x509.Certificate]
}

func (i *interTrust) Intermediate() *x509.Certificate { return i.inter.Load() }

// The control plane's own serving SVID must be on the cluster's current
// intermediate before the cluster counts as moved: every node verifies it
// on each new connection, and after retire one from the old intermediate
// no longer verifies.
func TestRotationReportCountsServingSVID(t *testing.T) {
	e := newTestEnv(t)
	s := e.srv
	sv, err := s.renewOwnSVID()
	if err != nil {
		t.Fatal(err)
	}
	tr := &interTrust{}
	s.cfg.Trust = tr
	// The intermediate was re-signed: the serving SVID is from the old one.
	other := catest.New(t, testTD, catest.Options{Cluster: testCluster})
	tr.inter.Store(other.SVID(t, "spiffe://"+testTD+"/ns/default/sa/x", time.Hour).Certificates[1])
	if err := s.rebuild(t.Context()); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	r := s.world.rotation
	s.mu.Unlock()
	if r.GetNodesSvidCurrent() == r.GetNodes() {
		t.Fatalf("the control plane serves an SVID from an intermediate no longer in force, and its cluster counts as moved: %v", r)
	}
	tr.inter.Store(sv.Certificates[1])
	if err := s.rebuild(t.Context()); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	r = s.world.rotation
	s.mu.Unlock()
	if r.GetNodesSvidCurrent() != r.GetNodes() || r.GetNodes() != 0 {
		t.Fatalf("with the serving SVID on the current intermediate: %v, want no node behind", r)
	}
}
