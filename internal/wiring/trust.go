package wiring

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/bundlesig"
	"github.com/straitmesh/strait/ca/svid"
	"github.com/straitmesh/strait/controlplane/local"
	"github.com/straitmesh/strait/controlplane/server"
	"github.com/straitmesh/strait/internal/svidfile"
)

// swapIssuer is the cluster's issuer, replaced when a root rotation
// re-signs the intermediate.
type swapIssuer struct{ cur atomic.Pointer[Issuer] }

func (s *swapIssuer) IssueSVID(csr []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	return s.cur.Load().IssueSVID(csr, id, ttl)
}

func (s *swapIssuer) CheckRequest(csr []byte, id spiffeid.ID) error {
	return s.cur.Load().CheckRequest(csr, id)
}

func (s *swapIssuer) MintSVID(id spiffeid.ID, ttl time.Duration) (*x509svid.SVID, error) {
	return s.cur.Load().MintSVID(id, ttl)
}

// trust is a local control plane's trust material (server.Trust): the
// bundle in force (shared with the server), its signed form, and the
// intermediate, each installed on disk before it is used.
type trust struct {
	dir     *local.Dir
	bundle  *atomic.Pointer[bundle.Bundle]
	issuer  *swapIssuer
	svidTTL time.Duration
	clock   func() time.Time
	log     *slog.Logger

	mu    sync.Mutex // serializes installs; guards dir.Chain
	jws   atomic.Pointer[string]
	inter atomic.Pointer[x509.Certificate]
}

func newTrust(d *local.Dir, current *atomic.Pointer[bundle.Bundle], svidTTL time.Duration, clock func() time.Time, log *slog.Logger) (*trust, error) {
	t := &trust{dir: d, bundle: current, issuer: &swapIssuer{}, svidTTL: svidTTL, clock: clock, log: log}
	iss, err := newIssuer(d, svidTTL, clock)
	if err != nil {
		return nil, err
	}
	t.issuer.cur.Store(&iss)
	t.inter.Store(d.Chain[0])
	jws, err := d.ReadSignedBundle()
	if err != nil {
		return nil, err
	}
	t.jws.Store(&jws)
	return t, nil
}

func (t *trust) Intermediate() *x509.Certificate { return t.inter.Load() }

func (t *trust) SignedBundle() string { return *t.jws.Load() }

// OfferBundle implements server.Trust.
func (t *trust) OfferBundle(jws string) (bool, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cur := t.bundle.Load()
	b, err := bundlesig.VerifyFrom(cur, t.SignedBundle(), jws)
	if errors.Is(err, bundlesig.ErrNotNewer) {
		// The bundle in force, signed: kept so this cluster can relay it.
		if t.SignedBundle() == "" && b != nil && b.Sequence() == cur.Sequence() && b.Digest() == cur.Digest() {
			if err := t.dir.WriteSignedBundle(jws); err == nil {
				t.jws.Store(&jws)
			}
		}
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return true, t.install(b, jws)
}

// install writes b and its signed form, then puts b in force. The caller
// holds t.mu.
func (t *trust) install(b *bundle.Bundle, jws string) error {
	if err := t.dir.WriteSignedBundle(jws); err != nil {
		return err
	}
	if err := local.WriteBundle(t.dir.Path, b); err != nil {
		return err
	}
	t.jws.Store(&jws)
	t.bundle.Store(b)
	t.log.Info("trust bundle installed", "sequence", b.Sequence(), "digest", b.Digest(), "roots", len(b.Roots()))
	return nil
}

// OfferIntermediate implements server.Trust.
func (t *trust) OfferIntermediate(chain [][]byte) (bool, error) {
	if len(chain) == 0 {
		return false, errors.New("no certificate")
	}
	cert, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return false, fmt.Errorf("intermediate: %w", err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	cur := t.inter.Load()
	if cur != nil && svid.Fingerprint(cur) == svid.Fingerprint(cert) {
		return false, nil
	}
	// Never back: a re-signing is newer than what it replaces, and an
	// earlier certificate for this key (which any peer has seen in this
	// cluster's chains) may still verify until its root is retired.
	if cur != nil && cert.NotBefore.Before(cur.NotBefore) {
		return false, fmt.Errorf("intermediate is older than the one in force (not before %s, in force since %s)", cert.NotBefore.UTC().Format(time.RFC3339), cur.NotBefore.UTC().Format(time.RFC3339))
	}
	// It must chain to a root this cluster trusts now.
	roots := x509.NewCertPool()
	for _, r := range t.bundle.Load().Roots() {
		roots.AddCert(r)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}, CurrentTime: t.clock()}); err != nil {
		return false, fmt.Errorf("intermediate does not verify under the bundle in force (the bundle with its root may not have arrived yet): %w", err)
	}
	if !cert.NotBefore.Before(t.clock().Add(time.Minute)) {
		return false, errors.New("intermediate is not valid yet")
	}
	if err := t.dir.InstallIntermediate(cert); err != nil {
		return false, err
	}
	iss, err := newIssuer(t.dir, t.svidTTL, t.clock)
	if err != nil {
		return false, err
	}
	t.issuer.cur.Store(&iss)
	t.inter.Store(cert)
	t.log.Info("intermediate re-signed under another root installed", "fingerprint", svid.Fingerprint(cert), "expires", cert.NotAfter.UTC().Format(time.RFC3339))
	// The admin credentials the CLI presents move to the new chain too.
	ttl := 24 * time.Hour // as controlplane init, unless the current ones say otherwise
	if s, err := svidfile.Load(t.dir.AdminPaths()); err == nil {
		ttl = s.Certificates[0].NotAfter.Sub(s.Certificates[0].NotBefore)
	}
	if _, err := t.dir.MintAdmin(iss, ttl); err != nil {
		t.log.Warn("re-issuing the admin credentials under the new intermediate failed", "err", err)
	}
	return true, nil
}

