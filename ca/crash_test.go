package ca

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var crashTD = spiffeid.RequireTrustDomainFromString("strait.example")

// cycle runs one full rotation: prepare, activate, retire.
func cycle(ctx context.Context, a *Authority) error {
	if _, err := a.Prepare(ctx, PrepareOptions{}); err != nil {
		return err
	}
	if err := a.Activate(ctx); err != nil {
		return err
	}
	return a.Retire(ctx, RetireOptions{Force: true})
}

// TestFailedCommitChangesNothing injects a failure at the instant before the
// state file is replaced: the transition must fail and leave both memory and
// disk in the previous state.
func TestFailedCommitChangesNothing(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	a, err := Init(ctx, Config{Dir: dir}, InitOptions{TrustDomain: crashTD})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if _, err := a.CreateIntermediate(ctx, "east", 0, false); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name string
		do   func() error
	}{
		{"prepare", func() error { _, err := a.Prepare(ctx, PrepareOptions{}); return err }},
		{"activate", func() error { return a.Activate(ctx) }},
		{"retire", func() error { return a.Retire(ctx, RetireOptions{Force: true}) }},
	}
	injected := errors.New("injected crash")
	for _, s := range steps {
		before := a.Status()
		beforeDisk, _ := os.ReadFile(filepath.Join(dir, stateFile))
		testHookBeforeRename = func(path string) error {
			if filepath.Base(path) == stateFile {
				return injected
			}
			return nil
		}
		err := s.do()
		testHookBeforeRename = nil
		if !errors.Is(err, injected) {
			t.Fatalf("%s with failing commit: got %v, want the injected error", s.name, err)
		}
		if after := a.Status(); !reflect.DeepEqual(before, after) {
			t.Fatalf("%s: failed commit changed memory:\n before %+v\n after  %+v", s.name, before, after)
		}
		if afterDisk, _ := os.ReadFile(filepath.Join(dir, stateFile)); string(afterDisk) != string(beforeDisk) {
			t.Fatalf("%s: failed commit changed state.json", s.name)
		}
		if err := s.do(); err != nil {
			t.Fatalf("%s after the failure cleared: %v", s.name, err)
		}
	}
	if leftovers, _ := filepath.Glob(filepath.Join(dir, ".state.json.tmp-*")); len(leftovers) != 0 {
		t.Fatalf("temporary files left behind: %v", leftovers)
	}
}

// TestKillAtAnyInstant runs rotations in a child process and SIGKILLs it at
// random instants. After every kill the directory must open, satisfy every
// invariant, and never go back to an older bundle sequence.
func TestKillAtAnyInstant(t *testing.T) {
	if os.Getenv("STRAIT_CRASH_CHILD") != "" {
		t.Skip("running as the child")
	}
	if testing.Short() {
		t.Skip("spawns processes")
	}
	ctx := t.Context()
	dir := t.TempDir()
	a, err := Init(ctx, Config{Dir: dir}, InitOptions{TrustDomain: crashTD})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.CreateIntermediate(ctx, "east", 0, false); err != nil {
		t.Fatal(err)
	}
	a.Close()

	var lastSeq uint64
	kills, sawProgress := 0, false
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; i < 25 && time.Now().Before(deadline); i++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(), "STRAIT_CRASH_CHILD="+dir)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(20+rand.IntN(150)) * time.Millisecond)
		_ = cmd.Process.Signal(syscall.SIGKILL)
		_ = cmd.Wait()
		kills++

		a, err := Open(ctx, Config{Dir: dir})
		if err != nil {
			t.Fatalf("after kill %d: open: %v", kills, err)
		}
		seq := a.Bundle().Sequence()
		if seq < lastSeq {
			t.Fatalf("after kill %d: bundle sequence went back from %d to %d", kills, lastSeq, seq)
		}
		if seq > lastSeq && lastSeq != 0 {
			sawProgress = true
		}
		lastSeq = seq
		// The exported bundle must match the state once opened.
		onDisk, err := os.ReadFile(filepath.Join(dir, bundleJWKSFile))
		if err != nil {
			t.Fatal(err)
		}
		want, _ := a.Bundle().MarshalJWKS()
		if string(onDisk) != string(want)+"\n" {
			t.Fatalf("after kill %d: bundle.json does not match the state", kills)
		}
		// The authority must still work: it can issue and rotate.
		if _, err := a.Issuer("east"); err != nil {
			t.Fatalf("after kill %d: issuer: %v", kills, err)
		}
		a.Close()
	}
	if !sawProgress {
		t.Fatalf("after %d kills the child never committed a transition; the test proved nothing", kills)
	}
	t.Logf("%d kills, final bundle sequence %d", kills, lastSeq)
}

// TestCrashChild is the child of TestKillAtAnyInstant: it rotates forever
// until killed, finishing whatever cycle a previous child was killed in.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv("STRAIT_CRASH_CHILD")
	if dir == "" {
		t.Skip("only runs as a child of TestKillAtAnyInstant")
	}
	ctx := context.Background()
	a, err := Open(ctx, Config{Dir: dir})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child open:", err)
		os.Exit(3)
	}
	// Resume a cycle a previous child was killed in.
	if a.st.rootIn(RootPrepared) != nil {
		_ = a.Activate(ctx)
	}
	if a.st.rootIn(RootOld) != nil {
		_ = a.Retire(ctx, RetireOptions{Force: true})
	}
	for i := 0; ; i++ {
		if err := cycle(ctx, a); err != nil {
			fmt.Fprintln(os.Stderr, "child cycle "+strconv.Itoa(i)+":", err)
			os.Exit(4)
		}
	}
}
