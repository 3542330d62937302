//go:build linux

package proxy

import (
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	spiffewl "github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/proxy/workloadapi"
)

// recordingWatcher hands every X.509 context update a go-spiffe client
// receives to the test.
type recordingWatcher struct{ updates chan *spiffewl.X509Context }

func (w recordingWatcher) OnX509ContextUpdate(c *spiffewl.X509Context) { w.updates <- c }
func (w recordingWatcher) OnX509ContextWatchError(error)               {}

// serveWorkloadAPI runs a Workload API server on s's store until the test
// ends and returns a go-spiffe client's stream of updates.
func serveWorkloadAPI(t *testing.T, s *Sidecar) <-chan *spiffewl.X509Context {
	t.Helper()
	dir, err := os.MkdirTemp("", "wl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "api.sock")
	srv, err := workloadapi.New(workloadapi.Config{Source: s.wl, Path: path})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); srv.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("workload API socket not accepting connections")
		}
	}
	client, err := spiffewl.New(ctx, spiffewl.WithAddr("unix://"+path))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	w := recordingWatcher{updates: make(chan *spiffewl.X509Context, 64)}
	go client.WatchX509Context(ctx, w)
	return w.updates
}

// checkUpdate reports whether an update is self-consistent: its SVID's chain
// verifies against the bundles of the same update.
func checkUpdate(u *spiffewl.X509Context) error {
	sv := u.DefaultSVID()
	if sv == nil {
		return fmt.Errorf("no SVID")
	}
	if _, _, err := x509svid.Verify(sv.Certificates, u.Bundles); err != nil {
		return fmt.Errorf("SVID (serial %v) does not verify against the bundle of the same update: %w", sv.Certificates[0].SerialNumber, err)
	}
	return nil
}

// awaitState collects the updates until one serves want's SVID and exactly
// roots, and returns all of them (that one last).
func awaitState(t *testing.T, updates <-chan *spiffewl.X509Context, want *x509svid.SVID, roots []*x509.Certificate) []*spiffewl.X509Context {
	t.Helper()
	var got []*spiffewl.X509Context
	deadline := time.After(10 * time.Second)
	for {
		select {
		case u := <-updates:
			got = append(got, u)
			sv := u.DefaultSVID()
			b, err := u.Bundles.GetX509BundleForTrustDomain(want.ID.TrustDomain())
			if sv == nil || !sv.Certificates[0].Equal(want.Certificates[0]) || err != nil {
				continue
			}
			have := b.X509Authorities()
			if len(have) != len(roots) {
				continue
			}
			same := true
			for _, r := range roots {
				same = same && b.HasX509Authority(r)
			}
			if same {
				return got
			}
		case <-deadline:
			t.Fatalf("the watcher did not see SVID serial %v with %d roots within 10s (%d updates seen)", want.Certificates[0].SerialNumber, len(roots), len(got))
		}
	}
}

