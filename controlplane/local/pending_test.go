package local

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/straitmesh/strait/ca/identity"
)

func TestPendingJoinCompletes(t *testing.T) {
	a := newCA(t)
	td := a.Bundle().TrustDomain()
	path := filepath.Join(t.TempDir(), "west")
	p, err := InitPending(path, "west", td, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); !errors.Is(err, ErrPending) {
		t.Fatalf("Load of a pending dir: %v, want ErrPending", err)
	}
	if _, err := InitPending(path, "west", td, false); err == nil {
		t.Fatal("InitPending over an existing dir succeeded")
	}
	// The bootstrap admin credentials sit where the admin SVID will be,
	// and chain to the bootstrap CA written as the bundle PEM.
	cp, _ := (&Dir{Path: path}).AdminPaths()
	certPEM, err := os.ReadFile(cp)
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(path, fileBundlePEM))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	admin := parsePEMCert(t, certPEM)
	if _, err := admin.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("bootstrap admin does not verify: %v", err)
	}
	if want, _ := identity.Admin(td, "west"); admin.URIs[0].String() != want.String() {
		t.Fatalf("bootstrap admin ID %s", admin.URIs[0])
	}
	if _, err := p.ServingCertificate(); err != nil {
		t.Fatal(err)
	}

	// A chain for another key is refused and leaves the dir pending.
	other := initDir(t, a)
	if _, err := p.Complete(other.Chain, a.Bundle()); err == nil {
		t.Fatal("Complete with another cluster's intermediate succeeded")
	}
	if _, err := LoadPending(path); err != nil {
		t.Fatalf("still pending after a refused Complete: %v", err)
	}

	csr, err := p.CSR()
	if err != nil {
		t.Fatal(err)
	}
	cert, err := rootAuthority{a}.SignIntermediate(t.Context(), "west", csr, 0)
	if err != nil {
		t.Fatal(err)
	}
	d, err := p.Complete([]*x509.Certificate{cert}, a.Bundle())
	if err != nil {
		t.Fatal(err)
	}
	if d.Cluster != "west" || d.Bundle.Digest() != a.Bundle().Digest() {
		t.Fatalf("completed dir: %+v", d)
	}
	if _, err := os.Stat(filepath.Join(path, dirBootstrap)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("bootstrap dir left behind: %v", err)
	}
	if _, err := Load(path); err != nil {
		t.Fatalf("Load after Complete: %v", err)
	}
}

func parsePEMCert(t *testing.T, b []byte) *x509.Certificate {
	t.Helper()
	certs, err := parseCertsPEM(b)
	if err != nil || len(certs) == 0 {
		t.Fatalf("parse PEM: %v", err)
	}
	return certs[0]
}

func parseCertsPEM(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return out, nil
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
}
