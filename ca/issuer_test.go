package ca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/svid"
)

const td = "strait.example"

var web = spiffeid.RequireFromString("spiffe://strait.example/ns/shop/sa/web")

// fakeClock is an injected clock tests move by hand.
type fakeClock struct{ t time.Time }

func (c *fakeClock) Now() time.Time          { return c.t }
func (c *fakeClock) Advance(d time.Duration) { c.t = c.t.Add(d) }

func newClock() *fakeClock {
	return &fakeClock{t: time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)}
}

func mustURL(s string) *url.URL {
	u, err := url.Parse(s)
	if err != nil {
		panic(err)
	}
	return u
}

func basicConstraintsExt(t *testing.T, isCA bool) pkix.Extension {
	t.Helper()
	v, err := asn1.Marshal(struct {
		IsCA bool `asn1:"optional"`
	}{isCA})
	if err != nil {
		t.Fatal(err)
	}
	return pkix.Extension{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: v}
}

func csrWithKey(t *testing.T, key any, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestIssueSVID(t *testing.T) {
	clk := newClock()
	c := catest.New(t, td, catest.Options{Clock: clk.Now})
	verifier, err := svid.NewVerifier(svid.VerifierConfig{TrustDomain: c.Bundle().TrustDomain(), Bundles: c.Bundle(), Clock: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	_, good := catest.CSR(t, nil)
	tampered := append([]byte(nil), good...)
	tampered[len(tampered)-5] ^= 0xff

	tests := []struct {
		name    string
		csr     []byte
		id      spiffeid.ID
		ttl     time.Duration
		wantErr string        // substring; empty means success
		wantTTL time.Duration // for successes; zero means 1h
	}{
		{name: "good SVID, CSR without URI", csr: good, id: web},
		{name: "CSR naming the proved ID", csr: mustCSR(t, &x509.CertificateRequest{URIs: []*url.URL{web.URL()}}), id: web},
		{name: "two URI SANs", csr: mustCSR(t, &x509.CertificateRequest{URIs: []*url.URL{web.URL(), mustURL("spiffe://strait.example/ns/x/sa/y")}}), id: web, wantErr: "2 URI SANs"},
		{name: "other URI than proved", csr: mustCSR(t, &x509.CertificateRequest{URIs: []*url.URL{mustURL("spiffe://strait.example/ns/kube-system/sa/admin")}}), id: web, wantErr: "caller proved"},
		{name: "DNS SAN", csr: mustCSR(t, &x509.CertificateRequest{DNSNames: []string{"web.shop"}}), id: web, wantErr: "DNS, IP or email"},
		{name: "CA=true", csr: mustCSR(t, &x509.CertificateRequest{ExtraExtensions: []pkix.Extension{basicConstraintsExt(t, true)}}), id: web, wantErr: "CA=true"},
		{name: "CA=false is fine", csr: mustCSR(t, &x509.CertificateRequest{ExtraExtensions: []pkix.Extension{basicConstraintsExt(t, false)}}), id: web},
		{name: "longer TTL is capped", csr: good, id: web, ttl: 30 * 24 * time.Hour, wantTTL: ca.MaxSVIDTTL},
		{name: "short TTL honoured", csr: good, id: web, ttl: 5 * time.Minute, wantTTL: 5 * time.Minute},
		{name: "other trust domain", csr: good, id: spiffeid.RequireFromString("spiffe://other.example/ns/a/sa/b"), wantErr: "not in trust domain"},
		{name: "root-path ID", csr: good, id: spiffeid.RequireFromString("spiffe://strait.example"), wantErr: "non-root path"},
		{name: "RSA key", csr: csrWithKey(t, rsaKey, &x509.CertificateRequest{}), id: web, wantErr: "ECDSA P-256"},
		{name: "P-384 key", csr: csrWithKey(t, p384, &x509.CertificateRequest{}), id: web, wantErr: "ECDSA P-256, got ECDSA P-384"},
		{name: "tampered signature", csr: tampered, id: web, wantErr: "CSR"},
		{name: "garbage", csr: []byte("not a csr"), id: web, wantErr: "parse CSR"},
		{name: "empty", csr: nil, id: web, wantErr: "empty"},
		{name: "oversized", csr: make([]byte, ca.MaxCSRSize+1), id: web, wantErr: "more than the limit"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			chain, err := c.Issuer.IssueSVID(ca.SVIDRequest{CSR: tc.csr, ID: tc.id, TTL: tc.ttl})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("IssueSVID: got error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("IssueSVID: got error %v, want none", err)
			}
			leaf := chain[0]
			if got, want := len(chain), 2; got != want {
				t.Fatalf("chain length: got %d, want %d", got, want)
			}
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != tc.id.String() {
				t.Fatalf("URI SANs: got %v, want [%s]", leaf.URIs, tc.id)
			}
			if leaf.IsCA || len(leaf.DNSNames) > 0 {
				t.Fatalf("leaf: IsCA %v, DNS %v; want a plain SVID", leaf.IsCA, leaf.DNSNames)
			}
			if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
				t.Fatalf("key usage: got %v, want digitalSignature only", leaf.KeyUsage)
			}
			if got := leaf.ExtKeyUsage; len(got) != 2 || got[0] != x509.ExtKeyUsageServerAuth || got[1] != x509.ExtKeyUsageClientAuth {
				t.Fatalf("EKU: got %v, want serverAuth, clientAuth", got)
			}
			wantTTL := tc.wantTTL
			if wantTTL == 0 {
				wantTTL = ca.DefaultSVIDTTL
			}
			if got := leaf.NotAfter.Sub(clk.Now()); got != wantTTL {
				t.Fatalf("lifetime: got %s, want %s", got, wantTTL)
			}
			if got := clk.Now().Sub(leaf.NotBefore); got != ca.DefaultBackdate {
				t.Fatalf("backdate: got %s, want %s", got, ca.DefaultBackdate)
			}
			if leaf.SerialNumber.BitLen() < 64 {
				t.Fatalf("serial %s has %d bits, want a random one of at least 64", leaf.SerialNumber, leaf.SerialNumber.BitLen())
			}
			id, _, err := verifier.Verify(chain, svid.RoleServer)
			if err != nil || id != tc.id {
				t.Fatalf("verify issued SVID: got %s, %v; want %s", id, err, tc.id)
			}
		})
	}
}

func mustCSR(t *testing.T, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	_, der := catest.CSR(t, tmpl)
	return der
}

func TestIssueSVIDNeverOutlivesIntermediate(t *testing.T) {
	clk := newClock()
	c := catest.New(t, td, catest.Options{Clock: clk.Now})
	inter := c.Issuer.Chain()[0]
	clk.t = inter.NotAfter.Add(-10 * time.Minute)
	chain, err := c.Issuer.IssueSVID(ca.SVIDRequest{CSR: mustCSR(t, nil), ID: web})
	if err != nil {
		t.Fatal(err)
	}
	if !chain[0].NotAfter.Equal(inter.NotAfter) {
		t.Fatalf("leaf NotAfter: got %s, want the intermediate's %s", chain[0].NotAfter, inter.NotAfter)
	}
	clk.Advance(time.Hour)
	if _, err := c.Issuer.IssueSVID(ca.SVIDRequest{CSR: mustCSR(t, nil), ID: web}); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("issue under expired intermediate: got %v, want an expiry error", err)
	}
}

