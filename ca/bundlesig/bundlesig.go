// Package bundlesig signs and verifies Strait trust bundles so that they can
// cross untrusted hands: a cluster's gateways and peers relay the root
// authority's bundle, and a receiver installs it only if a root it already
// trusts vouches for it.
//
// A signed bundle is a JWS in compact serialization (RFC 7515, section 7.1)
// whose payload is the SPIFFE bundle document of the new bundle (a JWKS with
// spiffe_sequence, as (*bundle.Bundle).MarshalJWKS renders it), signed with
// the key of one of the mesh's roots. Its protected header holds exactly
//
//	alg  ES256, ES384 or ES512 (ECDSA on P-256, P-384, P-521) or EdDSA
//	     (Ed25519), chosen from the root's key
//	kid  svid.Fingerprint of the signing root: "sha256:<hex of its DER>"
//	typ  "strait-bundle+jws"
//	nxt  optional: svid.Fingerprint of the prepared root that will sign
//	     next (the root authority sets it between prepare and activate)
//
// Trust is chained, never bootstrapped from the token: the kid must name a
// root of the bundle the receiver holds, the signature must verify under
// that root's public key, the signing root must still be in the new bundle,
// and the new sequence must be greater than the current one. Each bundle is
// therefore vouched for by a root of the one before it, which the root
// authority guarantees by signing with its active root (present in both the
// bundle before and the bundle after prepare, retire and revoke). A member
// that missed a step (it holds a bundle that does not contain the signer)
// refuses the token and must be re-bootstrapped out of band.
//
// VerifyFrom adds the chain of signers: a receiver that holds a signed
// bundle accepts the next one only from the root that signed it or from the
// successor it announced (nxt). Once the successor has signed, the old root
// (still in the bundle until retire or revoke) signs nothing a receiver
// accepts: the holder of a compromised old root cannot push a bundle with a
// huge sequence that would make the root authority's revoke look older.
//
// RSA is not accepted: the mesh CA creates ECDSA P-256 roots only, and
// every algorithm a verifier accepts is attack surface.
//
// The package knows about bundles and JOSE, not about keys on disk, the CA
// or transport; verifiers outside the root authority import it.
package bundlesig

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/cryptosigner"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/svid"
)

// Type is the "typ" header of a signed bundle.
const Type = "strait-bundle+jws"

// MaxSize bounds the compact serialization Verify accepts, in bytes.
const MaxSize = 64 << 10

// Errors of Verify. Every refusal wraps ErrInvalid except a token that is
// authentic but not newer than the bundle held, which wraps ErrNotNewer: a
// relay of what the receiver already has (or older), to be ignored quietly.
// ErrNotNewer is only returned once the signature has verified under the
// bundle held: a stale token signed by a root that has since left it is
// ErrInvalid.
var (
	ErrInvalid  = errors.New("bundlesig: invalid signed bundle")
	ErrNotNewer = errors.New("bundlesig: signed bundle is not newer than the bundle held")
)

// algorithms are the only "alg" values Verify accepts.
var algorithms = []jose.SignatureAlgorithm{jose.ES256, jose.ES384, jose.ES512, jose.EdDSA}

// algorithmFor returns the JWS algorithm for a root's public key.
func algorithmFor(pub crypto.PublicKey) (jose.SignatureAlgorithm, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k == nil || k.Curve == nil {
			return "", errors.New("empty ECDSA key")
		}
		switch k.Curve {
		case elliptic.P256():
			return jose.ES256, nil
		case elliptic.P384():
			return jose.ES384, nil
		case elliptic.P521():
			return jose.ES512, nil
		}
		return "", fmt.Errorf("ECDSA curve %s is not supported", k.Curve.Params().Name)
	case ed25519.PublicKey:
		if len(k) != ed25519.PublicKeySize {
			return "", errors.New("malformed Ed25519 key")
		}
		return jose.EdDSA, nil
	case nil:
		return "", errors.New("no public key")
	default:
		return "", fmt.Errorf("%T keys are not supported (want ECDSA P-256, P-384, P-521 or Ed25519)", pub)
	}
}

// Sign returns b signed by root, whose private key is key. The key must be
// root's and root must be one of b's roots (a receiver refuses a bundle that
// drops its signer).
func Sign(b *bundle.Bundle, root *x509.Certificate, key crypto.Signer) (string, error) {
	return SignWithSuccessor(b, root, key, nil)
}

