package server

import (
	"context"
	"crypto/x509"
	"strings"
	"testing"

	"github.com/straitmesh/strait/ca/svid"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/store"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

func TestNextStepGates(t *testing.T) {
	inSync := func(name string) *controlplanev1.ClusterRotation {
		return &controlplanev1.ClusterRotation{Report: &federationv1.RotationReport{Cluster: name}, BundleInSync: true, SvidsOnActiveRoot: true}
	}
	bundleBehind := func(name string) *controlplanev1.ClusterRotation {
		c := inSync(name)
		c.BundleInSync = false
		return c
	}
	svidBehind := func(name string) *controlplanev1.ClusterRotation {
		c := inSync(name)
		c.SvidsOnActiveRoot = false
		return c
	}
	active := RootInfo{ID: "r1", State: "active", Fingerprint: "sha256:r1"}
	prepared := RootInfo{ID: "r2", State: "prepared", Fingerprint: "sha256:r2"}
	inForce := []string{"sha256:r1", "sha256:r2"}
	cases := []struct {
		name      string
		roots     []RootInfo
		clusters  []*controlplanev1.ClusterRotation
		wantNext  string
		wantReady bool
	}{
		{"idle", []RootInfo{active}, []*controlplanev1.ClusterRotation{inSync("east"), inSync("west")}, "prepare:", true},
		{"idle, a cluster behind", []RootInfo{active}, []*controlplanev1.ClusterRotation{inSync("east"), bundleBehind("west")}, "idle: waiting for west", false},
		{"prepared, west behind", []RootInfo{active, prepared}, []*controlplanev1.ClusterRotation{inSync("east"), bundleBehind("west")}, "activate: waiting for west", false},
		{"prepared, all hold it", []RootInfo{active, prepared}, []*controlplanev1.ClusterRotation{inSync("east"), svidBehind("west")}, "activate: ready", true},
		// The CA prepared r2 but putting its bundle in force here failed:
		// every cluster holds the old bundle, which lacks r2.
		{"prepared, not in the bundle in force", []RootInfo{active, {ID: "r3", State: "prepared", Fingerprint: "sha256:r3"}}, []*controlplanev1.ClusterRotation{inSync("east"), inSync("west")}, "activate: waiting for this cluster to put the bundle with root r3 in force", false},
		{"activated, SVIDs behind", []RootInfo{{ID: "r1", State: "old"}, {ID: "r2", State: "active"}}, []*controlplanev1.ClusterRotation{inSync("east"), svidBehind("west")}, "retire: waiting for west", false},
		{"activated, all moved", []RootInfo{{ID: "r1", State: "old"}, {ID: "r2", State: "active"}}, []*controlplanev1.ClusterRotation{inSync("east"), inSync("west")}, "retire: ready", true},
		{"tainted", []RootInfo{{ID: "r1", State: "tainted"}, {ID: "r2", State: "active"}}, []*controlplanev1.ClusterRotation{svidBehind("west")}, "revoke r1: ready", true},
	}
	for _, tc := range cases {
		next, ready := nextStep(tc.roots, inForce, tc.clusters, true)
		if !strings.HasPrefix(next, tc.wantNext) || ready != tc.wantReady {
			t.Errorf("%s: got %q ready=%v, want %q… ready=%v", tc.name, next, ready, tc.wantNext, tc.wantReady)
		}
	}
	if _, ready := nextStep([]RootInfo{active}, inForce, []*controlplanev1.ClusterRotation{svidBehind("west")}, false); ready {
		t.Error("a cluster that is not the root authority is in sync with SVIDs behind")
	}
}

// unlinkedCA is a RootCA whose CA holds intermediates for east (this
// cluster) and for north, which is not linked to it.
type unlinkedCA struct{ blockingCA }

func (*unlinkedCA) Intermediates() map[string]*x509.Certificate {
	return map[string]*x509.Certificate{"east": {}, "north": {}}
}

// TestRotationGatesClustersNotLinked: a cluster holding an intermediate of
// the mesh CA but not linked to the root authority holds the gate shut,
// and status says why.
func TestRotationGatesClustersNotLinked(t *testing.T) {
	e := newTestEnv(t)
	e.srv.cfg.RootCA = &unlinkedCA{blockingCA{roots: []RootInfo{{ID: "r1", State: "active", InBundle: true, Fingerprint: "sha256:r1"}, {ID: "r2", State: "prepared", InBundle: true, Fingerprint: svid.Fingerprint(e.ca.Bundle().Roots()[0])} /* in the bundle in force */}}}
	if err := e.srv.rebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	st := e.srv.rotationStatus()
	var north *controlplanev1.ClusterRotation
	for _, c := range st.GetClusters() {
		if c.GetReport().GetCluster() == "north" {
			north = c
		}
	}
	if north == nil || !strings.Contains(north.GetWaiting(), "not linked") {
		t.Fatalf("north (not linked) in the status: %v", north)
	}
	if st.GetReady() || !strings.Contains(st.GetNext(), "north") {
		t.Fatalf("next %q ready=%v: want activate waiting for north", st.GetNext(), st.GetReady())
	}
}

// TestAutoRotationStopsOnTaint: a root tainted while an automatic rotation
// runs stops it, saying what to do; it does not take the taint for a step.
func TestAutoRotationStopsOnTaint(t *testing.T) {
	e := newTestEnv(t)
	e.srv.cfg.RootCA = &blockingCA{roots: []RootInfo{{ID: "r1", State: "active", InBundle: true, Fingerprint: "sha256:r1"}, {ID: "r2", State: "tainted", InBundle: true, Fingerprint: "sha256:r2"}}}
	if err := e.srv.rebuild(context.Background()); err != nil {
		t.Fatal(err)
	}
	a := e.srv.autoStep(context.Background(), store.AutoRotation{Running: true, Steps: []store.RotationStep{{Step: stepPrepare}}})
	if a.Running || a.Done || !strings.Contains(a.LastError, "revoke") || len(a.Steps) != 1 {
		t.Fatalf("after a taint: %+v; want stopped, not done, one step, a hint to revoke", a)
	}
}
