//go:build linux

package workloadapi_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	spiffewl "github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/straitmesh/strait/proxy/workloadapi"
)

// changingStore is a Store that runs a function once, right after the next
// read of the SVID: a change landing between the server's read of the SVID
// and its read of the bundles.
type changingStore struct {
	*workloadapi.Store
	mu     sync.Mutex
	during func()
}

func (s *changingStore) GetX509SVID() (*x509svid.SVID, error) {
	sv, err := s.Store.GetX509SVID()
	s.mu.Lock()
	f := s.during
	s.during = nil
	s.mu.Unlock()
	if f != nil {
		f()
	}
	return sv, err
}

type contextWatcher struct{ updates chan *spiffewl.X509Context }

func (w contextWatcher) OnX509ContextUpdate(c *spiffewl.X509Context) { w.updates <- c }
func (w contextWatcher) OnX509ContextWatchError(error)               {}

// selfConsistent reports whether the update's SVID verifies against the
// bundles of the same update.
func selfConsistent(u *spiffewl.X509Context) error {
	sv := u.DefaultSVID()
	if sv == nil {
		return fmt.Errorf("no SVID")
	}
	if _, _, err := x509svid.Verify(sv.Certificates, u.Bundles); err != nil {
		return fmt.Errorf("SVID serial %v does not verify against the bundle of the same update: %w", sv.Certificates[0].SerialNumber, err)
	}
	return nil
}

// awaitContext collects a watcher's updates until one serves want's SVID
// with bundle b for its trust domain; it returns them all, that one last.
func awaitContext(t *testing.T, updates <-chan *spiffewl.X509Context, want *x509svid.SVID, b *x509bundle.Bundle) []*spiffewl.X509Context {
	t.Helper()
	var got []*spiffewl.X509Context
	deadline := time.After(wait)
	for {
		select {
		case u := <-updates:
			got = append(got, u)
			have, err := u.Bundles.GetX509BundleForTrustDomain(b.TrustDomain())
			if sameSVID(u.DefaultSVID(), want) && err == nil && have.Equal(b) {
				return got
			}
		case <-deadline:
			t.Fatalf("watcher did not get SVID serial %v with its bundle within %s (%d updates)", want.Certificates[0].SerialNumber, wait, len(got))
		}
	}
}

// TestStreamDoesNotServeATornRead: the SVID and the bundle are read from the
// Source one after the other; a change between the two reads (here the SVID
// and the bundle replaced together, as Store.Set does, by a new root's) must
// not reach a go-spiffe client as the old SVID with the new bundle. Every
// update the client gets verifies against its own bundle, and the change is
// one update.
func TestStreamDoesNotServeATornRead(t *testing.T) {
	oldID, newID, fed := newIdentity(t, td), newIdentity(t, td), newIdentity(t, otherTD)
	oldSVID, newSVID := oldID.ca.SVID(t, appID, time.Hour), newID.ca.SVID(t, appID, time.Hour)
	st := &changingStore{Store: workloadapi.NewStore()}
	st.Set(oldSVID, oldID.bundle)
	srv := start(t, workloadapi.Config{Source: st})

	ctx := timeout(t)
	client, err := spiffewl.New(ctx, addr(srv.path))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	w := contextWatcher{updates: make(chan *spiffewl.X509Context, 16)}
	go client.WatchX509Context(ctx, w)
	for _, u := range awaitContext(t, w.updates, oldSVID, oldID.bundle) {
		if err := selfConsistent(u); err != nil {
			t.Fatalf("first update: %v", err)
		}
	}

	// The next build reads the old SVID, then the SVID and bundle change
	// whole before it reads the bundle.
	st.mu.Lock()
	st.during = func() { st.Set(newSVID, newID.bundle) }
	st.mu.Unlock()
	st.SetBundle(fed.bundle) // an unrelated change that makes the stream rebuild
	got := awaitContext(t, w.updates, newSVID, newID.bundle)
	for i, u := range got {
		if err := selfConsistent(u); err != nil {
			t.Errorf("update %d of %d: %v", i+1, len(got), err)
		}
	}
	if len(got) != 1 {
		t.Errorf("%d updates until the new SVID and bundle were served, want 1", len(got))
	}
}
