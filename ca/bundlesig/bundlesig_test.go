package bundlesig_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"errors"
	"strings"
	"testing"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/cryptosigner"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/bundlesig"
)

func TestSignAndVerifyEveryKeyType(t *testing.T) {
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p521, _ := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	for _, tc := range []struct {
		name    string
		key     crypto.Signer
		wantAlg string
	}{
		{"P-256", p256, "ES256"},
		{"P-384", p384, "ES384"},
		{"P-521", p521, "ES512"},
		{"Ed25519", ed, "EdDSA"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			old, next := newRoot(t, td, tc.key), loadRoot(t, "root-b")
			current := mustBundle(t, 7, old)
			want := mustBundle(t, 8, old, next)
			token, err := bundlesig.Sign(want, old.cert, old.key)
			if err != nil {
				t.Fatalf("Sign: %v", err)
			}
			h := header(t, token)
			if h["alg"] != tc.wantAlg || h["kid"] != old.kid() || h["typ"] != bundlesig.Type || len(h) != 3 {
				t.Fatalf("protected header: got %v, want exactly alg %s, kid %s, typ %s", h, tc.wantAlg, old.kid(), bundlesig.Type)
			}
			got, err := bundlesig.Verify(current, token)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if got.Sequence() != 8 || got.Digest() != want.Digest() || got.TrustDomain() != want.TrustDomain() {
				t.Fatalf("Verify: got bundle %d %s of %s, want %d %s of %s", got.Sequence(), got.Digest(), got.TrustDomain(), 8, want.Digest(), want.TrustDomain())
			}
		})
	}
}

func TestSignRefuses(t *testing.T) {
	a, b := loadRoot(t, "root-a"), loadRoot(t, "root-b")
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	rsaRoot := newRoot(t, td, rsaKey)
	for _, tc := range []struct {
		name string
		b    *bundle.Bundle
		root testRoot
		key  crypto.Signer
		want string
	}{
		{"key of another root", mustBundle(t, 2, a, b), a, b.key, "does not match"},
		{"root not in the bundle", mustBundle(t, 2, b), a, a.key, "not in the bundle"},
		{"RSA root", mustBundle(t, 2, rsaRoot), rsaRoot, rsaKey, "not supported"},
		{"no bundle", nil, a, a.key, "no bundle"},
		{"no key", mustBundle(t, 2, a), a, nil, "no key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			token, err := bundlesig.Sign(tc.b, tc.root.cert, tc.key)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Sign: got %q, %v; want an error mentioning %q", token, err, tc.want)
			}
		})
	}
	if _, err := bundlesig.Sign(mustBundle(t, 2, a), nil, a.key); err == nil {
		t.Fatal("Sign with no root: got no error, want one")
	}
}

