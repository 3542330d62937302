package ca_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/catest"
)

// benchRaw is the baseline: x509.CreateCertificate of an SVID-shaped leaf
// with an ECDSA P-256 issuer key, nothing else.
func benchRaw(b *testing.B) {
	issuerKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	parent := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "issuer"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, _ := x509.CreateCertificate(rand.Reader, parent, parent, issuerKey.Public(), issuerKey)
	parent, _ = x509.ParseCertificate(der)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), URIs: []*url.URL{web.URL()},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	b.ResetTimer()
	for b.Loop() {
		if _, err := x509.CreateCertificate(rand.Reader, tmpl, parent, leafKey.Public(), issuerKey); err != nil {
			b.Fatal(err)
		}
	}
}

// benchIssue is the real path: a CSR in (parsed, signature and policy
// checked), an SVID out (x509util model, softcas signing, parsed result).
func benchIssue(b *testing.B) {
	c := catest.New(b, td)
	_, csr := catest.CSR(b, nil)
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Issuer.IssueSVID(ca.SVIDRequest{CSR: csr, ID: web}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRawCreateCertificate(b *testing.B) { benchRaw(b) }
func BenchmarkIssueSVID(b *testing.B)            { benchIssue(b) }

// TestReportIssuanceRatio prints SVID issuance rate as a ratio of the raw
// x509.CreateCertificate rate measured in the same run. It is a report, not
// a pass/fail timing test; make bench runs it (STRAIT_BENCH=1).
func TestReportIssuanceRatio(t *testing.T) {
	if os.Getenv("STRAIT_BENCH") == "" {
		t.Skip("set STRAIT_BENCH=1 (make bench) to run benchmark reports")
	}
	rate := func(r testing.BenchmarkResult) float64 { return float64(r.N) / r.T.Seconds() }
	var raw, issue []float64
	for range 3 { // interleave to share the machine's noise
		raw = append(raw, rate(testing.Benchmark(benchRaw)))
		issue = append(issue, rate(testing.Benchmark(benchIssue)))
	}
	r, i := median(raw), median(issue)
	t.Logf("report: raw x509.CreateCertificate (ECDSA P-256): %.0f/s", r)
	t.Logf("report: SVID issuance from CSR (parse+verify CSR, policy, sign): %.0f/s", i)
	t.Logf("report: issuance/raw ratio: %.2f (aim >= 0.50)", i/r)
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[len(s)/2]
}