// rootCA is the mesh CA as the root authority's control plane drives it
// (server.RootCA); each step puts the new bundle, and after activation
// this cluster's re-signed intermediate, in force here.
type rootCA struct {
	ca    *ca.Authority
	trust *trust
}

func (r *rootCA) Roots() []server.RootInfo {
	var out []server.RootInfo
	for _, rs := range r.ca.Status().Roots {
		out = append(out, server.RootInfo{ID: rs.ID, State: string(rs.State), InBundle: rs.InBundle, Fingerprint: "sha256:" + strings.ToLower(rs.Fingerprint), NotAfter: rs.NotAfter})
	}
	return out
}

func (r *rootCA) Intermediates() map[string]*x509.Certificate { return r.ca.Intermediates() }

func (r *rootCA) Prepare(ctx context.Context, ttl time.Duration) error {
	_, err := r.ca.Prepare(ctx, ca.PrepareOptions{TTL: ttl})
	return r.after(err)
}

func (r *rootCA) Activate(ctx context.Context) error { return r.after(r.ca.Activate(ctx)) }

func (r *rootCA) Retire(ctx context.Context, acknowledged, force bool) error {
	return r.after(r.ca.Retire(ctx, ca.RetireOptions{Acknowledged: acknowledged, Force: force}))
}

func (r *rootCA) Taint(ctx context.Context, id string) error { return r.after(r.ca.Taint(ctx, id)) }

func (r *rootCA) Revoke(ctx context.Context, id string) error { return r.after(r.ca.Revoke(ctx, id)) }

// after maps the CA's refusals and, on success, syncs this cluster.
func (r *rootCA) after(err error) error {
	if errors.Is(err, ca.ErrTransition) {
		return fmt.Errorf("%w: %w", server.ErrFailedPrecondition, err)
	}
	if err != nil {
		return err
	}
	return r.sync()
}

// Sync implements server.RootCA.
func (r *rootCA) Sync() error { return r.sync() }

// sync puts the CA's bundle and this cluster's intermediate in force here.
func (r *rootCA) sync() error {
	b := r.ca.Bundle()
	jws, err := r.ca.SignedBundle()
	if err != nil {
		return fmt.Errorf("sign the trust bundle: %w", err)
	}
	r.trust.mu.Lock()
	if cur := r.trust.bundle.Load(); cur == nil || b.Sequence() > cur.Sequence() || r.trust.SignedBundle() != jws {
		err = r.trust.install(b, jws)
	}
	r.trust.mu.Unlock()
	if err != nil {
		return err
	}
	if im, ok := r.ca.Intermediate(r.trust.dir.Cluster); ok {
		if _, err := r.trust.OfferIntermediate([][]byte{im.Raw}); err != nil {
			return fmt.Errorf("install this cluster's re-signed intermediate: %w", err)
		}
	}
	return nil
}

var (
	_ server.Trust  = (*trust)(nil)
	_ server.RootCA = (*rootCA)(nil)
	_ server.Issuer = (*swapIssuer)(nil)
)
