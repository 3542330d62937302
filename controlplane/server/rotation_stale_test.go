package server

import (
	"context"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// retireRecordingCA is a RootCA between activate and retire that records
// whether Retire was called.
type retireRecordingCA struct {
	blockingCA
	retireCalls int
}

func (c *retireRecordingCA) Retire(context.Context, bool, bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.retireCalls++
	return nil
}

// The retire gate must judge the nodes connected now and what they last
// reported, not the rotation report cut at the last rebuild: a sidecar
// that (re)connected since, still presenting an SVID from the intermediate
// the root authority replaced at activate, would otherwise be cut off by
// retire (its SVID no longer verifies, nor can it renew with it).
func TestRetireGateSeesNodesSinceLastRebuild(t *testing.T) {
	e := newTestEnv(t)
	s := e.srv
	inter := e.ca.Issuer.Chain()[0]
	tr := &interTrust{}
	tr.inter.Store(inter)
	s.cfg.Trust = tr
	active := svid.Fingerprint(e.ca.Bundle().Roots()[0])
	rca := &retireRecordingCA{blockingCA: blockingCA{roots: []RootInfo{
		{ID: "r1", State: "old", InBundle: true, Fingerprint: "sha256:r1"},
		{ID: "r2", State: "active", InBundle: true, Fingerprint: active},
	}}}
	s.cfg.RootCA = rca
	if err := s.rebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st := s.rotationStatus(); !st.GetReady() || !strings.HasPrefix(st.GetNext(), "retire:") {
		t.Fatalf("with no node, next %q ready=%v; want retire ready", st.GetNext(), st.GetReady())
	}
	// A sidecar connects and reports an SVID from the replaced intermediate;
	// no rebuild has run since (the push loop's debounce).
	id := spiffeid.RequireFromString("spiffe://" + testTD + "/ns/default/sa/web")
	n, wake := s.attach("web-0", id)
	defer s.detach(n, wake)
	s.noteDigest("web-0", id, e.ca.Bundle().Digest(), "sha256:"+strings.Repeat("0", 64), controlplanev1.Health_HEALTH_HEALTHY)

	err := s.rotate(context.Background(), &controlplanev1.RotateRequest{Step: stepRetire})
	if rca.retireCalls != 0 || err == nil {
		t.Fatalf("retire taken (err %v) while web-0 presents an SVID from the replaced intermediate", err)
	}
}
