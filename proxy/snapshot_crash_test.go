package proxy

import (
	"context"
	"os"
	"testing"

	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// TestRestartLeavesAsideAnEmptySavedSnapshot: an empty snapshot.pb (what a
// write cut short, or a disk that lost it, leaves) decodes as a valid
// protobuf: a snapshot of version 0 with no routes and no authorization
// rules, which would let every mesh identity in (no allow rule allows all)
// and count as the first snapshot, so the instance would register and be
// sent traffic. No control plane sends version 0: it is left aside, and
// the sidecar waits for its control plane as if nothing were saved.
func TestRestartLeavesAsideAnEmptySavedSnapshot(t *testing.T) {
	c := catest.New(t, "example.org")
	cp := startTokenCP(t, c)
	dir := t.TempDir()
	a := testAgent(t, c, cp, "good", dir)
	if err := a.bootstrap(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(a.snapshotPath(), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	b := testAgent(t, c, cp, "", dir)
	var applied []*controlplanev1.Snapshot
	b.apply = func(s *controlplanev1.Snapshot) error {
		applied = append(applied, s)
		return nil
	}
	if err := b.bootstrap(context.Background()); err != nil {
		t.Fatalf("bootstrap from the saved SVID: %v", err)
	}
	if len(applied) != 0 || b.lastSnap.Load() != nil {
		t.Fatalf("an empty saved snapshot: applied %d (%v), in force %v; want it left aside", len(applied), applied, b.lastSnap.Load())
	}
	select {
	case <-b.firstSnapshot:
		t.Fatal("an empty saved snapshot counts as the first one: the instance would register with no policy")
	default:
	}
}