// TestWorkloadAPIUpdatesAreConsistentAcrossRootRotation: a credential change
// that brings a new SVID and a new bundle together (as Certify does, and as
// one credentialsLoop round sees when both land before it reads them)
// reaches a go-spiffe watcher as ONE update whose SVID verifies against its
// bundle, never as an SVID issued under the new root served with the old
// bundle first. The retirement of the old root is one update as well.
func TestWorkloadAPIUpdatesAreConsistentAcrossRootRotation(t *testing.T) {
	const rounds = 10
	td := spiffeid.RequireTrustDomainFromString("strait.example")
	cas := []*catest.CA{catest.New(t, td.Name())}
	for range rounds {
		cas = append(cas, catest.New(t, td.Name())) // a new root for the same trust domain
	}
	s := newCPlessSidecar(t, cas[0], "app", "127.0.0.1:1")
	s.syncWorkloadAPI()
	updates := serveWorkloadAPI(t, s)
	appID := "spiffe://strait.example/ns/default/sa/app"

	cur := s.creds.SVID()
	seq := s.creds.Bundle().Sequence()
	first := awaitState(t, updates, cur, cas[0].Bundle().Roots())
	for _, u := range first {
		if err := checkUpdate(u); err != nil {
			t.Fatalf("initial update: %v", err)
		}
	}

	inconsistent, extra := 0, 0
	for i := 1; i <= rounds; i++ {
		oldRoots, newRoots := cas[i-1].Bundle().Roots(), cas[i].Bundle().Roots()
		install := func(roots []*x509.Certificate, sv *x509svid.SVID) {
			t.Helper()
			seq++
			b, err := bundle.New(td, seq, roots)
			if err != nil {
				t.Fatal(err)
			}
			if ok, err := s.creds.SetBundle(b); !ok || err != nil {
				t.Fatalf("SetBundle = %v, %v", ok, err)
			}
			if sv != nil {
				if err := s.creds.SetSVID(sv); err != nil {
					t.Fatal(err)
				}
			}
			s.syncWorkloadAPI()
		}
		check := func(step string, got []*spiffewl.X509Context) {
			if len(got) != 1 {
				extra += len(got) - 1
				t.Logf("round %d, %s: %d updates for one credential change, want 1", i, step, len(got))
			}
			for j, u := range got {
				if err := checkUpdate(u); err != nil {
					inconsistent++
					t.Logf("round %d, %s: update %d of %d: %v", i, step, j+1, len(got), err)
				}
			}
		}

		// Re-issue under the new root, with a bundle holding both roots.
		both := append(append([]*x509.Certificate{}, oldRoots...), newRoots...)
		next := cas[i].SVID(t, appID, time.Hour)
		install(both, next)
		check("re-issue under the new root", awaitState(t, updates, next, both))

		// Retire the old root.
		install(newRoots, nil)
		check("old root retired", awaitState(t, updates, next, newRoots))
	}
	if inconsistent > 0 || extra > 0 {
		t.Errorf("over %d root rotations: %d updates whose SVID does not verify against their own bundle, %d updates more than one per credential change", rounds, inconsistent, extra)
	}
}

// TestWorkloadAPIStoreNeverSettlesOnAMixedState: one syncWorkloadAPI that
// carries a new SVID and a new bundle must not leave the Workload API store
// in a state of its own (a change notified, nothing else changing) where
// the new SVID sits with the old bundle: a Workload API stream reading the
// store then serves it to the app as an update. A reader spinning on the
// store, keeping only reads no change overlapped (as the server's stream
// would see between two notifications), must only ever see an SVID that
// verifies against the bundle beside it.
func TestWorkloadAPIStoreNeverSettlesOnAMixedState(t *testing.T) {
	const rounds = 20000
	td := spiffeid.RequireTrustDomainFromString("strait.example")
	a, b := catest.New(t, td.Name()), catest.New(t, td.Name())
	s := newCPlessSidecar(t, a, "app", "127.0.0.1:1")
	appID := "spiffe://strait.example/ns/default/sa/app"
	svids := map[*catest.CA]*x509svid.SVID{a: s.creds.SVID(), b: b.SVID(t, appID, time.Hour)}
	s.syncWorkloadAPI()

	stop := make(chan struct{})
	type result struct{ settled, mixed int }
	done := make(chan result)
	go func() {
		var r result
		for {
			select {
			case <-stop:
				done <- r
				return
			default:
			}
			ch := s.wl.Changed()
			sv, err1 := s.wl.GetX509SVID()
			xb, err2 := s.wl.GetX509BundleForTrustDomain(td)
			select {
			case <-ch:
				continue // a change overlapped the read
			default:
			}
			if err1 != nil || err2 != nil {
				continue
			}
			r.settled++
			if _, _, err := x509svid.Verify(sv.Certificates, xb); err != nil {
				r.mixed++
			}
		}
	}()

	seq := s.creds.Bundle().Sequence()
	from, to := a, b
	for range rounds {
		// The SVID re-issued under to's root arrives with a bundle of both
		// roots (as Certify installs them), then from's root is retired.
		seq++
		both, err := bundle.New(td, seq, append(from.Bundle().Roots(), to.Bundle().Roots()...))
		if err != nil {
			t.Fatal(err)
		}
		s.creds.SetBundle(both)
		s.creds.SetSVID(svids[to])
		s.syncWorkloadAPI()
		seq++
		only, err := bundle.New(td, seq, to.Bundle().Roots())
		if err != nil {
			t.Fatal(err)
		}
		s.creds.SetBundle(only)
		s.syncWorkloadAPI()
		from, to = to, from
	}
	close(stop)
	r := <-done
	t.Logf("%d settled reads over %d rotations", r.settled, rounds)
	if r.mixed > 0 {
		t.Errorf("%d of %d settled reads of the store held an SVID that does not verify against the bundle beside it", r.mixed, r.settled)
	}
}