func TestSignIntermediate(t *testing.T) {
	clk := newClock()
	c := catest.New(t, td, catest.Options{Clock: clk.Now})
	ctx := t.Context()
	key, der := catest.CSR(t, &x509.CertificateRequest{
		Subject:         pkix.Name{CommonName: "please make me a root"},
		DNSNames:        []string{"evil.example"},
		ExtraExtensions: []pkix.Extension{basicConstraintsExt(t, true)},
	})
	cert, err := c.Authority.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: "west", CSR: der, TTL: 20 * 365 * 24 * time.Hour})
	if err != nil {
		t.Fatalf("SignIntermediate: %v", err)
	}
	checks := []struct {
		name string
		ok   bool
	}{
		{"is a CA", cert.IsCA && cert.BasicConstraintsValid},
		{"path length 0", cert.MaxPathLen == 0 && cert.MaxPathLenZero},
		{"URI name constraint to the trust domain", len(cert.PermittedURIDomains) == 1 && cert.PermittedURIDomains[0] == td && cert.PermittedDNSDomainsCritical},
		{"no DNS SAN from the CSR", len(cert.DNSNames) == 0},
		{"subject chosen by the CA", cert.Subject.CommonName == "Strait intermediate west"},
		{"key from the CSR", cert.PublicKey.(*ecdsa.PublicKey).Equal(key.Public())},
		{"lifetime capped", cert.NotAfter.Sub(clk.Now()) == ca.MaxIntermediateTTL},
		{"signs certificates", cert.KeyUsage&x509.KeyUsageCertSign != 0},
	}
	for _, ch := range checks {
		if !ch.ok {
			t.Errorf("intermediate: want %s", ch.name)
		}
	}
	roots := x509.NewCertPool()
	for _, r := range c.Bundle().Roots() {
		roots.AddCert(r)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: clk.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("intermediate does not chain to the root: %v", err)
	}
	for _, bad := range []string{"", "West", "we/st", strings.Repeat("a", 64)} {
		if _, err := c.Authority.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: bad, CSR: der}); err == nil {
			t.Errorf("SignIntermediate(cluster %q): got no error, want one", bad)
		}
	}
	if _, err := c.Authority.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: "south", CSR: []byte("junk")}); !errors.Is(err, ca.ErrCSRRefused) {
		t.Errorf("SignIntermediate(junk CSR): got %v, want ErrCSRRefused", err)
	}
	if got := len(c.Authority.Status().Intermediates); got != 2 {
		t.Errorf("intermediates recorded: got %d, want 2 (east, west)", got)
	}
}

// TestSignIntermediateForAJoin: a cluster joining with a token may not take
// over the name of a cluster whose intermediate is still valid under
// another key; the same cluster retrying with its key is signed again, and
// a renewal outside a join replaces the record as before.
func TestSignIntermediateForAJoin(t *testing.T) {
	c := catest.New(t, "strait.example")
	ctx := context.Background()
	_, westCSR := catest.CSR(t, nil)
	if _, err := c.Authority.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: "west", CSR: westCSR, Join: true}); err != nil {
		t.Fatalf("first join of west: %v", err)
	}
	if _, err := c.Authority.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: "west", CSR: westCSR, Join: true}); err != nil {
		t.Fatalf("west retrying its join with its key: %v", err)
	}
	_, impostor := catest.CSR(t, nil)
	_, err := c.Authority.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: "west", CSR: impostor, Join: true})
	if !errors.Is(err, ca.ErrCSRRefused) || !strings.Contains(err.Error(), "already holds an intermediate") {
		t.Fatalf("another key joining as west: %v", err)
	}
	if _, err := c.Authority.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: "west", CSR: impostor}); err != nil {
		t.Fatalf("a renewal of west under a new key (not a join): %v", err)
	}
}
