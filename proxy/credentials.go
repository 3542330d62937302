package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/svid"
	"github.com/straitmesh/strait/controlplane/client"
)

// Credentials holds the sidecar's current SVID and trust bundle. Both are
// swapped atomically: TLS configs read them on every handshake, so a renewal
// or a bundle update applies to the next connection without touching open
// ones, and subscribers re-check open connections against the new trust.
type Credentials struct {
	td       spiffeid.TrustDomain
	verifier *svid.Verifier
	cert     atomic.Pointer[tls.Certificate]
	svid     atomic.Pointer[x509svid.SVID]
	bundle   atomic.Pointer[bundle.Bundle]
	sessions sessionCache // outbound TLS sessions, emptied on any change

	mu      sync.Mutex
	changed chan struct{}
}

var (
	_ x509bundle.Source  = (*Credentials)(nil)
	_ x509svid.Source    = (*Credentials)(nil)
	_ client.Credentials = (*Credentials)(nil)
)

// NewCredentials returns empty credentials for td, verified with clock.
func NewCredentials(td spiffeid.TrustDomain, clock func() time.Time) (*Credentials, error) {
	c := &Credentials{td: td, changed: make(chan struct{})}
	v, err := svid.NewVerifier(svid.VerifierConfig{TrustDomain: td, Bundles: c, Clock: clock})
	if err != nil {
		return nil, err
	}
	c.verifier = v
	return c, nil
}

// TrustDomain returns the mesh's trust domain.
func (c *Credentials) TrustDomain() spiffeid.TrustDomain { return c.td }

// Verifier verifies peers against the current bundle.
func (c *Credentials) Verifier() *svid.Verifier { return c.verifier }

// SetSVID installs a new SVID (leaf first, then intermediates).
func (c *Credentials) SetSVID(s *x509svid.SVID) error {
	if s == nil || len(s.Certificates) == 0 {
		return errors.New("proxy: empty SVID")
	}
	if s.ID.TrustDomain() != c.td {
		return fmt.Errorf("proxy: SVID %s is not in trust domain %s", s.ID, c.td)
	}
	chain := make([][]byte, 0, len(s.Certificates))
	for _, cert := range s.Certificates {
		chain = append(chain, cert.Raw)
	}
	c.cert.Store(&tls.Certificate{Certificate: chain, PrivateKey: s.PrivateKey, Leaf: s.Certificates[0]})
	c.svid.Store(s)
	c.sessions.reset()
	c.notify()
	return nil
}

// SetBundle installs a new trust bundle. An older sequence is ignored.
func (c *Credentials) SetBundle(b *bundle.Bundle) (bool, error) {
	if b == nil {
		return false, errors.New("proxy: nil bundle")
	}
	if b.TrustDomain() != c.td {
		return false, fmt.Errorf("proxy: bundle for %s, want %s", b.TrustDomain(), c.td)
	}
	for {
		cur := c.bundle.Load()
		if cur != nil && (b.Sequence() < cur.Sequence() || b.Digest() == cur.Digest() && b.Sequence() == cur.Sequence()) {
			return false, nil
		}
		if c.bundle.CompareAndSwap(cur, b) {
			break
		}
	}
	c.sessions.reset()
	c.notify()
	return true, nil
}

func (c *Credentials) notify() {
	c.mu.Lock()
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
}

// Changed returns a channel closed at the next change of SVID or bundle.
func (c *Credentials) Changed() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

// Bundle returns the current bundle, or nil.
func (c *Credentials) Bundle() *bundle.Bundle { return c.bundle.Load() }

// SVID returns the current SVID, or nil.
func (c *Credentials) SVID() *x509svid.SVID { return c.svid.Load() }

// GetX509SVID implements x509svid.Source.
func (c *Credentials) GetX509SVID() (*x509svid.SVID, error) {
	s := c.svid.Load()
	if s == nil {
		return nil, errors.New("proxy: no SVID yet")
	}
	return s, nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (c *Credentials) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b := c.bundle.Load()
	if b == nil {
		return nil, errors.New("proxy: no trust bundle yet")
	}
	return b.GetX509BundleForTrustDomain(td)
}

// Certificate returns the current SVID as TLS presents it (the same
// pointer until the SVID changes), or an error if there is none yet.
func (c *Credentials) Certificate() (*tls.Certificate, error) {
	cert := c.cert.Load()
	if cert == nil {
		return nil, errors.New("proxy: no SVID yet")
	}
	return cert, nil
}

// Expiry returns the current SVID's NotAfter (zero if none).
func (c *Credentials) Expiry() time.Time {
	if s := c.svid.Load(); s != nil {
		return s.Certificates[0].NotAfter
	}
	return time.Time{}
}

// ServerTLS returns a server config presenting the current SVID and
// verifying clients with verify (run on every handshake, resumed included).
func (c *Credentials) ServerTLS(nextProtos []string, verify func(tls.ConnectionState) error) *tls.Config {
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		ClientAuth:       tls.RequireAnyClientCert,
		NextProtos:       nextProtos,
		GetCertificate:   func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return c.Certificate() },
		VerifyConnection: verify,
	}
}

// ClientTLS returns a client config presenting the current SVID and
// verifying the server with verify. Verification is ours, not WebPKI's.
func (c *Credentials) ClientTLS(nextProtos []string, verify func(tls.ConnectionState) error) *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		InsecureSkipVerify:   true, // verify (SPIFFE rules, current bundle) replaces WebPKI checks
		NextProtos:           nextProtos,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return c.Certificate() },
		VerifyConnection:     verify,
	}
}

// ResumingClientTLS is ClientTLS for the connections to one endpoint (named
// by key), resuming TLS sessions with it: see sessionCache.
func (c *Credentials) ResumingClientTLS(key string, nextProtos []string, verify func(tls.ConnectionState) error) *tls.Config {
	cfg := c.ClientTLS(nextProtos, verify)
	cfg.ClientSessionCache = c.sessions.endpoint(key + " " + strings.Join(nextProtos, ","))
	return cfg
}

// StillTrusted verifies an open session's peer chain against the current
// bundle. A leaf that merely expired since the handshake is judged as of
// just before it expired, so the session survives its expiry but not the
// removal of the root it chains to.
func (c *Credentials) StillTrusted(chain []*x509.Certificate, role svid.Role) (spiffeid.ID, error) {
	id, _, err := c.verifier.Verify(chain, role)
	if svid.ReasonOf(err) != svid.ReasonExpired || len(chain) == 0 {
		return id, err
	}
	leaf := chain[0]
	asOf, verr := svid.NewVerifier(svid.VerifierConfig{TrustDomain: c.td, Bundles: c,
		Clock: func() time.Time { return leaf.NotAfter.Add(-time.Second) }})
	if verr != nil {
		return id, verr
	}
	id, _, err = asOf.Verify(chain, role)
	return id, err
}
