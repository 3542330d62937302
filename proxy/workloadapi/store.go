package workloadapi

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Source is what the server needs: the current SVID, the bundles, and a
// signal when either changes. The sidecar's Store implements it.
type Source interface {
	// GetX509SVID returns the current SVID. A nil SVID or an error means
	// none is available yet; the server waits for the next change.
	GetX509SVID() (*x509svid.SVID, error)
	// GetX509BundleForTrustDomain returns the bundle of td, as in
	// x509bundle.Source. An error means none is available yet.
	GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error)
	// Changed returns a channel closed at the next change of SVID or bundle.
	// Callers take the channel before reading the state, so no change is
	// missed; a read the channel closed during is read again. An SVID and a
	// bundle that change together must be one change (see Store.Set), or
	// the state in between is served.
	Changed() <-chan struct{}
}

// BundleLister is optionally implemented by a Source that holds bundles of
// several trust domains (federation). When it is, FetchX509Bundles returns
// all of them and FetchX509SVID sends those of other trust domains as
// federated bundles; otherwise only the SVID's own trust domain is served.
type BundleLister interface {
	// Bundles returns every bundle held, one per trust domain.
	Bundles() []*x509bundle.Bundle
}

// ErrNoSVID is returned by Store.GetX509SVID before the first SVID is set.
var ErrNoSVID = errors.New("workloadapi: no SVID yet")

// ErrNoBundle is wrapped by Store.GetX509BundleForTrustDomain for a trust
// domain it holds no bundle for.
var ErrNoBundle = errors.New("workloadapi: no X.509 bundle")

// Store is a concurrency-safe Source the sidecar updates on renewal and on
// bundle changes. The zero value is not usable; call NewStore.
type Store struct {
	mu      sync.Mutex
	svid    *x509svid.SVID
	bundles map[spiffeid.TrustDomain]*x509bundle.Bundle
	changed chan struct{}
}

var (
	_ Source            = (*Store)(nil)
	_ BundleLister      = (*Store)(nil)
	_ x509svid.Source   = (*Store)(nil)
	_ x509bundle.Source = (*Store)(nil)
)

// NewStore returns an empty Store.
func NewStore() *Store {
	return &Store{bundles: map[spiffeid.TrustDomain]*x509bundle.Bundle{}, changed: make(chan struct{})}
}

// SetSVID installs s as the current SVID (nil removes it) and signals a
// change unless s is the SVID already held. The SVID is not copied and must
// not be modified afterwards.
func (st *Store) SetSVID(s *x509svid.SVID) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if s != st.svid {
		st.svid = s
		st.notifyLocked()
	}
}

// SetBundle installs a copy of b as the bundle of its trust domain and
// signals a change unless it equals the bundle already held. A nil b is
// ignored.
func (st *Store) SetBundle(b *x509bundle.Bundle) { st.Set(nil, b) }

// Set installs s as the current SVID and a copy of b as the bundle of its
// trust domain together, under one lock and with one change signalled (if
// either differs from what is held): a stream never serves the new SVID with
// the old bundle, or the old SVID with the new bundle, in between. A nil s
// or b leaves that one as it is.
func (st *Store) Set(s *x509svid.SVID, b *x509bundle.Bundle) {
	st.mu.Lock()
	defer st.mu.Unlock()
	changed := false
	if s != nil && s != st.svid {
		st.svid, changed = s, true
	}
	if b != nil {
		if cur, ok := st.bundles[b.TrustDomain()]; !ok || !cur.Equal(b) {
			st.bundles[b.TrustDomain()], changed = b.Clone(), true
		}
	}
	if changed {
		st.notifyLocked()
	}
}

// RemoveBundle forgets the bundle of td (a federated trust domain that went
// away) and signals a change if there was one.
func (st *Store) RemoveBundle(td spiffeid.TrustDomain) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if _, ok := st.bundles[td]; !ok {
		return
	}
	delete(st.bundles, td)
	st.notifyLocked()
}

// GetX509SVID implements Source and x509svid.Source. It returns ErrNoSVID
// until an SVID is set.
func (st *Store) GetX509SVID() (*x509svid.SVID, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.svid == nil {
		return nil, ErrNoSVID
	}
	return st.svid, nil
}

// GetX509BundleForTrustDomain implements Source and x509bundle.Source. The
// bundle returned is a copy.
func (st *Store) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	b, ok := st.bundles[td]
	if !ok {
		return nil, fmt.Errorf("%w for trust domain %q", ErrNoBundle, td)
	}
	return b.Clone(), nil
}

// Bundles implements BundleLister: copies of every bundle held, sorted by
// trust domain.
func (st *Store) Bundles() []*x509bundle.Bundle {
	st.mu.Lock()
	defer st.mu.Unlock()
	out := make([]*x509bundle.Bundle, 0, len(st.bundles))
	for _, b := range st.bundles {
		out = append(out, b.Clone())
	}
	slices.SortFunc(out, func(a, b *x509bundle.Bundle) int {
		return strings.Compare(a.TrustDomain().Name(), b.TrustDomain().Name())
	})
	return out
}

// Changed implements Source: the returned channel is closed at the next
// change of SVID or bundles.
func (st *Store) Changed() <-chan struct{} {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.changed
}

func (st *Store) notifyLocked() {
	close(st.changed)
	st.changed = make(chan struct{})
}
