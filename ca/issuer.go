package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/smallstep/certificates/cas/apiv1"
	"github.com/smallstep/certificates/cas/softcas"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.step.sm/crypto/x509util"

	"github.com/straitmesh/strait/ca/identity"
)

// Defaults and caps for leaf SVIDs.
const (
	DefaultSVIDTTL = time.Hour
	MaxSVIDTTL     = 24 * time.Hour
	// MinSVIDTTL is the shortest lifetime an SVID may be asked for: below
	// a second the certificate's NotAfter (kept to the second) can fall
	// before the moment it is issued.
	MinSVIDTTL      = time.Second
	DefaultBackdate = 10 * time.Second
)

// IssuerConfig configures an Issuer: a cluster intermediate that signs leaves.
type IssuerConfig struct {
	// TrustDomain of the SVIDs issued. Required.
	TrustDomain spiffeid.TrustDomain
	// Chain is the intermediate certificate first, then any further
	// certificates up to (not including) the root. Required.
	Chain []*x509.Certificate
	// Signer holds the intermediate's private key. Required.
	Signer crypto.Signer
	// Clock returns the current time. Nil means time.Now.
	Clock func() time.Time
	// DefaultTTL applies when a request names none. Zero means DefaultSVIDTTL.
	DefaultTTL time.Duration
	// MaxTTL caps every request. Zero means MaxSVIDTTL.
	MaxTTL time.Duration
	// Backdate is subtracted from NotBefore for clock skew. Zero means
	// DefaultBackdate; negative means none.
	Backdate time.Duration
}

// Issuer signs X.509-SVIDs with a cluster intermediate.
type Issuer struct {
	td         spiffeid.TrustDomain
	chain      []*x509.Certificate
	cas        *softcas.SoftCAS
	now        func() time.Time
	defaultTTL time.Duration
	maxTTL     time.Duration
	backdate   time.Duration
}

// NewIssuer returns an Issuer for cfg. It checks that the chain's first
// certificate is a CA that matches the signer.
func NewIssuer(cfg IssuerConfig) (*Issuer, error) {
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("ca: issuer needs a trust domain")
	}
	if len(cfg.Chain) == 0 || cfg.Signer == nil {
		return nil, errors.New("ca: issuer needs a certificate chain and a signer")
	}
	if !cfg.Chain[0].IsCA {
		return nil, errors.New("ca: issuer certificate is not a CA")
	}
	if !publicKeysEqual(cfg.Chain[0].PublicKey, cfg.Signer.Public()) {
		return nil, errors.New("ca: issuer certificate does not match its key")
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.DefaultTTL <= 0 {
		cfg.DefaultTTL = DefaultSVIDTTL
	}
	if cfg.MaxTTL <= 0 {
		cfg.MaxTTL = MaxSVIDTTL
	}
	switch {
	case cfg.Backdate == 0:
		cfg.Backdate = DefaultBackdate
	case cfg.Backdate < 0:
		cfg.Backdate = 0
	}
	cas, err := softcas.New(context.Background(), apiv1.Options{CertificateChain: cfg.Chain, Signer: cfg.Signer})
	if err != nil {
		return nil, fmt.Errorf("ca: create signer: %w", err)
	}
	return &Issuer{
		td: cfg.TrustDomain, chain: cfg.Chain, cas: cas, now: cfg.Clock,
		defaultTTL: cfg.DefaultTTL, maxTTL: cfg.MaxTTL, backdate: cfg.Backdate,
	}, nil
}

// Chain returns the issuer's chain (intermediate first).
func (i *Issuer) Chain() []*x509.Certificate { return append([]*x509.Certificate(nil), i.chain...) }

// SVIDRequest asks for an SVID for an identity the caller has proved.
type SVIDRequest struct {
	// CSR is the DER certificate request; only its public key is used.
	CSR []byte
	// ID is the identity the caller proved (by token, TokenReview or a
	// current SVID). The CSR may name it or no URI at all; nothing else.
	ID spiffeid.ID
	// TTL requested. Zero means the default; more than the cap is capped.
	TTL time.Duration
}