// SignWithSuccessor is Sign, announcing next (a prepared root, in b) as the
// root that will sign after this one: receivers that follow the signer
// chain (VerifyFrom) then accept bundles from next, and from no other root
// than root and next.
func SignWithSuccessor(b *bundle.Bundle, root *x509.Certificate, key crypto.Signer, next *x509.Certificate) (string, error) {
	switch {
	case b == nil:
		return "", errors.New("bundlesig: sign: no bundle")
	case root == nil:
		return "", errors.New("bundlesig: sign: no root certificate")
	case key == nil:
		return "", errors.New("bundlesig: sign: no key")
	}
	alg, err := algorithmFor(root.PublicKey)
	if err != nil {
		return "", fmt.Errorf("bundlesig: sign with root %q: %v", root.Subject, err)
	}
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(root.PublicKey) {
		return "", fmt.Errorf("bundlesig: sign: the key does not match the public key of root %q", root.Subject)
	}
	if !b.Contains(root) {
		return "", fmt.Errorf("bundlesig: sign: root %q is not in the bundle it would sign", root.Subject)
	}
	payload, err := b.MarshalJWKS()
	if err != nil {
		return "", fmt.Errorf("bundlesig: sign: %w", err)
	}
	opts := (&jose.SignerOptions{}).
		WithType(Type).
		WithHeader(jose.HeaderKey("kid"), svid.Fingerprint(root))
	if next != nil {
		if !b.Contains(next) {
			return "", fmt.Errorf("bundlesig: sign: successor root %q is not in the bundle", next.Subject)
		}
		opts = opts.WithHeader(jose.HeaderKey("nxt"), svid.Fingerprint(next))
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: cryptosigner.Opaque(key)}, opts)
	if err != nil {
		return "", fmt.Errorf("bundlesig: sign: %w", err)
	}
	obj, err := signer.Sign(payload)
	if err != nil {
		return "", fmt.Errorf("bundlesig: sign: %w", err)
	}
	out, err := obj.CompactSerialize()
	if err != nil {
		return "", fmt.Errorf("bundlesig: sign: %w", err)
	}
	if len(out) > MaxSize {
		return "", fmt.Errorf("bundlesig: sign: signed bundle is %d bytes, more than the limit of %d", len(out), MaxSize)
	}
	return out, nil
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// protectedHeader is the only header shape Verify accepts.
type protectedHeader struct {
	Alg string `json:"alg"`
	Kid string `json:"kid"`
	Typ string `json:"typ"`
	// Nxt, optional: the fingerprint of the root that will sign next.
	Nxt string `json:"nxt,omitempty"`
}

