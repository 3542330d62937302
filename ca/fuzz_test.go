package ca_test

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"net/url"
	"testing"
	"time"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/svid"
)

// FuzzIssueSVID feeds arbitrary bytes to the CSR path. It must never panic,
// and whatever it signs must be an SVID for exactly the proved ID and
// nothing more: one URI SAN, no other SANs, not a CA, within the TTL cap,
// accepted by the verifier.
func FuzzIssueSVID(f *testing.F) {
	c := catest.New(f, td)
	b := c.Bundle()
	v, err := svid.NewVerifier(svid.VerifierConfig{TrustDomain: b.TrustDomain(), Bundles: b})
	if err != nil {
		f.Fatal(err)
	}
	seeds := []*x509.CertificateRequest{
		{},
		{URIs: []*url.URL{web.URL()}},
		{URIs: []*url.URL{web.URL(), web.URL()}},
		{DNSNames: []string{"a.example"}},
		{Subject: pkix.Name{CommonName: "x"}, EmailAddresses: []string{"a@b"}},
	}
	for _, s := range seeds {
		_, der := catest.CSR(f, s)
		f.Add(der, int64(0))
	}
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x00}, int64(time.Hour))
	f.Fuzz(func(t *testing.T, csr []byte, ttl int64) {
		chain, err := c.Issuer.IssueSVID(ca.SVIDRequest{CSR: csr, ID: web, TTL: time.Duration(ttl)})
		if err != nil {
			return
		}
		leaf := chain[0]
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != web.String() {
			t.Fatalf("issued URIs %v, want exactly %s", leaf.URIs, web)
		}
		if leaf.IsCA || len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) > 0 {
			t.Fatalf("issued more than an SVID: CA %v, SANs %v %v %v", leaf.IsCA, leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
		}
		if life := leaf.NotAfter.Sub(leaf.NotBefore); life > ca.MaxSVIDTTL+ca.DefaultBackdate {
			t.Fatalf("issued lifetime %s beyond the cap", life)
		}
		if _, _, err := v.Verify(chain, svid.RoleAny); err != nil {
			t.Fatalf("issued SVID does not verify: %v", err)
		}
	})
}
