package bundle

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var td = spiffeid.RequireTrustDomainFromString("strait.example")

func newCert(t testing.TB, isCA bool) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "test root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  isCA,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestRoundTrip(t *testing.T) {
	a, b := newCert(t, true), newCert(t, true)
	bn, err := New(td, 7, []*x509.Certificate{a, b, a})
	if err != nil {
		t.Fatal(err)
	}
	if got := len(bn.Roots()); got != 2 {
		t.Fatalf("roots after dedupe = %d, want 2", got)
	}
	rev, _ := New(td, 8, []*x509.Certificate{b, a})
	if bn.Digest() != rev.Digest() {
		t.Fatalf("digest depends on root order: %s vs %s", bn.Digest(), rev.Digest())
	}
	jwks, err := bn.WithRefreshHint(5 * time.Minute).MarshalJWKS()
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := ParseJWKS(td, jwks)
	if err != nil {
		t.Fatalf("ParseJWKS: %v", err)
	}
	if parsed.Sequence() != 7 || parsed.Digest() != bn.Digest() {
		t.Fatalf("JWKS round trip: got seq %d digest %s, want 7 %s", parsed.Sequence(), parsed.Digest(), bn.Digest())
	}
	fromPEM, err := ParsePEM(td, 7, bn.MarshalPEM())
	if err != nil {
		t.Fatalf("ParsePEM: %v", err)
	}
	if fromPEM.Digest() != bn.Digest() {
		t.Fatal("PEM round trip changed the digest")
	}
	if !bn.Contains(a) || bn.Contains(newCert(t, true)) {
		t.Fatal("Contains is wrong")
	}
	if _, err := bn.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("other.example")); err == nil {
		t.Fatal("GetX509BundleForTrustDomain(other): got no error, want one")
	}
}

func TestParseRefuses(t *testing.T) {
	leaf := newCert(t, false)
	root := newCert(t, true)
	noSeq, _ := New(td, 1, []*x509.Certificate{root})
	sb := noSeq.SPIFFEBundle()
	sb.ClearSequenceNumber()
	noSeqJWKS, _ := sb.Marshal()
	tests := []struct {
		name, data, want string
	}{
		{"not json", "{", "unable to parse"},
		{"no keys", `{"spiffe_sequence":1}`, "no authorities"},
		{"no sequence", string(noSeqJWKS), "spiffe_sequence is missing"},
		{"empty keys", `{"keys":[],"spiffe_sequence":1}`, "no roots"},
		{"too big", strings.Repeat(" ", MaxEncodedSize+1), "more than the limit"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseJWKS(td, []byte(tc.data))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ParseJWKS: got %v, want error containing %q", err, tc.want)
			}
		})
	}
	if _, err := New(td, 1, []*x509.Certificate{leaf}); err == nil || !strings.Contains(err.Error(), "not a CA") {
		t.Fatalf("New(leaf): got %v, want not-a-CA error", err)
	}
	if _, err := ParsePEM(td, 1, []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")); err == nil {
		t.Fatal("ParsePEM(private key): got no error, want one")
	}
	if _, err := ParsePEM(td, 1, append(noSeq.MarshalPEM(), "junk"...)); err == nil {
		t.Fatal("ParsePEM(trailing junk): got no error, want one")
	}
}
