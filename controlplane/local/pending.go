package local

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/internal/atomicfile"
	"github.com/straitmesh/strait/internal/svidfile"
)

// A pending cluster was installed without an intermediate: it waits to
// receive one from the root authority through a federation join. Until
// then its control plane serves only what a join needs, to an admin
// authenticated by a bootstrap CA that lives in the data directory and
// nowhere else (it is no part of the mesh and is deleted by Complete).
//
// The intermediate key is generated at InitPending and never leaves the
// directory: the join sends a CSR.

// ErrPending is returned by Load for a cluster still waiting for its
// intermediate.
var ErrPending = errors.New("local: the cluster is waiting for its intermediate (join a mesh with `strait federation join TOKEN`)")

const (
	dirBootstrap     = "bootstrap"
	fileBootstrapCA  = "bootstrap/ca.pem"
	fileBootstrapKey = "bootstrap/ca-key.pem"
	bootstrapTTL     = 30 * 24 * time.Hour
)

// Pending is a loaded pending data directory.
type Pending struct {
	Path        string
	Cluster     string
	TrustDomain spiffeid.TrustDomain
	// Key is the intermediate's key, for the CSR.
	Key crypto.Signer
	// CA is the bootstrap CA: it issues the control plane's serving
	// certificate and the admin certificate until the join completes.
	CA    *x509.Certificate
	caKey crypto.Signer
}

// InitPending creates a data directory for cluster in trust domain td with
// an intermediate key but no intermediate, and writes bootstrap admin
// credentials where the admin SVID will later be (AdminPaths) and the
// bootstrap CA where the bundle PEM will be (BundlePEMPath), so a CLI
// context made now keeps working after the join.
func InitPending(path, cluster string, td spiffeid.TrustDomain, force bool) (*Pending, error) {
	if err := identity.ValidateClusterName(cluster); err != nil {
		return nil, fmt.Errorf("local: %w", err)
	}
	if _, err := os.Stat(filepath.Join(path, fileCluster)); err == nil && !force {
		return nil, fmt.Errorf("local: %s already holds a control plane (pass --force to start it over)", path)
	}
	for _, d := range []string{dirAdmin, dirBootstrap} {
		if err := os.MkdirAll(filepath.Join(path, d), 0o700); err != nil {
			return nil, fmt.Errorf("local: %w", err)
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	if err := writeKey(filepath.Join(path, fileKey), key); err != nil {
		return nil, err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		// Named as a cluster intermediate is (svid.IntermediateCluster):
		// it stands in for the pending cluster's own.
		Subject:               pkix.Name{Organization: []string{"Strait"}, OrganizationalUnit: []string{cluster}, CommonName: "strait bootstrap CA for pending cluster " + cluster},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(bootstrapTTL),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, caKey.Public(), caKey)
	if err != nil {
		return nil, err
	}
	if err := writeKey(filepath.Join(path, fileBootstrapKey), caKey); err != nil {
		return nil, err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := atomicfile.WriteFile(filepath.Join(path, fileBootstrapCA), caPEM, 0o644); err != nil {
		return nil, err
	}
	if err := atomicfile.WriteFile(filepath.Join(path, fileBundlePEM), caPEM, 0o644); err != nil {
		return nil, err
	}
	cf, _ := json.MarshalIndent(clusterFile{Cluster: cluster, TrustDomain: td.Name(), Created: now.UTC(), Pending: true}, "", "  ")
	if err := atomicfile.WriteFile(filepath.Join(path, fileCluster), append(cf, '\n'), 0o644); err != nil {
		return nil, err
	}
	p, err := LoadPending(path)
	if err != nil {
		return nil, err
	}
	adminID, err := identity.Admin(td, cluster)
	if err != nil {
		return nil, err
	}
	cert, akey, err := p.Issue(adminID, bootstrapTTL)
	if err != nil {
		return nil, err
	}
	cp, kp := (&Dir{Path: path}).AdminPaths()
	if err := writeKey(kp, akey); err != nil {
		return nil, err
	}
	return p, atomicfile.WriteFile(cp, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o644)
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

func writeKey(path string, key crypto.Signer) error { return svidfile.WriteKey(path, key) }

func readKey(path string) (crypto.Signer, error) {
	s, err := svidfile.ReadKey(path)
	if err != nil {
		return nil, fmt.Errorf("local: %w", err)
	}
	return s, nil
}

// LoadPending reads a pending data directory.
func LoadPending(path string) (*Pending, error) {
	cf, err := readClusterFile(path)
	if err != nil {
		return nil, err
	}
	if !cf.Pending {
		return nil, fmt.Errorf("local: %s is not pending: it has its intermediate", path)
	}
	td, err := identity.ParseTrustDomain(cf.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("local: %s: %w", fileCluster, err)
	}
	p := &Pending{Path: path, Cluster: cf.Cluster, TrustDomain: td}
	if p.Key, err = readKey(filepath.Join(path, fileKey)); err != nil {
		return nil, err
	}
	if p.caKey, err = readKey(filepath.Join(path, fileBootstrapKey)); err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(filepath.Join(path, fileBootstrapCA))
	if err != nil {
		return nil, fmt.Errorf("local: %w", err)
	}
	blk, _ := pem.Decode(raw)
	if blk == nil {
		return nil, fmt.Errorf("local: %s holds no certificate", fileBootstrapCA)
	}
	if p.CA, err = x509.ParseCertificate(blk.Bytes); err != nil {
		return nil, fmt.Errorf("local: %s: %w", fileBootstrapCA, err)
	}
	return p, nil
}

// Issue makes a certificate for id under the bootstrap CA, with a new key.
func (p *Pending) Issue(id spiffeid.ID, ttl time.Duration) (*x509.Certificate, crypto.Signer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	u, err := url.Parse(id.String())
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     minTime(now.Add(ttl), p.CA.NotAfter),
		URIs:         []*url.URL{u},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.CA, key.Public(), p.caKey)
	if err != nil {
		return nil, nil, err
	}
	c, err := x509.ParseCertificate(der)
	return c, key, err
}

// ServingCertificate is the control plane's TLS certificate while pending.
func (p *Pending) ServingCertificate() (*tls.Certificate, error) {
	id, err := identity.ControlPlane(p.TrustDomain, p.Cluster)
	if err != nil {
		return nil, err
	}
	c, key, err := p.Issue(id, 24*time.Hour)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{c.Raw, p.CA.Raw}, PrivateKey: key, Leaf: c}, nil
}

// CSR is the request for this cluster's intermediate.
func (p *Pending) CSR() ([]byte, error) {
	return x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: p.Cluster}}, p.Key)
}