func TestVerify(t *testing.T) {
	a, b := loadRoot(t, "root-a"), loadRoot(t, "root-b")
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	other := newRoot(t, "other.example", otherKey)
	sign := func(bb *bundle.Bundle, r testRoot) string {
		t.Helper()
		token, err := bundlesig.Sign(bb, r.cert, r.key)
		if err != nil {
			t.Fatal(err)
		}
		return token
	}
	hdr := func(alg, kid string) map[string]any {
		return map[string]any{"alg": alg, "kid": kid, "typ": bundlesig.Type}
	}
	current := mustBundle(t, 5, a)
	valid := sign(mustBundle(t, 6, a, b), a)
	parts := strings.Split(valid, ".")
	flip := func(s string, i int) string { // flips a bit of the i-th decoded byte
		c, err := base64.RawURLEncoding.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		c[i] ^= 0x01
		return b64(c)
	}

	if got, err := bundlesig.Verify(current, valid); err != nil {
		t.Fatalf("valid token: %v", err)
	} else if got.Sequence() != 6 || len(got.Roots()) != 2 {
		t.Fatalf("valid token: got sequence %d with %d roots, want 6 with 2", got.Sequence(), len(got.Roots()))
	}

	for _, tc := range []struct {
		name    string
		current *bundle.Bundle
		token   string
		want    error
		msg     string
	}{
		{"tampered payload", current, parts[0] + "." + b64(mustJWKS(t, mustBundle(t, 9, a, b))) + "." + parts[2], bundlesig.ErrInvalid, "signature does not verify"},
		{"tampered signature", current, parts[0] + "." + parts[1] + "." + flip(parts[2], 3), bundlesig.ErrInvalid, "signature does not verify"},
		{"kid names a trusted root, signed by another key", current, forge(t, hdr("ES256", a.kid()), mustJWKS(t, mustBundle(t, 6, a, b)), b.key), bundlesig.ErrInvalid, "signature does not verify"},
		{"kid names no root", current, forge(t, hdr("ES256", "sha256:00"), mustJWKS(t, mustBundle(t, 6, a)), a.key), bundlesig.ErrInvalid, "signed by a root this cluster does not trust"},
		{"signer not in the current bundle", current, sign(mustBundle(t, 6, a, b), b), bundlesig.ErrInvalid, "signed by a root this cluster does not trust"},
		{"equal sequence", current, sign(mustBundle(t, 5, a, b), a), bundlesig.ErrNotNewer, "sequence 5, holding 5"},
		{"older sequence", current, sign(mustBundle(t, 4, a), a), bundlesig.ErrNotNewer, "sequence 4, holding 5"},
		{"a root of another trust domain", current, sign(mustBundle(t, 6, a, other), a), bundlesig.ErrInvalid, "not trust domain"},
		{"another mesh's bundle", mustBundle(t, 5, a), sign(mustBundle(t, 6, other), other), bundlesig.ErrInvalid, "does not trust"},
		{"signer dropped from the new bundle", current, forge(t, hdr("ES256", a.kid()), mustJWKS(t, mustBundle(t, 6, b)), a.key), bundlesig.ErrInvalid, "drops its own signer"},
		{"payload is not a bundle", current, forge(t, hdr("ES256", a.kid()), []byte(`{"keys":[]}`), a.key), bundlesig.ErrInvalid, "payload"},
		{"alg none", current, forge(t, hdr("none", a.kid()), mustJWKS(t, mustBundle(t, 6, a)), nil), bundlesig.ErrInvalid, ""},
		{"alg HS256", current, forge(t, hdr("HS256", a.kid()), mustJWKS(t, mustBundle(t, 6, a)), nil) + "AAAA", bundlesig.ErrInvalid, ""},
		{"alg RS256", current, forge(t, hdr("RS256", a.kid()), mustJWKS(t, mustBundle(t, 6, a)), nil) + "AAAA", bundlesig.ErrInvalid, ""},
		{"alg that does not fit the key", current, forge(t, hdr("EdDSA", a.kid()), mustJWKS(t, mustBundle(t, 6, a)), nil) + "AAAA", bundlesig.ErrInvalid, "does not fit"},
		{"wrong typ", current, forge(t, map[string]any{"alg": "ES256", "kid": a.kid(), "typ": "JWT"}, mustJWKS(t, mustBundle(t, 6, a)), a.key), bundlesig.ErrInvalid, "typ"},
		{"no kid", current, forge(t, map[string]any{"alg": "ES256", "typ": bundlesig.Type}, mustJWKS(t, mustBundle(t, 6, a)), a.key), bundlesig.ErrInvalid, "kid is missing"},
		{"embedded jwk", current, forge(t, map[string]any{"alg": "ES256", "kid": a.kid(), "typ": bundlesig.Type, "jwk": map[string]any{"kty": "EC"}}, mustJWKS(t, mustBundle(t, 6, a)), a.key), bundlesig.ErrInvalid, `"jwk"`},
		{"crit b64", current, forge(t, map[string]any{"alg": "ES256", "kid": a.kid(), "typ": bundlesig.Type, "b64": false, "crit": []string{"b64"}}, mustJWKS(t, mustBundle(t, 6, a)), a.key), bundlesig.ErrInvalid, "only alg, kid, typ and nxt"},
		{"JSON serialization", current, jsonSerialization(t, mustBundle(t, 6, a), a), bundlesig.ErrInvalid, ""},
		{"empty", current, "", bundlesig.ErrInvalid, "empty"},
		{"garbage", current, "not a jws at all", bundlesig.ErrInvalid, ""},
		{"three empty parts", current, "..", bundlesig.ErrInvalid, ""},
		{"four parts", current, valid + ".x", bundlesig.ErrInvalid, ""},
		{"binary", current, "\x00\xff.\x01.\x02", bundlesig.ErrInvalid, ""},
		{"oversize", current, strings.Repeat("A", bundlesig.MaxSize+1), bundlesig.ErrInvalid, "more than the limit"},
		{"oversize but valid after the limit", current, valid + strings.Repeat(" ", bundlesig.MaxSize), bundlesig.ErrInvalid, "more than the limit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := bundlesig.Verify(tc.current, tc.token)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Verify: got %v, want %v mentioning %q", err, tc.want, tc.msg)
			}
			switch {
			case tc.want == bundlesig.ErrInvalid && got != nil:
				t.Fatalf("Verify returned a bundle (sequence %d) with %v", got.Sequence(), err)
			case tc.want == bundlesig.ErrNotNewer && (got == nil || got.Sequence() > tc.current.Sequence()):
				t.Fatalf("Verify with ErrNotNewer: got bundle %v, want the authenticated, not newer bundle", got)
			}
			if tc.want == bundlesig.ErrInvalid && errors.Is(err, bundlesig.ErrNotNewer) {
				t.Fatalf("Verify: %v is ErrNotNewer, want only ErrInvalid", err)
			}
			if tc.want == bundlesig.ErrNotNewer && errors.Is(err, bundlesig.ErrInvalid) {
				t.Fatalf("Verify: %v is ErrInvalid, want only ErrNotNewer", err)
			}
		})
	}
	if _, err := bundlesig.Verify(nil, valid); err == nil {
		t.Fatal("Verify with no current bundle: got no error, want one")
	}
}

