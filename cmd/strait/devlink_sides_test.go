package main

import (
	"strings"
	"testing"
)

// TestLinkSides: `strait dev link` links a cluster, or does nothing if the
// link exists (docs/local-mode.md); a link that one side removed with
// `strait federation unlink` is neither, and is reported with the command
// to run on the side that still holds it, instead of waiting 20s for a
// link that cannot connect ("no such link").
func TestLinkSides(t *testing.T) {
	const cfg = "mesh/strait.config"
	for _, tc := range []struct {
		name                     string
		clusterPeers, firstPeers []string
		linked                   bool
		wantErr                  string
	}{
		{name: "both", clusterPeers: []string{"east"}, firstPeers: []string{"south", "west"}, linked: true},
		{name: "neither", clusterPeers: nil, firstPeers: []string{"south"}},
		{name: "first unlinked", clusterPeers: []string{"east"}, firstPeers: []string{"south"},
			wantErr: "run `strait federation unlink east --config mesh/strait.config --context west`"},
		{name: "cluster unlinked", clusterPeers: nil, firstPeers: []string{"west"},
			wantErr: "run `strait federation unlink west --config mesh/strait.config --context east`"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			linked, err := linkSides(cfg, "east", "west", tc.clusterPeers, tc.firstPeers)
			if tc.wantErr == "" {
				if err != nil || linked != tc.linked {
					t.Errorf("got %t, %v; want %t, nil", linked, err, tc.linked)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("got %t, %v; want an error containing %q", linked, err, tc.wantErr)
			}
		})
	}
}
