// Package svid verifies X.509-SVIDs the way every part of Strait accepts a
// certificate: go-spiffe's chain verification (x509svid.Verify) plus the rules
// of the SPIFFE X509-SVID specification that go-spiffe leaves to its caller
// (https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md):
// exactly one URI SAN holding a well-formed ID of bounded length with a
// non-root path, a key usage extension that is present, critical and includes
// digitalSignature, an extended key usage that fits the role the certificate
// is used in, and a trust domain that matches exactly.
//
// Trust is read from an x509bundle.Source on every call, so a root removed
// from the bundle stops being accepted at the next handshake, including
// resumed TLS sessions (VerifyConnection runs on every handshake).
//
// The package imports no CA or transport code; the sidecar uses it.
package svid

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/straitmesh/strait/ca/identity"
)

// MaxChainLength bounds the certificates a peer may present: leaf,
// intermediate, and a little room for cross-signed rotations.
const MaxChainLength = 5

// Role is what a certificate is being accepted for.
type Role int

// Roles. RoleAny accepts any leaf whose extended key usage allows either.
const (
	RoleAny Role = iota
	RoleServer
	RoleClient
)

// Reason classifies a verification failure with a short, bounded string
// suitable as a metric label.
type Reason string

// Reasons for refusing a certificate.
const (
	ReasonMalformed        Reason = "malformed"
	ReasonBadID            Reason = "bad_spiffe_id"
	ReasonWrongTrustDomain Reason = "wrong_trust_domain"
	ReasonKeyUsage         Reason = "key_usage"
	ReasonExtKeyUsage      Reason = "ext_key_usage"
	ReasonCA               Reason = "ca_as_leaf"
	ReasonExpired          Reason = "expired"
	ReasonNotYetValid      Reason = "not_yet_valid"
	ReasonUntrusted        Reason = "untrusted"
	ReasonNoCertificate    Reason = "no_certificate"
	ReasonWrongIssuer      Reason = "wrong_issuer"
)

// Error is returned for every refused certificate.
type Error struct {
	Reason Reason
	Err    error
}

