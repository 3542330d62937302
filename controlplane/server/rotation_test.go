package server

import (
	"strings"
	"testing"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
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
	active := RootInfo{ID: "r1", State: "active"}
	cases := []struct {
		name      string
		roots     []RootInfo
		clusters  []*controlplanev1.ClusterRotation
		wantNext  string
		wantReady bool
	}{
		{"idle", []RootInfo{active}, []*controlplanev1.ClusterRotation{inSync("east"), inSync("west")}, "prepare:", true},
		{"idle, a cluster behind", []RootInfo{active}, []*controlplanev1.ClusterRotation{inSync("east"), bundleBehind("west")}, "idle: waiting for west", false},
		{"prepared, west behind", []RootInfo{active, {ID: "r2", State: "prepared"}}, []*controlplanev1.ClusterRotation{inSync("east"), bundleBehind("west")}, "activate: waiting for west", false},
		{"prepared, all hold it", []RootInfo{active, {ID: "r2", State: "prepared"}}, []*controlplanev1.ClusterRotation{inSync("east"), svidBehind("west")}, "activate: ready", true},
		{"activated, SVIDs behind", []RootInfo{{ID: "r1", State: "old"}, {ID: "r2", State: "active"}}, []*controlplanev1.ClusterRotation{inSync("east"), svidBehind("west")}, "retire: waiting for west", false},
		{"activated, all moved", []RootInfo{{ID: "r1", State: "old"}, {ID: "r2", State: "active"}}, []*controlplanev1.ClusterRotation{inSync("east"), inSync("west")}, "retire: ready", true},
		{"tainted", []RootInfo{{ID: "r1", State: "tainted"}, {ID: "r2", State: "active"}}, []*controlplanev1.ClusterRotation{svidBehind("west")}, "revoke r1: ready", true},
	}
	for _, tc := range cases {
		next, ready := nextStep(tc.roots, tc.clusters, true)
		if !strings.HasPrefix(next, tc.wantNext) || ready != tc.wantReady {
			t.Errorf("%s: got %q ready=%v, want %q… ready=%v", tc.name, next, ready, tc.wantNext, tc.wantReady)
		}
	}
	if _, ready := nextStep([]RootInfo{active}, []*controlplanev1.ClusterRotation{svidBehind("west")}, false); ready {
		t.Error("a cluster that is not the root authority is in sync with SVIDs behind")
	}
}
