package bundlesig_test

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/cryptosigner"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/svid"
)

const td = "strait.example"

// testRoot is a root certificate and its key.
type testRoot struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func (r testRoot) kid() string { return svid.Fingerprint(r.cert) }

// loadRoot reads a fixed root of trust domain td from testdata (a
// certificate and its PKCS #8 key in one PEM file), so that the checked-in
// fuzz corpus holds tokens that verify.
func loadRoot(t testing.TB, name string) testRoot {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", name+".pem"))
	if err != nil {
		t.Fatal(err)
	}
	var r testRoot
	for block, rest := pem.Decode(data); block != nil; block, rest = pem.Decode(rest) {
		switch block.Type {
		case "CERTIFICATE":
			r.cert, err = x509.ParseCertificate(block.Bytes)
		case "PRIVATE KEY":
			var k any
			k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
			r.key, _ = k.(crypto.Signer)
		}
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	if r.cert == nil || r.key == nil {
		t.Fatalf("%s: want a CERTIFICATE and a PRIVATE KEY", name)
	}
	return r
}

// newRoot makes a self-signed root for trust domain tdName with key, as
// the mesh CA does (URI SAN of the trust domain, CA, path length 1).
func newRoot(t testing.TB, tdName string, key crypto.Signer) testRoot {
	t.Helper()
	u, _ := url.Parse("spiffe://" + tdName)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{Organization: []string{"Strait"}, CommonName: "test root " + tdName},
		NotBefore:             time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
		NotAfter:              time.Date(2036, 1, 1, 0, 0, 0, 0, time.UTC),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLen:            1,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		URIs:                  []*url.URL{u},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return testRoot{cert: cert, key: key}
}

func mustBundle(t testing.TB, seq uint64, roots ...testRoot) *bundle.Bundle {
	t.Helper()
	certs := make([]*x509.Certificate, 0, len(roots))
	for _, r := range roots {
		certs = append(certs, r.cert)
	}
	b, err := bundle.New(spiffeid.RequireTrustDomainFromString(td), seq, certs)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustJWKS(t testing.TB, b *bundle.Bundle) []byte {
	t.Helper()
	out, err := b.MarshalJWKS()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// forge builds a compact JWS by hand, with any header, signed by key with
// alg (an empty signature for alg "none" or a nil key): for tokens that
// Sign would never make.
func forge(t testing.TB, header map[string]any, payload []byte, key crypto.Signer) string {
	t.Helper()
	h, err := json.Marshal(header)
	if err != nil {
		t.Fatal(err)
	}
	input := b64(h) + "." + b64(payload)
	var sig []byte
	if alg, _ := header["alg"].(string); key != nil && alg != "none" {
		sig, err = cryptosigner.Opaque(key).SignPayload([]byte(input), jose.SignatureAlgorithm(alg))
		if err != nil {
			t.Fatalf("forge: sign with %s: %v", alg, err)
		}
	}
	return input + "." + b64(sig)
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// header returns the decoded protected header of a compact JWS.
func header(t testing.TB, token string) map[string]any {
	t.Helper()
	enc, _, _ := strings.Cut(token, ".")
	raw, err := base64.RawURLEncoding.DecodeString(enc)
	if err != nil {
		t.Fatal(err)
	}
	var h map[string]any
	if err := json.Unmarshal(raw, &h); err != nil {
		t.Fatal(err)
	}
	return h
}