// IssueSVID verifies req.CSR against the CSR policy and signs an SVID for
// req.ID. It returns the leaf followed by the issuer chain.
func (i *Issuer) IssueSVID(req SVIDRequest) ([]*x509.Certificate, error) {
	csr, err := i.checkRequest(req.CSR, req.ID)
	if err != nil {
		return nil, err
	}
	return i.sign(req.ID, csr.PublicKey, req.TTL)
}

// CheckRequest returns the error IssueSVID would refuse csr for id with, if
// any, without signing: a caller spending a single-use credential checks
// first.
func (i *Issuer) CheckRequest(csr []byte, id spiffeid.ID) error {
	_, err := i.checkRequest(csr, id)
	return err
}

func (i *Issuer) checkRequest(der []byte, id spiffeid.ID) (*x509.CertificateRequest, error) {
	csr, err := ParseCSR(der)
	if err != nil {
		return nil, err
	}
	if err := i.checkID(id); err != nil {
		return nil, err
	}
	if err := checkLeafCSR(csr, id); err != nil {
		return nil, err
	}
	return csr, nil
}

// MintSVID generates a key here and issues an SVID for id: the operator's
// escape hatch (strait ca mint). Keys for workloads are otherwise generated
// where they are used.
func (i *Issuer) MintSVID(id spiffeid.ID, ttl time.Duration) (*x509svid.SVID, error) {
	if err := i.checkID(id); err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generate key: %w", err)
	}
	certs, err := i.sign(id, key.Public(), ttl)
	if err != nil {
		return nil, err
	}
	return &x509svid.SVID{ID: id, Certificates: certs, PrivateKey: key}, nil
}

func (i *Issuer) checkID(id spiffeid.ID) error {
	if err := identity.CheckLeaf(id); err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	if id.TrustDomain() != i.td {
		return fmt.Errorf("ca: %s is not in trust domain %q", id, i.td)
	}
	return nil
}

func (i *Issuer) sign(id spiffeid.ID, pub crypto.PublicKey, ttl time.Duration) ([]*x509.Certificate, error) {
	switch {
	case ttl <= 0:
		ttl = i.defaultTTL
	case ttl < MinSVIDTTL:
		return nil, fmt.Errorf("ca: an SVID lifetime of %s is below the minimum of %s", ttl, MinSVIDTTL)
	}
	ttl = min(ttl, i.maxTTL)
	now := i.now()
	notAfter := now.Add(ttl)
	if caEnd := i.chain[0].NotAfter; notAfter.After(caEnd) {
		notAfter = caEnd
	}
	if !notAfter.After(now) {
		return nil, fmt.Errorf("ca: intermediate %q expired at %s", i.chain[0].Subject.CommonName, i.chain[0].NotAfter.UTC().Format(time.RFC3339))
	}
	// The leaf is described with x509util's certificate model directly
	// rather than a text template: it is the hot path, and nothing in it
	// comes from the CSR but the public key.
	leaf := &x509util.Certificate{
		Subject:          x509util.Subject{Organization: x509util.MultiString{"Strait"}},
		URIs:             x509util.MultiURL{id.URL()},
		NotBefore:        now.Add(-i.backdate),
		NotAfter:         notAfter,
		KeyUsage:         x509util.KeyUsage(x509.KeyUsageDigitalSignature),
		ExtKeyUsage:      x509util.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraints: &x509util.BasicConstraints{IsCA: false},
		PublicKey:        pub,
	}
	resp, err := i.cas.CreateCertificate(&apiv1.CreateCertificateRequest{
		Template: leaf.GetCertificate(),
		Lifetime: ttl,
		Backdate: i.backdate,
	})
	if err != nil {
		return nil, fmt.Errorf("ca: sign SVID for %s: %w", id, err)
	}
	return append([]*x509.Certificate{resp.Certificate}, i.chain...), nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(equaler)
	return ok && e.Equal(b)
}