// Complete installs the intermediate chain (intermediate first) and the
// mesh's trust bundle received through a join, and ends the pending
// state. The chain must be for this directory's key and chain to b.
func (p *Pending) Complete(chain []*x509.Certificate, b *bundle.Bundle) (*Dir, error) {
	if len(chain) == 0 {
		return nil, errors.New("local: no intermediate received")
	}
	if pub, ok := chain[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(p.Key.Public()) {
		return nil, errors.New("local: the intermediate received is not for this cluster's key")
	}
	if b == nil || b.TrustDomain() != p.TrustDomain {
		return nil, fmt.Errorf("local: the trust bundle received is not for %s", p.TrustDomain)
	}
	roots := x509.NewCertPool()
	for _, r := range b.Roots() {
		roots.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("local: the intermediate received does not chain to the trust bundle: %w", err)
	}
	var out []byte
	for _, c := range chain {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	if err := atomicfile.WriteFile(filepath.Join(p.Path, fileIntermediate), out, 0o644); err != nil {
		return nil, err
	}
	if err := WriteBundle(p.Path, b); err != nil {
		return nil, err
	}
	cf, err := readClusterFile(p.Path)
	if err != nil {
		return nil, err
	}
	cf.Pending = false
	raw, _ := json.MarshalIndent(cf, "", "  ")
	// The cluster file last: until it says so, the directory is pending
	// and a crash before here leaves a join that can be retried.
	if err := atomicfile.WriteFile(filepath.Join(p.Path, fileCluster), append(raw, '\n'), 0o644); err != nil {
		return nil, err
	}
	_ = os.RemoveAll(filepath.Join(p.Path, dirBootstrap))
	return Load(p.Path)
}

// Resume finishes a Complete that a crash cut short: the intermediate for
// this directory's key and the bundle received are on disk, but the
// cluster file still says pending (the issuer has spent the token and
// stored its link: the join cannot be made again). It returns nil and no
// error when there is nothing to finish (no intermediate for this key, or
// the crash came before the bundle was written).
func (p *Pending) Resume() (*Dir, error) {
	chain, err := readChain(filepath.Join(p.Path, fileIntermediate))
	if err != nil || !ownsKey(chain[0], p.Key) {
		return nil, nil
	}
	raw, err := os.ReadFile(filepath.Join(p.Path, fileBundle))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("local: %w", err)
	}
	b, err := bundle.ParseJWKS(p.TrustDomain, raw)
	if err != nil {
		return nil, fmt.Errorf("local: %s: %w", fileBundle, err)
	}
	return p.Complete(chain, b)
}

func readClusterFile(path string) (clusterFile, error) {
	var cf clusterFile
	raw, err := os.ReadFile(filepath.Join(path, fileCluster))
	if errors.Is(err, os.ErrNotExist) {
		return cf, fmt.Errorf("%w: %s", ErrNotInitialized, path)
	}
	if err != nil {
		return cf, fmt.Errorf("local: %w", err)
	}
	if err := json.Unmarshal(raw, &cf); err != nil {
		return cf, fmt.Errorf("local: %s: %w", fileCluster, err)
	}
	if err := identity.ValidateClusterName(cf.Cluster); err != nil {
		return cf, fmt.Errorf("local: %s: %w", fileCluster, err)
	}
	return cf, nil
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
