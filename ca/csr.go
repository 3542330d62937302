package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// MaxCSRSize bounds the DER size of a CSR the CA will parse.
const MaxCSRSize = 8 << 10

// ErrCSRRefused is wrapped by every error for a CSR the CA will not sign.
var ErrCSRRefused = errors.New("ca: CSR refused")

func refuse(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCSRRefused, fmt.Sprintf(format, args...))
}

var oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}

// ParseCSR parses a DER certificate request and checks what every CSR the CA
// signs must satisfy: bounded size, a valid self-signature (proof of
// possession), and an ECDSA P-256 public key.
func ParseCSR(der []byte) (*x509.CertificateRequest, error) {
	if len(der) == 0 {
		return nil, refuse("CSR is empty")
	}
	if len(der) > MaxCSRSize {
		return nil, refuse("CSR is %d bytes, more than the limit of %d", len(der), MaxCSRSize)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, refuse("parse CSR: %v", err)
	}
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		return nil, refuse("CSR key must be ECDSA P-256, got %s", keyDescription(csr.PublicKey))
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, refuse("CSR signature does not verify: %v", err)
	}
	return csr, nil
}

// checkLeafCSR refuses a CSR that asks for more than an SVID for id: a
// different or second URI SAN, any DNS, IP or email SAN, or CA=true. Other
// requested extensions are ignored: the CA never copies anything from a CSR
// but its public key.
func checkLeafCSR(csr *x509.CertificateRequest, id spiffeid.ID) error {
	switch n := len(csr.URIs); {
	case n > 1:
		return refuse("CSR asks for %d URI SANs; an SVID has exactly one", n)
	case n == 1 && csr.URIs[0].String() != id.String():
		return refuse("CSR asks for %q but the caller proved %q", csr.URIs[0], id)
	}
	if len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) > 0 {
		return refuse("CSR asks for DNS, IP or email SANs; Strait SVIDs carry only the SPIFFE ID")
	}
	return checkNotCA(csr)
}

func checkNotCA(csr *x509.CertificateRequest) error {
	for _, ext := range csr.Extensions {
		if !ext.Id.Equal(oidBasicConstraints) {
			continue
		}
		var bc struct {
			IsCA bool `asn1:"optional"`
		}
		if _, err := asn1.Unmarshal(ext.Value, &bc); err != nil {
			return refuse("CSR basic constraints extension is malformed: %v", err)
		}
		if bc.IsCA {
			return refuse("CSR asks for CA=true")
		}
	}
	return nil
}

func keyDescription(pub any) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	case nil:
		return "no key"
	default:
		return fmt.Sprintf("%T", pub)
	}
}
