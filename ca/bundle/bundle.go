// Package bundle is Strait's trust bundle: the set of root certificates a
// mesh member trusts, with a strictly increasing sequence number and a digest
// that members report to show which bundle they hold.
//
// A bundle renders to and parses from the SPIFFE bundle format (a JWKS
// document with spiffe_sequence, per the SPIFFE Trust Domain and Bundle
// specification) using go-spiffe's spiffebundle package, and to PEM for tools
// that want plain certificates. Parsing is strict and bounded: it is fed by
// peers and by files users hand us.
//
// The package knows nothing of keys or issuance; the sidecar may import it.
package bundle

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Limits on what Parse accepts.
const (
	MaxEncodedSize = 1 << 20 // bytes of JWKS or PEM
	MaxRoots       = 32
)

// ErrInvalid is wrapped by every parse and validation error of this package.
var ErrInvalid = errors.New("bundle: invalid trust bundle")

// Bundle is an immutable trust bundle. Build one with New or Parse*.
type Bundle struct {
	td          spiffeid.TrustDomain
	seq         uint64
	refreshHint time.Duration
	roots       []*x509.Certificate // sorted by DER for a canonical digest
	digest      string
	x509        *x509bundle.Bundle
}

var _ x509bundle.Source = (*Bundle)(nil)

// New returns a bundle of roots for td with sequence number seq. Every root
// must be a CA certificate; duplicates are dropped.
func New(td spiffeid.TrustDomain, seq uint64, roots []*x509.Certificate) (*Bundle, error) {
	if td.IsZero() {
		return nil, fmt.Errorf("%w: trust domain is empty", ErrInvalid)
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("%w: no roots", ErrInvalid)
	}
	if len(roots) > MaxRoots {
		return nil, fmt.Errorf("%w: %d roots, more than the limit of %d", ErrInvalid, len(roots), MaxRoots)
	}
	sorted := make([]*x509.Certificate, 0, len(roots))
	for i, r := range roots {
		if r == nil {
			return nil, fmt.Errorf("%w: root %d is nil", ErrInvalid, i)
		}
		if !r.IsCA || !r.BasicConstraintsValid {
			return nil, fmt.Errorf("%w: root %d (%s) is not a CA certificate", ErrInvalid, i, r.Subject)
		}
		sorted = append(sorted, r)
	}
	slices.SortFunc(sorted, func(a, b *x509.Certificate) int { return bytes.Compare(a.Raw, b.Raw) })
	sorted = slices.CompactFunc(sorted, func(a, b *x509.Certificate) bool { return bytes.Equal(a.Raw, b.Raw) })
	b := &Bundle{td: td, seq: seq, roots: sorted}
	b.digest = Digest(sorted)
	b.x509 = x509bundle.FromX509Authorities(td, sorted)
	return b, nil
}

// Digest returns "sha256:<hex>" over the DER of roots in canonical (sorted)
// order, each prefixed with its length. The sequence number is not included:
// two bundles with the same roots have the same digest.
func Digest(roots []*x509.Certificate) string {
	ders := make([][]byte, 0, len(roots))
	for _, r := range roots {
		ders = append(ders, r.Raw)
	}
	slices.SortFunc(ders, bytes.Compare)
	ders = slices.CompactFunc(ders, bytes.Equal)
	h := sha256.New()
	var n [8]byte
	for _, d := range ders {
		binary.BigEndian.PutUint64(n[:], uint64(len(d)))
		h.Write(n[:])
		h.Write(d)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// TrustDomain returns the bundle's trust domain.
func (b *Bundle) TrustDomain() spiffeid.TrustDomain { return b.td }

// Sequence returns the bundle's sequence number.
func (b *Bundle) Sequence() uint64 { return b.seq }

// Digest returns the digest of the bundle's roots (see the Digest function).
func (b *Bundle) Digest() string { return b.digest }

// Roots returns a copy of the root list.
func (b *Bundle) Roots() []*x509.Certificate { return slices.Clone(b.roots) }

// WithRefreshHint returns a copy of b carrying a refresh hint for federation.
func (b *Bundle) WithRefreshHint(d time.Duration) *Bundle {
	c := *b
	c.refreshHint = d
	return &c
}

// Contains reports whether cert is one of the roots.
func (b *Bundle) Contains(cert *x509.Certificate) bool {
	return slices.ContainsFunc(b.roots, func(r *x509.Certificate) bool { return bytes.Equal(r.Raw, cert.Raw) })
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (b *Bundle) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != b.td {
		return nil, fmt.Errorf("bundle: no bundle for trust domain %q (this bundle is for %q)", td, b.td)
	}
	return b.x509, nil
}

// SPIFFEBundle returns the bundle as go-spiffe's spiffebundle.Bundle.
func (b *Bundle) SPIFFEBundle() *spiffebundle.Bundle {
	sb := spiffebundle.FromX509Authorities(b.td, b.roots)
	sb.SetSequenceNumber(b.seq)
	if b.refreshHint > 0 {
		sb.SetRefreshHint(b.refreshHint)
	}
	return sb
}

// MarshalJWKS renders the bundle in the SPIFFE bundle format.
func (b *Bundle) MarshalJWKS() ([]byte, error) {
	out, err := b.SPIFFEBundle().Marshal()
	if err != nil {
		return nil, fmt.Errorf("marshal bundle for %s: %w", b.td, err)
	}
	return out, nil
}

// MarshalPEM renders the roots as concatenated PEM CERTIFICATE blocks.
func (b *Bundle) MarshalPEM() []byte {
	var buf bytes.Buffer
	for _, r := range b.roots {
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})
	}
	return buf.Bytes()
}

// ParseJWKS parses a SPIFFE bundle document for td. It requires a sequence
// number, at least one X.509 authority, and refuses documents over
// MaxEncodedSize or with more than MaxRoots authorities.
func ParseJWKS(td spiffeid.TrustDomain, data []byte) (*Bundle, error) {
	if len(data) > MaxEncodedSize {
		return nil, fmt.Errorf("%w: %d bytes, more than the limit of %d", ErrInvalid, len(data), MaxEncodedSize)
	}
	sb, err := spiffebundle.Parse(td, data)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	seq, ok := sb.SequenceNumber()
	if !ok {
		return nil, fmt.Errorf("%w: spiffe_sequence is missing", ErrInvalid)
	}
	b, err := New(td, seq, sb.X509Authorities())
	if err != nil {
		return nil, err
	}
	if hint, ok := sb.RefreshHint(); ok && hint > 0 {
		b.refreshHint = hint
	}
	return b, nil
}

// ParsePEM parses concatenated PEM certificates as a bundle for td with
// sequence number seq. Anything other than CERTIFICATE blocks is refused.
func ParsePEM(td spiffeid.TrustDomain, seq uint64, data []byte) (*Bundle, error) {
	if len(data) > MaxEncodedSize {
		return nil, fmt.Errorf("%w: %d bytes, more than the limit of %d", ErrInvalid, len(data), MaxEncodedSize)
	}
	var roots []*x509.Certificate
	rest := data
	for len(bytes.TrimSpace(rest)) > 0 {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return nil, fmt.Errorf("%w: trailing data is not PEM", ErrInvalid)
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("%w: PEM block %q, want CERTIFICATE", ErrInvalid, block.Type)
		}
		if len(roots) == MaxRoots {
			return nil, fmt.Errorf("%w: more than %d roots", ErrInvalid, MaxRoots)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%w: root %d: %v", ErrInvalid, len(roots), err)
		}
		roots = append(roots, c)
	}
	return New(td, seq, roots)
}
