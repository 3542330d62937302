// Package svidfile keeps an X.509-SVID on disk as two PEM files, a
// certificate chain and its private key, replaced so that a crash at any
// point leaves a matching pair to load.
//
// Save writes the new chain beside the old one as CERT.next, then replaces
// the key, then the chain, then removes CERT.next; each write is atomic.
// Load reads CERT with KEY and, if they do not match, CERT.next with KEY:
// the pair a crash between the key and the chain leaves.
package svidfile

import (
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/straitmesh/strait/internal/atomicfile"
)

// NextSuffix names the chain Save writes before it replaces the key.
const NextSuffix = ".next"

// Save replaces the SVID kept at certPath and keyPath with s.
func Save(s *x509svid.SVID, certPath, keyPath string) error {
	certPEM, keyPEM, err := s.Marshal()
	if err != nil {
		return err
	}
	return WritePair(certPath, certPEM, keyPath, keyPEM)
}

// WritePair replaces a certificate (chain) file and its key file, PEM
// both, in Save's order: any key and certificate pair, an SVID's or an
// intermediate's.
func WritePair(certPath string, certPEM []byte, keyPath string, keyPEM []byte) error {
	if err := atomicfile.WriteFile(certPath+NextSuffix, certPEM, 0o644); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(keyPath, keyPEM, 0o600); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(certPath, certPEM, 0o644); err != nil {
		return err
	}
	return os.Remove(certPath + NextSuffix)
}

// Load reads the SVID kept at certPath and keyPath. An error wraps
// os.ErrNotExist when there is none.
func Load(certPath, keyPath string) (*x509svid.SVID, error) {
	s, err := x509svid.Load(certPath, keyPath)
	if err == nil {
		return s, nil
	}
	// Save was cut short between the key and the chain (the first Save
	// leaves no chain at all then): the new key is in place and its chain
	// waits beside.
	if next, nerr := x509svid.Load(certPath+NextSuffix, keyPath); nerr == nil {
		return next, nil
	}
	return nil, err
}

// WriteKey replaces the private key file at path (PKCS#8 PEM, mode 0600)
// atomically.
func WriteKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}

// ReadKey reads a private key file WriteKey wrote. An error wraps
// os.ErrNotExist when there is none.
func ReadKey(path string) (crypto.Signer, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(raw)
	if blk == nil {
		return nil, fmt.Errorf("%s holds no PEM key", filepath.Base(path))
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Base(path), err)
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%s is not a signing key", filepath.Base(path))
	}
	return s, nil
}