// parseHeader decodes the protected header of a compact JWS strictly:
// exactly alg, kid and typ, no duplicates, nothing else (no jwk, x5c, crit
// or b64 for anyone to smuggle in).
func parseHeader(token string) (protectedHeader, error) {
	var h protectedHeader
	enc, _, ok := strings.Cut(token, ".")
	if !ok {
		return h, invalid("not a JWS compact serialization")
	}
	raw, err := base64.RawURLEncoding.DecodeString(enc)
	if err != nil {
		return h, invalid("protected header is not base64url: %v", err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return h, invalid("protected header is not a JSON object: %v", err)
	}
	for k := range fields {
		if k != "alg" && k != "kid" && k != "typ" && k != "nxt" {
			return h, invalid("protected header has %q; only alg, kid, typ and nxt are allowed", k)
		}
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil {
		return h, invalid("protected header: %v", err)
	}
	switch {
	case h.Typ != Type:
		return h, invalid("typ is %q, want %q", h.Typ, Type)
	case h.Kid == "":
		return h, invalid("kid is missing")
	}
	return h, nil
}

// Verify checks a signed bundle against current, the bundle this cluster
// holds, and returns the new bundle. It refuses input over MaxSize, any
// serialization other than compact with one signature, algorithms other
// than ES256, ES384, ES512 and EdDSA, a signer that is not a root of
// current, a signer that is not in the new bundle, a bundle for another
// trust domain or without roots, and (with ErrNotNewer) an authentic bundle
// whose sequence is not greater than current's. Every other refusal wraps
// ErrInvalid and returns no bundle.
//
// With ErrNotNewer, and only then, Verify also returns the authenticated
// bundle, so that a caller can tell a relay of the bundle it holds (same
// sequence and digest: worth keeping as the signed form of it) from an
// older one. It must not be installed.
func Verify(current *bundle.Bundle, token string) (*bundle.Bundle, error) {
	if current == nil {
		return nil, errors.New("bundlesig: verify: no current bundle")
	}
	if len(token) > MaxSize {
		return nil, invalid("%d bytes, more than the limit of %d", len(token), MaxSize)
	}
	if len(token) == 0 {
		return nil, invalid("empty")
	}
	hdr, err := parseHeader(token)
	if err != nil {
		return nil, err
	}
	obj, err := jose.ParseSignedCompact(token, algorithms)
	if err != nil {
		return nil, invalid("%v", err)
	}
	if n := len(obj.Signatures); n != 1 {
		return nil, invalid("%d signatures, want exactly 1", n)
	}
	sig := obj.Signatures[0]
	if sig.Protected.KeyID != hdr.Kid || sig.Protected.Algorithm != hdr.Alg {
		return nil, invalid("protected header parsed inconsistently")
	}
	var root *x509.Certificate
	for _, r := range current.Roots() {
		if svid.Fingerprint(r) == hdr.Kid {
			root = r
			break
		}
	}
	if root == nil {
		return nil, invalid("signed by a root this cluster does not trust (kid %.80q is not in bundle %d of %s)", hdr.Kid, current.Sequence(), current.TrustDomain())
	}
	want, err := algorithmFor(root.PublicKey)
	if err != nil {
		return nil, invalid("signing root %q: %v", root.Subject, err)
	}
	if string(want) != hdr.Alg {
		return nil, invalid("alg %q does not fit the key of root %q (want %s)", hdr.Alg, root.Subject, want)
	}
	payload, err := obj.Verify(root.PublicKey)
	if err != nil {
		return nil, invalid("signature does not verify under root %q: %v", root.Subject, err)
	}
	next, err := bundle.ParseJWKS(current.TrustDomain(), payload)
	if err != nil {
		return nil, invalid("payload: %v", err)
	}
	roots := next.Roots()
	if len(roots) == 0 {
		return nil, invalid("the new bundle has no roots")
	}
	if err := checkTrustDomain(current.TrustDomain(), roots); err != nil {
		return nil, err
	}
	if !next.Contains(root) {
		return nil, invalid("the new bundle drops its own signer, root %q", root.Subject)
	}
	if next.Sequence() <= current.Sequence() {
		return next, fmt.Errorf("%w: sequence %d, holding %d", ErrNotNewer, next.Sequence(), current.Sequence())
	}
	return next, nil
}

// checkTrustDomain refuses roots that name another trust domain. The SPIFFE
// bundle document does not carry its trust domain; Strait roots carry it as
// their URI SAN (and a name constraint), so a bundle for another mesh is
// recognized by its roots.
func checkTrustDomain(td spiffeid.TrustDomain, roots []*x509.Certificate) error {
	for _, r := range roots {
		for _, u := range r.URIs {
			if u == nil || u.Scheme != "spiffe" {
				continue
			}
			id, err := spiffeid.FromURI(u)
			if err != nil || id.TrustDomain() != td {
				return invalid("root %q is for %q, not trust domain %q", r.Subject, u.String(), td)
			}
		}
	}
	return nil
}

// VerifyFrom is Verify for a receiver that holds held, the signed form of
// current (as a previous VerifyFrom accepted it, or as the root authority
// issued it), and follows the chain of signers: the new bundle must be
// signed by the root that signed held, or by the successor held announced.
// A root that has handed over (an old, tainted root) can then no longer
// sign bundles this receiver accepts, even though it is still in the
// bundle: without this, the holder of a compromised root's key could sign
// a bundle with a huge sequence and make every later bundle of the root
// authority (its revoke included) look older.
//
// The successor's first bundle may have the sequence of current and the
// same roots (the handover at activate): it is accepted, so that the new
// signer is followed from then on. With held empty (a receiver that has
// never seen a signed bundle), VerifyFrom is Verify.
func VerifyFrom(current *bundle.Bundle, held, token string) (*bundle.Bundle, error) {
	next, err := Verify(current, token)
	if held == "" || (err != nil && !errors.Is(err, ErrNotNewer)) {
		return next, err
	}
	hh, herr := parseHeader(held)
	if herr != nil {
		return nil, fmt.Errorf("bundlesig: the signed bundle held is unreadable: %w", herr)
	}
	th, terr := parseHeader(token)
	if terr != nil {
		return nil, terr
	}
	switch {
	case th.Kid == hh.Kid:
		return next, err
	case hh.Nxt != "" && th.Kid == hh.Nxt:
		if errors.Is(err, ErrNotNewer) && next.Sequence() == current.Sequence() && next.Digest() == current.Digest() {
			return next, nil // the handover: the same bundle, from the successor
		}
		return next, err
	default:
		return nil, invalid("signed by root %.80q, but this cluster follows root %.80q (successor announced: %.80q): a root that handed over signs nothing more", th.Kid, hh.Kid, hh.Nxt)
	}
}