func (e *Error) Error() string { return "svid: " + e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

func fail(r Reason, format string, args ...any) error {
	return &Error{Reason: r, Err: fmt.Errorf(format, args...)}
}

// ReasonOf returns the Reason of err, or "" if err is not a verification error.
func ReasonOf(err error) Reason {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}

var oidKeyUsage = asn1.ObjectIdentifier{2, 5, 29, 15}

// CheckLeaf applies the X509-SVID rules to a leaf certificate on its own
// (no chain, no clock) and returns its SPIFFE ID.
func CheckLeaf(leaf *x509.Certificate, role Role) (spiffeid.ID, error) {
	if leaf == nil {
		return spiffeid.ID{}, fail(ReasonNoCertificate, "no certificate")
	}
	if n := len(leaf.URIs); n != 1 {
		return spiffeid.ID{}, fail(ReasonBadID, "leaf has %d URI SANs, want exactly 1", n)
	}
	id, err := identity.Parse(leaf.URIs[0].String())
	if err != nil {
		return spiffeid.ID{}, fail(ReasonBadID, "leaf URI SAN: %v", err)
	}
	if err := identity.CheckLeaf(id); err != nil {
		return id, fail(ReasonBadID, "leaf: %v", err)
	}
	if leaf.IsCA {
		return id, fail(ReasonCA, "leaf %s is a CA certificate", id)
	}
	if err := checkKeyUsage(leaf); err != nil {
		return id, fail(ReasonKeyUsage, "leaf %s: %v", id, err)
	}
	if err := checkExtKeyUsage(leaf, role); err != nil {
		return id, fail(ReasonExtKeyUsage, "leaf %s: %v", id, err)
	}
	return id, nil
}

func checkKeyUsage(c *x509.Certificate) error {
	var ext *bool
	for _, e := range c.Extensions {
		if e.Id.Equal(oidKeyUsage) {
			ext = &e.Critical
			break
		}
	}
	switch {
	case ext == nil:
		return errors.New("key usage extension is missing")
	case !*ext:
		return errors.New("key usage extension is not critical")
	case c.KeyUsage&x509.KeyUsageDigitalSignature == 0:
		return errors.New("key usage lacks digitalSignature")
	case c.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0:
		return errors.New("key usage allows certificate or CRL signing")
	}
	return nil
}

func checkExtKeyUsage(c *x509.Certificate, role Role) error {
	if len(c.ExtKeyUsage) == 0 {
		return errors.New("extended key usage is missing")
	}
	has := func(want x509.ExtKeyUsage) bool {
		for _, u := range c.ExtKeyUsage {
			if u == want || u == x509.ExtKeyUsageAny {
				return true
			}
		}
		return false
	}
	switch role {
	case RoleServer:
		if !has(x509.ExtKeyUsageServerAuth) {
			return errors.New("extended key usage does not allow serverAuth")
		}
	case RoleClient:
		if !has(x509.ExtKeyUsageClientAuth) {
			return errors.New("extended key usage does not allow clientAuth")
		}
	default:
		if !has(x509.ExtKeyUsageServerAuth) && !has(x509.ExtKeyUsageClientAuth) {
			return errors.New("extended key usage allows neither serverAuth nor clientAuth")
		}
	}
	return nil
}

// VerifierConfig configures a Verifier.
type VerifierConfig struct {
	// TrustDomain is the only trust domain accepted. Required.
	TrustDomain spiffeid.TrustDomain
	// Bundles supplies the current roots, read on every verification. Required.
	Bundles x509bundle.Source
	// Clock returns the current time. Nil means time.Now.
	Clock func() time.Time
}

// Verifier verifies X.509-SVID chains against current trust.
//
// A chain that verified is remembered, keyed by its certificates, the
// role and the roots it was verified against, with the window in which
// every certificate of its verified path is valid: the same chain verified
// again against the same roots within that window is not checked again
// (two ECDSA verifications, a fifth of a millisecond on a small VM, on
// every TLS handshake and control-plane call). Any change of roots changes
// the key; everything else path building looks at is in the certificates.
type Verifier struct {
	td      spiffeid.TrustDomain
	bundles x509bundle.Source
	now     func() time.Time

	mu       sync.Mutex
	verified map[[sha256.Size]byte]verifiedChain
}

// verifiedChain is a remembered verification.
type verifiedChain struct {
	id       spiffeid.ID
	chains   [][]*x509.Certificate
	from, to time.Time // every certificate of chains is valid within
}

// maxVerified bounds the remembered verifications (each holds its parsed
// chain: a few KiB).
const maxVerified = 1024

// NewVerifier returns a Verifier for cfg.
func NewVerifier(cfg VerifierConfig) (*Verifier, error) {
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("svid: verifier needs a trust domain")
	}
	if cfg.Bundles == nil {
		return nil, errors.New("svid: verifier needs a bundle source")
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	return &Verifier{td: cfg.TrustDomain, bundles: cfg.Bundles, now: cfg.Clock}, nil
}

// TrustDomain returns the trust domain the verifier accepts.
func (v *Verifier) TrustDomain() spiffeid.TrustDomain { return v.td }

// Verify checks chain (leaf first) for role and returns the leaf's ID and the
// verified chains. Every error is an *Error with a Reason.
func (v *Verifier) Verify(chain []*x509.Certificate, role Role) (spiffeid.ID, [][]*x509.Certificate, error) {
	switch {
	case len(chain) == 0:
		return spiffeid.ID{}, nil, fail(ReasonNoCertificate, "no certificate presented")
	case len(chain) > MaxChainLength:
		return spiffeid.ID{}, nil, fail(ReasonMalformed, "chain of %d certificates, more than the limit of %d", len(chain), MaxChainLength)
	}
	leaf := chain[0]
	id, err := CheckLeaf(leaf, role)
	if err != nil {
		return id, nil, err
	}
	if id.TrustDomain() != v.td {
		return id, nil, fail(ReasonWrongTrustDomain, "%s is in trust domain %q, want %q", id, id.TrustDomain(), v.td)
	}
	now := v.now()
	if now.Before(leaf.NotBefore) {
		return id, nil, fail(ReasonNotYetValid, "%s is not valid until %s (now %s)", id, leaf.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	if now.After(leaf.NotAfter) {
		return id, nil, fail(ReasonExpired, "%s expired at %s (now %s)", id, leaf.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
	}
	for _, c := range chain[1:] {
		if c == nil {
			return id, nil, fail(ReasonMalformed, "chain holds a nil certificate")
		}
		if !c.IsCA || c.KeyUsage&x509.KeyUsageCertSign == 0 {
			return id, nil, fail(ReasonMalformed, "chain certificate %q is not a signing CA", c.Subject)
		}
	}
	b, err := v.bundles.GetX509BundleForTrustDomain(v.td)
	if err != nil {
		return id, nil, fail(ReasonUntrusted, "%s: %v", id, err)
	}
	// One read of the roots, for the key and the verification alike.
	auths := b.X509Authorities()
	key := verifiedKey(chain, auths, role)
	v.mu.Lock()
	hit, ok := v.verified[key]
	v.mu.Unlock()
	if ok && !now.Before(hit.from) && !now.After(hit.to) {
		return hit.id, copyChains(hit.chains), nil
	}
	_, chains, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(v.td, auths), x509svid.WithTime(now))
	if err != nil {
		var inv x509.CertificateInvalidError
		if errors.As(err, &inv) && inv.Reason == x509.Expired {
			// Go reports both ends of a validity window as Expired.
			if inv.Cert != nil && now.Before(inv.Cert.NotBefore) {
				return id, nil, fail(ReasonNotYetValid, "%s: %v", id, err)
			}
			return id, nil, fail(ReasonExpired, "%s: %v", id, err)
		}
		return id, nil, fail(ReasonUntrusted, "%s: %v", id, err)
	}
	if err := checkIssuer(id, chains); err != nil {
		return id, nil, err
	}
	v.remember(key, verifiedChain{id: id, chains: copyChains(chains), from: leaf.NotBefore, to: leaf.NotAfter}, now)
	return id, chains, nil
}

// copyChains copies the slices (not the certificates): a caller's
// changes do not reach what is remembered.
func copyChains(chains [][]*x509.Certificate) [][]*x509.Certificate {
	out := make([][]*x509.Certificate, len(chains))
	for i, ch := range chains {
		out[i] = append([]*x509.Certificate(nil), ch...)
	}
	return out
}

// verifiedKey names a verification: the role, the roots and the chain.
func verifiedKey(chain, roots []*x509.Certificate, role Role) [sha256.Size]byte {
	h := sha256.New()
	var n [8]byte
	put := func(b []byte) {
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	put([]byte{byte(role)})
	binary.BigEndian.PutUint64(n[:], uint64(len(roots)))
	h.Write(n[:])
	for _, r := range roots {
		put(r.Raw)
	}
	binary.BigEndian.PutUint64(n[:], uint64(len(chain)))
	h.Write(n[:])
	for _, c := range chain {
		put(c.Raw)
	}
	var k [sha256.Size]byte
	h.Sum(k[:0])
	return k
}

// remember keeps a verification, valid while every certificate of every
// verified path is. Entries past their window go when the cache fills.
func (v *Verifier) remember(key [sha256.Size]byte, vc verifiedChain, now time.Time) {
	for _, ch := range vc.chains {
		for _, c := range ch {
			if c.NotBefore.After(vc.from) {
				vc.from = c.NotBefore
			}
			if c.NotAfter.Before(vc.to) {
				vc.to = c.NotAfter
			}
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.verified == nil {
		v.verified = map[[sha256.Size]byte]verifiedChain{}
	}
	if len(v.verified) >= maxVerified {
		for k, e := range v.verified {
			if now.After(e.to) || now.Before(e.from) {
				delete(v.verified, k)
			}
		}
		for k := range v.verified { // still full: drop one, any
			if len(v.verified) < maxVerified {
				break
			}
			delete(v.verified, k)
		}
	}
	v.verified[key] = vc
}

// checkIssuer refuses an identity scoped to a cluster (its control plane,
// gateway or admin) that was not issued by that cluster's intermediate:
// every cluster's intermediate may sign any SPIFFE ID of the trust domain,
// so the ID alone does not say that the cluster vouches for it. Workload
// identities are the mesh's, whichever cluster issued them.
func checkIssuer(id spiffeid.ID, chains [][]*x509.Certificate) error {
	cluster := identity.Classify(id).Cluster
	if cluster == "" {
		return nil
	}
	for _, ch := range chains {
		if len(ch) >= 2 && IntermediateCluster(ch[1]) == cluster {
			return nil
		}
	}
	return fail(ReasonWrongIssuer, "%s was not issued by cluster %s's intermediate", id, cluster)
}

// IntermediateCluster returns the cluster a Strait cluster intermediate
// was issued to (its subject's organizational unit, set by the root
// authority), or "" for any other certificate.
func IntermediateCluster(c *x509.Certificate) string {
	s := c.Subject
	if !c.IsCA || len(s.Organization) != 1 || s.Organization[0] != "Strait" || len(s.OrganizationalUnit) != 1 {
		return ""
	}
	return s.OrganizationalUnit[0]
}

// VerifyRaw parses DER certificates (as TLS hands them over) and verifies them.
func (v *Verifier) VerifyRaw(raw [][]byte, role Role) (spiffeid.ID, error) {
	if len(raw) > MaxChainLength {
		return spiffeid.ID{}, fail(ReasonMalformed, "chain of %d certificates, more than the limit of %d", len(raw), MaxChainLength)
	}
	certs := make([]*x509.Certificate, 0, len(raw))
	for i, der := range raw {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return spiffeid.ID{}, fail(ReasonMalformed, "certificate %d: %v", i, err)
		}
		certs = append(certs, c)
	}
	id, _, err := v.Verify(certs, role)
	return id, err
}

// Authorizer decides whether a verified peer may proceed.
type Authorizer func(id spiffeid.ID) error

// VerifyConnection returns a tls.Config.VerifyConnection hook that verifies
// the peer's chain for role and then asks authorize (nil allows any verified
// member of the trust domain). Go runs it on every handshake, resumed ones
// included, so current trust and policy are applied to every connection.
// Use it with InsecureSkipVerify (clients) or RequireAnyClientCert (servers)
// so that this, not crypto/tls's WebPKI check, is the verification.
func (v *Verifier) VerifyConnection(role Role, authorize Authorizer) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		id, _, err := v.Verify(cs.PeerCertificates, role)
		if err != nil {
			return err
		}
		if authorize != nil {
			if err := authorize(id); err != nil {
				return fmt.Errorf("svid: %s not authorized: %w", id, err)
			}
		}
		return nil
	}
}

// RenewAt is when an SVID should be renewed: at half its life. If that is
// already past (a backdated NotBefore on a short-lived SVID, or a renewal
// that failed for a while), it is half of what is left, and never sooner
// than a second from now, so a renewal loop cannot spin.
func RenewAt(leaf *x509.Certificate, now time.Time) time.Time {
	at := leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)
	if at.Before(now.Add(time.Second)) {
		at = now.Add(leaf.NotAfter.Sub(now) / 2)
	}
	return maxTime(at, now.Add(time.Second))
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// Fingerprint is "sha256:<hex>" over a certificate's DER: how nodes and
// control planes name an intermediate in rotation reports.
func Fingerprint(c *x509.Certificate) string {
	if c == nil {
		return ""
	}
	sum := sha256.Sum256(c.Raw)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// RootID is the short name of a mesh root the CA and every cluster use
// (strait ca rotate taint ROOT_ID): the first 6 bytes, in hex, of the
// SHA-256 of its public key (as the CA names a root it creates).
func RootID(c *x509.Certificate) string {
	if c == nil {
		return ""
	}
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:6])
}

// IssuerFingerprint is the Fingerprint of the certificate that signed an
// SVID (the chain's second), or "" for a chain without one.
func IssuerFingerprint(chain []*x509.Certificate) string {
	if len(chain) < 2 {
		return ""
	}
	return Fingerprint(chain[1])
}