// jsonSerialization signs b as Sign does but renders the JWS JSON
// serialization, which Verify must refuse.
func jsonSerialization(t *testing.T, b *bundle.Bundle, r testRoot) string {
	t.Helper()
	opts := (&jose.SignerOptions{}).WithType(bundlesig.Type).WithHeader("kid", r.kid())
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: cryptosigner.Opaque(r.key)}, opts)
	if err != nil {
		t.Fatal(err)
	}
	obj, err := s.Sign(mustJWKS(t, b))
	if err != nil {
		t.Fatal(err)
	}
	return obj.FullSerialize()
}

// Each bundle in a rotation is vouched for by a root of the one before:
// prepare (A signs {A,B}), retire (B signs {B}). A member that skipped a
// step cannot follow.
func TestVerifyChainsAcrossARotation(t *testing.T) {
	a, b := loadRoot(t, "root-a"), loadRoot(t, "root-b")
	seq1, seq2, seq3 := mustBundle(t, 1, a), mustBundle(t, 2, a, b), mustBundle(t, 3, b)
	prepared, err := bundlesig.Sign(seq2, a.cert, a.key)
	if err != nil {
		t.Fatal(err)
	}
	retired, err := bundlesig.Sign(seq3, b.cert, b.key)
	if err != nil {
		t.Fatal(err)
	}
	held := seq1
	for _, token := range []string{prepared, retired} {
		next, err := bundlesig.Verify(held, token)
		if err != nil {
			t.Fatalf("holding %d: %v", held.Sequence(), err)
		}
		held = next
	}
	if held.Digest() != seq3.Digest() {
		t.Fatalf("after the rotation: holding %s, want %s", held.Digest(), seq3.Digest())
	}
	if _, err := bundlesig.Verify(seq1, retired); !errors.Is(err, bundlesig.ErrInvalid) || !strings.Contains(err.Error(), "does not trust") {
		t.Fatalf("skipping prepare: got %v, want a refusal for an untrusted signer", err)
	}
}

// TestVerifyFromFollowsSigners: a receiver that follows the chain of
// signers accepts the successor's handover at the same sequence and its
// later bundles, and refuses a root that has handed over, however high the
// sequence it signs (a compromised old root cannot block the revoke).
func TestVerifyFromFollowsSigners(t *testing.T) {
	a, b := loadRoot(t, "root-a"), loadRoot(t, "root-b")
	seq1, seq2, seq3 := mustBundle(t, 1, a), mustBundle(t, 2, a, b), mustBundle(t, 3, b)
	initial, err := bundlesig.Sign(seq1, a.cert, a.key)
	if err != nil {
		t.Fatal(err)
	}
	prepared, err := bundlesig.SignWithSuccessor(seq2, a.cert, a.key, b.cert)
	if err != nil {
		t.Fatal(err)
	}
	if got := header(t, prepared)["nxt"]; got != b.kid() {
		t.Fatalf("nxt header %v, want %s", got, b.kid())
	}
	handover, err := bundlesig.Sign(seq2, b.cert, b.key)
	if err != nil {
		t.Fatal(err)
	}
	retired, err := bundlesig.Sign(seq3, b.cert, b.key)
	if err != nil {
		t.Fatal(err)
	}
	// The old root, compromised, signs a bundle with a huge sequence.
	forged, err := bundlesig.Sign(mustBundle(t, 1000, a, b), a.cert, a.key)
	if err != nil {
		t.Fatal(err)
	}

	if _, err := bundlesig.VerifyFrom(seq1, initial, prepared); err != nil {
		t.Fatalf("prepare, signed by the root held: %v", err)
	}
	if got, err := bundlesig.VerifyFrom(seq2, prepared, handover); err != nil || got.Sequence() != 2 {
		t.Fatalf("the handover at the same sequence: %v, %v", got, err)
	}
	if _, err := bundlesig.VerifyFrom(seq2, handover, forged); !errors.Is(err, bundlesig.ErrInvalid) || !strings.Contains(err.Error(), "handed over") {
		t.Fatalf("the old root after the handover: got %v, want a refusal", err)
	}
	// Missing the handover: the announced successor is still followed.
	if _, err := bundlesig.VerifyFrom(seq2, prepared, retired); err != nil {
		t.Fatalf("retire from the announced successor, handover missed: %v", err)
	}
	if _, err := bundlesig.VerifyFrom(seq2, handover, retired); err != nil {
		t.Fatalf("retire after the handover: %v", err)
	}
	// Before the handover the old root is still the signer: the same
	// sequence again is only "not newer".
	if _, err := bundlesig.VerifyFrom(seq2, prepared, prepared); !errors.Is(err, bundlesig.ErrNotNewer) {
		t.Fatalf("the bundle held, again: got %v, want ErrNotNewer", err)
	}
	// A receiver holding no signed form yet: plain Verify.
	if _, err := bundlesig.VerifyFrom(seq2, "", forged); err != nil {
		t.Fatalf("no signed form held: got %v, want Verify's answer (accepted)", err)
	}
	if _, err := bundlesig.VerifyFrom(seq2, "garbage", retired); err == nil {
		t.Fatal("an unreadable signed form held was not reported")
	}
}
