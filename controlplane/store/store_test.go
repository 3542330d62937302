package store

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/internal/clock"
)

func newFakeClock() *clock.Manual {
	return clock.NewManual(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC))
}

func testPath(t *testing.T) string {
	t.Helper()
	return filepath.Join(t.TempDir(), "state.db")
}

// openAt opens the store at path and closes it when the test ends (closing
// twice is harmless, so tests may close it early to reopen).
func openAt(t *testing.T, path string, opts Options) *Store {
	t.Helper()
	s, err := Open(path, opts)
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func openTest(t *testing.T) (*Store, *clock.Manual) {
	t.Helper()
	clk := newFakeClock()
	return openAt(t, testPath(t), Options{Clock: clk.Now}), clk
}

func TestSecondOpenFailsFast(t *testing.T) {
	path := testPath(t)
	openAt(t, path, Options{})

	start := time.Now()
	s2, err := Open(path, Options{LockTimeout: 100 * time.Millisecond})
	elapsed := time.Since(start)
	if err == nil {
		s2.Close()
		t.Fatal("second Open: got no error, want ErrInUse")
	}
	if !errors.Is(err, ErrInUse) {
		t.Fatalf("second Open: got %v, want an error wrapping ErrInUse", err)
	}
	if want := "store: " + path + " is in use by another control plane"; err.Error() != want {
		t.Fatalf("second Open: got error %q, want %q", err, want)
	}
	if elapsed > 2*time.Second {
		t.Fatalf("second Open took %s, want about the 100ms lock timeout", elapsed)
	}
}

func TestReopenAfterClose(t *testing.T) {
	path := testPath(t)
	s := openAt(t, path, Options{})
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	openAt(t, path, Options{LockTimeout: 100 * time.Millisecond})
}

func TestRevisionMonotonicAcrossReopen(t *testing.T) {
	path := testPath(t)
	s := openAt(t, path, Options{})
	if got := s.Revision(); got != 1 {
		t.Fatalf("new store: got revision %d, want 1", got)
	}
	var last uint64 = 1
	step := func(what string, fn func() error) {
		t.Helper()
		if err := fn(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		got := s.Revision()
		if got <= last {
			t.Fatalf("after %s: got revision %d, want more than %d", what, got, last)
		}
		last = got
	}
	step("apply", func() error { _, err := s.Apply([]Resource{res("Mesh", "", "m", `{"a":1}`)}); return err })
	step("put instance", func() error { return s.PutInstance(inst("web-0", "spiffe://td/ns/shop/sa/web")) })
	step("bump", func() error { _, err := s.BumpRevision(); return err })

	// Nothing changed: the revision stays.
	if _, err := s.Apply([]Resource{res("Mesh", "", "m", `{"a":1}`)}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.MintToken(TokenRequest{Namespace: "shop", ServiceAccount: "web"}); err != nil {
		t.Fatal(err)
	}
	if got := s.Revision(); got != last {
		t.Fatalf("after no-op apply and mint: got revision %d, want %d", got, last)
	}

	for i := range 3 {
		s.Close()
		s = openAt(t, path, Options{})
		if got := s.Revision(); got != last {
			t.Fatalf("reopen %d: got revision %d, want %d", i, got, last)
		}
		step("apply after reopen", func() error {
			_, err := s.Apply([]Resource{res("Mesh", "", "m", fmt.Sprintf(`{"round":%d}`, i))})
			return err
		})
	}
}

func TestConcurrentRevisionNeverGoesBack(t *testing.T) {
	s, _ := openTest(t)
	const n = 20
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			if _, err := s.Apply([]Resource{res("Mesh", "", fmt.Sprintf("m%d", i), `{}`)}); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if got, want := s.Revision(), uint64(1+n); got != want {
		t.Fatalf("after %d applies: got revision %d, want %d", n, got, want)
	}
}

func TestSubscribe(t *testing.T) {
	s, clk := openTest(t)
	ch, cancel := s.Subscribe()
	defer cancel()

	drained := func() bool {
		select {
		case <-ch:
			return true
		default:
			return false
		}
	}
	tests := []struct {
		name   string
		op     func() error
		notify bool
	}{
		{"apply creates", func() error { _, err := s.Apply([]Resource{res("Mesh", "", "m", `{}`)}); return err }, true},
		{"apply unchanged", func() error { _, err := s.Apply([]Resource{res("Mesh", "", "m", `{}`)}); return err }, false},
		{"delete", func() error { return s.Delete("Mesh", "", "m") }, true},
		{"put instance", func() error { return s.PutInstance(inst("web-0", "spiffe://td/ns/shop/sa/web")) }, true},
		{"heartbeat same health", func() error {
			return s.SetHealth("web-0", "spiffe://td/ns/shop/sa/web", controlplanev1.Health_HEALTH_HEALTHY, clk.Now())
		}, false},
		{"health change", func() error {
			return s.SetHealth("web-0", "spiffe://td/ns/shop/sa/web", controlplanev1.Health_HEALTH_UNHEALTHY, clk.Now())
		}, true},
		{"mint token", func() error {
			_, _, err := s.MintToken(TokenRequest{Namespace: "shop", ServiceAccount: "web"})
			return err
		}, false},
		{"failed delete", func() error { _ = s.Delete("Mesh", "", "gone"); return nil }, false},
		{"delete instance", func() error { return s.DeleteInstance("web-0", "spiffe://td/ns/shop/sa/web") }, true},
	}
	for _, tc := range tests {
		if err := tc.op(); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := drained(); got != tc.notify {
			t.Fatalf("%s: got notification %v, want %v", tc.name, got, tc.notify)
		}
	}

	// Coalescing: many changes, at most one pending notification, no blocking.
	for i := range 5 {
		if _, err := s.Apply([]Resource{res("Mesh", "", "m", fmt.Sprintf(`{"i":%d}`, i))}); err != nil {
			t.Fatal(err)
		}
	}
	if !drained() || drained() {
		t.Fatal("after 5 changes: want exactly one pending notification")
	}

	cancel()
	cancel() // idempotent
	if _, err := s.BumpRevision(); err != nil {
		t.Fatal(err)
	}
	if drained() {
		t.Fatal("after unsubscribe: got a notification, want none")
	}
}

// TestDurability writes one of everything, reopens, and reads it all back.
func TestDurability(t *testing.T) {
	path := testPath(t)
	clk := newFakeClock()
	s := openAt(t, path, Options{Clock: clk.Now})

	if _, err := s.Apply([]Resource{res("Mesh", "", "m", `{"a":1}`), res("Route", "shop", "r", `{"b":2}`)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Apply([]Resource{res("Route", "shop", "r", `{"b":3}`)}); err != nil {
		t.Fatal(err)
	}
	in := inst("web-0", "spiffe://td/ns/shop/sa/web")
	in.Region, in.Zone, in.Protocol = "eu-west-1", "eu-west-1a", controlplanev1.Protocol_PROTOCOL_TCP
	if err := s.PutInstance(in); err != nil {
		t.Fatal(err)
	}
	clk.Advance(time.Second)
	if err := s.SetHealth("web-0", in.SPIFFEID, controlplanev1.Health_HEALTH_UNHEALTHY, clk.Now()); err != nil {
		t.Fatal(err)
	}
	used, _, err := s.MintToken(TokenRequest{Namespace: "shop", ServiceAccount: "web", Service: "web"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.RedeemToken(used); err != nil {
		t.Fatal(err)
	}
	fresh, freshRec, err := s.MintToken(TokenRequest{Namespace: "shop", ServiceAccount: "api"})
	if err != nil {
		t.Fatal(err)
	}
	wantRev := s.Revision()
	wantRes, _ := s.List("", "", "")
	wantInst, _ := s.ListInstances()
	wantTok, _ := s.ListTokens()
	s.Close()

	s = openAt(t, path, Options{Clock: clk.Now})
	if got := s.Revision(); got != wantRev {
		t.Errorf("revision: got %d, want %d", got, wantRev)
	}
	gotRes, err := s.List("", "", "")
	if err != nil {
		t.Fatal(err)
	}
	if !equalResources(gotRes, wantRes) || len(gotRes) != 2 || gotRes[1].Generation != 2 {
		t.Errorf("resources: got %+v, want %+v", gotRes, wantRes)
	}
	gotInst, err := s.ListInstances()
	if err != nil {
		t.Fatal(err)
	}
	if len(gotInst) != 1 || !sameInstance(gotInst[0], wantInst[0]) || gotInst[0].Health != controlplanev1.Health_HEALTH_UNHEALTHY || gotInst[0].Zone != "eu-west-1a" {
		t.Errorf("instances: got %+v, want %+v", gotInst, wantInst)
	}
	gotTok, err := s.ListTokens()
	if err != nil {
		t.Fatal(err)
	}
	if len(gotTok) != 2 || len(wantTok) != 2 {
		t.Fatalf("tokens: got %d, want 2", len(gotTok))
	}
	for i := range gotTok {
		if !sameToken(gotTok[i], wantTok[i]) {
			t.Errorf("token %d: got %+v, want %+v", i, gotTok[i], wantTok[i])
		}
	}
	if _, err := s.RedeemToken(used); !errors.Is(err, ErrTokenUsed) {
		t.Errorf("redeem used token after reopen: got %v, want ErrTokenUsed", err)
	}
	rec, err := s.RedeemToken(fresh)
	if err != nil {
		t.Fatalf("redeem fresh token after reopen: %v", err)
	}
	if rec.ID != freshRec.ID || rec.ServiceAccount != "api" {
		t.Errorf("redeemed record: got %+v, want id %s sa api", rec, freshRec.ID)
	}
}

func TestOpenRefusesNewerSchema(t *testing.T) {
	path := testPath(t)
	s := openAt(t, path, Options{})
	if err := s.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketMeta).Put(keySchema, u64(SchemaVersion+1))
	}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	_, err := Open(path, Options{})
	if !errors.Is(err, ErrSchema) || !strings.Contains(err.Error(), "schema 2") {
		t.Fatalf("Open of a newer schema: got %v, want ErrSchema naming schema 2", err)
	}
}

func sameInstance(a, b Instance) bool {
	return a.Name == b.Name && a.Service == b.Service && a.Namespace == b.Namespace && a.Address == b.Address &&
		a.Protocol == b.Protocol && a.Region == b.Region && a.Zone == b.Zone && a.SPIFFEID == b.SPIFFEID &&
		a.Health == b.Health && a.LastSeen.Equal(b.LastSeen) && a.Registered.Equal(b.Registered)
}

func sameToken(a, b TokenRecord) bool {
	return a.ID == b.ID && a.Namespace == b.Namespace && a.ServiceAccount == b.ServiceAccount && a.Service == b.Service &&
		a.Created.Equal(b.Created) && a.Expires.Equal(b.Expires) && a.UsedAt.Equal(b.UsedAt)
}
