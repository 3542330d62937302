package store

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const crashChildEnv = "STRAIT_STORE_CRASH_CHILD"

// TestKillLosesNothingAcknowledged runs a child process that applies
// resources in a loop and prints each acknowledged write, SIGKILLs it at a
// random instant, and checks after reopening that every acknowledged write
// is there and the revision never went back.
func TestKillLosesNothingAcknowledged(t *testing.T) {
	if os.Getenv(crashChildEnv) != "" {
		t.Skip("running as the child")
	}
	if testing.Short() {
		t.Skip("spawns processes")
	}
	path := testPath(t)
	s := openAt(t, path, Options{})
	s.Close()

	var lastRev uint64
	totalAcked := 0
	deadline := time.Now().Add(6 * time.Second)
	for round := 0; round < 5 && time.Now().Before(deadline); round++ {
		acked := runAndKill(t, path)
		totalAcked += len(acked)

		s, err := Open(path, Options{LockTimeout: 5 * time.Second})
		if err != nil {
			t.Fatalf("round %d: reopen after SIGKILL: %v", round, err)
		}
		counter, err := s.Get("Counter", "", "c")
		if len(acked) > 0 {
			last := acked[len(acked)-1]
			if err != nil {
				t.Fatalf("round %d: counter missing after %d acked writes: %v", round, len(acked), err)
			}
			if counter.Generation < last {
				t.Fatalf("round %d: got counter generation %d, want at least the acknowledged %d", round, counter.Generation, last)
			}
		}
		for _, gen := range acked {
			if _, err := s.Get("Item", "crash", fmt.Sprintf("item-%d", gen)); err != nil {
				t.Fatalf("round %d: acknowledged item-%d lost: %v", round, gen, err)
			}
		}
		if rev := s.Revision(); rev < lastRev {
			t.Fatalf("round %d: revision went back from %d to %d", round, lastRev, rev)
		} else {
			lastRev = rev
		}
		s.Close()
	}
	if totalAcked == 0 {
		t.Fatal("the child never acknowledged a write; the test proved nothing")
	}
	t.Logf("%d acknowledged writes survived the kills; revision %d", totalAcked, lastRev)
}

// runAndKill starts the child, lets it acknowledge at least one write, kills
// it after a random delay, and returns the generations it acknowledged.
func runAndKill(t *testing.T, path string) []uint64 {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		acked []uint64
		first = make(chan struct{})
		done  = make(chan struct{})
	)
	go func() {
		defer close(done)
		r := bufio.NewReader(out)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return // a final fragment without '\n' was cut by the kill: not acknowledged
			}
			gen, ok := strings.CutPrefix(strings.TrimSpace(line), "acked ")
			if !ok {
				continue
			}
			n, err := strconv.ParseUint(gen, 10, 64)
			if err != nil {
				continue
			}
			mu.Lock()
			acked = append(acked, n)
			if len(acked) == 1 {
				close(first)
			}
			mu.Unlock()
		}
	}()
	select {
	case <-first:
	case <-done:
	case <-time.After(10 * time.Second):
		t.Error("child acknowledged nothing in 10s")
	}
	time.Sleep(time.Duration(20+rand.IntN(200)) * time.Millisecond)
	_ = cmd.Process.Signal(syscall.SIGKILL)
	<-done
	err = cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		t.Fatalf("child: got %v, want it killed", err)
	}
	mu.Lock()
	defer mu.Unlock()
	return acked
}

// TestCrashChild is the child of TestKillLosesNothingAcknowledged. Each
// iteration changes the counter (generation g) and creates item-g in one
// Apply, then prints "acked g".
func TestCrashChild(t *testing.T) {
	path := os.Getenv(crashChildEnv)
	if path == "" {
		t.Skip("only runs as a child of TestKillLosesNothingAcknowledged")
	}
	s, err := Open(path, Options{LockTimeout: 5 * time.Second})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child open:", err)
		os.Exit(3)
	}
	var gen uint64
	if c, err := s.Get("Counter", "", "c"); err == nil {
		gen = c.Generation
	}
	w := io.Writer(os.Stdout)
	for {
		next := gen + 1
		results, err := s.Apply([]Resource{
			{APIVersion: "v1", Kind: "Counter", Name: "c", Spec: fmt.Appendf(nil, `{"g":%d}`, next)},
			{APIVersion: "v1", Kind: "Item", Namespace: "crash", Name: fmt.Sprintf("item-%d", next), Spec: []byte(`{}`)},
		})
		if err != nil || results[0].Generation != next {
			fmt.Fprintf(os.Stderr, "child apply %d: %v %+v\n", next, err, results)
			os.Exit(4)
		}
		gen = next
		fmt.Fprintf(w, "acked %d\n", gen)
	}
}
