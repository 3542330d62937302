package bundle

import (
	"crypto/x509"
	"testing"
)

// FuzzParseJWKS checks that ParseJWKS never panics and that whatever it
// accepts is within the limits and survives a round trip.
func FuzzParseJWKS(f *testing.F) {
	root := newCert(f, true)
	b, _ := New(td, 3, []*x509.Certificate{root})
	good, _ := b.MarshalJWKS()
	f.Add(good)
	f.Add([]byte(`{"keys":[],"spiffe_sequence":1}`))
	f.Add([]byte(`{"keys":[{"use":"x509-svid","kty":"EC","x5c":["AAAA"]}],"spiffe_sequence":1}`))
	f.Add([]byte(`{"keys":null}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := ParseJWKS(td, data)
		if err != nil {
			return
		}
		if n := len(b.Roots()); n == 0 || n > MaxRoots {
			t.Fatalf("accepted a bundle with %d roots", n)
		}
		out, err := b.MarshalJWKS()
		if err != nil {
			t.Fatalf("marshal accepted bundle: %v", err)
		}
		again, err := ParseJWKS(td, out)
		if err != nil || again.Digest() != b.Digest() || again.Sequence() != b.Sequence() {
			t.Fatalf("round trip: %v", err)
		}
	})
}

// FuzzParsePEM checks ParsePEM the same way.
func FuzzParsePEM(f *testing.F) {
	root := newCert(f, true)
	b, _ := New(td, 3, []*x509.Certificate{root})
	f.Add(b.MarshalPEM())
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := ParsePEM(td, 1, data)
		if err != nil {
			return
		}
		if _, err := ParsePEM(td, 1, b.MarshalPEM()); err != nil {
			t.Fatalf("round trip: %v", err)
		}
	})
}
