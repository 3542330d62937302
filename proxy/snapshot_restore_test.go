package proxy

import (
	"context"
	"errors"
	"os"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// TestRestartRestoresSnapshot: a sidecar restarted with its saved SVID
// applies the snapshot it had before the restart (the control plane may
// be away), counts it as in force, and leaves aside a saved snapshot
// that does not decode or that it refuses.
func TestRestartRestoresSnapshot(t *testing.T) {
	c := catest.New(t, "example.org")
	cp := startTokenCP(t, c)
	dir := t.TempDir()
	a := testAgent(t, c, cp, "good", dir)
	if err := a.bootstrap(context.Background()); err != nil {
		t.Fatal(err)
	}
	snap := &controlplanev1.Snapshot{Version: 7, Services: []*controlplanev1.Service{{Name: "backend", Namespace: "shop"}}}
	a.saveSnapshot(snap)

	restart := func(refuse error) (*agent, []*controlplanev1.Snapshot) {
		t.Helper()
		b := testAgent(t, c, cp, "", dir)
		var applied []*controlplanev1.Snapshot
		b.apply = func(s *controlplanev1.Snapshot) error {
			applied = append(applied, s)
			return refuse
		}
		if err := b.bootstrap(context.Background()); err != nil {
			t.Fatalf("bootstrap from the saved SVID: %v", err)
		}
		return b, applied
	}

	b, applied := restart(nil)
	if len(applied) != 1 || !proto.Equal(applied[0], snap) {
		t.Fatalf("applied %v after the restart, want the saved snapshot", applied)
	}
	if got := b.lastSnap.Load(); got == nil || got.GetVersion() != 7 {
		t.Fatalf("snapshot in force after the restart: %v, want version 7", got)
	}
	select {
	case <-b.firstSnapshot:
	default:
		t.Fatal("the restored snapshot does not count as the first one: the instance would not register")
	}

	// Refused by the sidecar: not in force.
	if b, applied := restart(errors.New("no")); len(applied) != 1 || b.lastSnap.Load() != nil {
		t.Fatalf("a refused saved snapshot: applied %d, in force %v", len(applied), b.lastSnap.Load())
	}
	// Damaged: not applied.
	if err := os.WriteFile(a.snapshotPath(), []byte("\xff\xff not a snapshot"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, applied := restart(nil); len(applied) != 0 || b.lastSnap.Load() != nil {
		t.Fatalf("a damaged saved snapshot: applied %d, in force %v", len(applied), b.lastSnap.Load())
	}
}
