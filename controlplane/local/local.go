// Package local is the data directory of a control plane in local mode: the
// cluster's intermediate (its key generated here and never sent), the trust
// bundle, the admin credentials and the path of the state store. Every file
// is written atomically, so a crash leaves the old or the new version.
//
// It does not import the CA: the root authority is reached through the
// small RootAuthority interface, which cmd/ satisfies with the ca package
// (and, for joined clusters, the federation channel will).
package local

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/internal/atomicfile"
	"github.com/straitmesh/strait/internal/svidfile"
)

// RootAuthority signs cluster intermediates and publishes the trust bundle.
type RootAuthority interface {
	SignIntermediate(ctx context.Context, cluster string, csr []byte, ttl time.Duration) (*x509.Certificate, error)
	Bundle() *bundle.Bundle
}

// Minter issues SVIDs with a key generated on the spot.
type Minter interface {
	MintSVID(id spiffeid.ID, ttl time.Duration) (*x509svid.SVID, error)
}

// Files in a control-plane data directory.
const (
	fileCluster      = "cluster.json"
	fileIntermediate = "intermediate.pem"
	fileKey          = "intermediate-key.pem"
	fileBundle       = "bundle.json"
	fileBundlePEM    = "bundle.pem"
	fileStore        = "state.db"
	dirAdmin         = "admin"
)

// ErrNotInitialized is returned by Load for a directory without a cluster.
var ErrNotInitialized = errors.New("local: not a control-plane data directory (run `strait controlplane init`)")

type clusterFile struct {
	Cluster     string    `json:"cluster"`
	TrustDomain string    `json:"trust_domain"`
	Created     time.Time `json:"created"`
	// Pending: no intermediate yet (see InitPending).
	Pending bool `json:"pending,omitempty"`
}

// Dir is a loaded control-plane data directory.
type Dir struct {
	Path        string
	Cluster     string
	TrustDomain spiffeid.TrustDomain
	// Chain is the intermediate first, up to (not including) the root.
	Chain  []*x509.Certificate
	Signer crypto.Signer
	Bundle *bundle.Bundle
}

// StorePath is where the control plane's state store lives.
func (d *Dir) StorePath() string { return filepath.Join(d.Path, fileStore) }

// BundlePath is the trust bundle (JWKS, with its sequence).
func (d *Dir) BundlePath() string { return filepath.Join(d.Path, fileBundle) }

// BundlePEMPath is the PEM copy of the trust bundle (for sidecars' first contact).
func (d *Dir) BundlePEMPath() string { return filepath.Join(d.Path, fileBundlePEM) }

// AdminPaths are the admin SVID's certificate and key files.
func (d *Dir) AdminPaths() (cert, key string) {
	return filepath.Join(d.Path, dirAdmin, "svid.pem"), filepath.Join(d.Path, dirAdmin, "svid-key.pem")
}

// Init creates a data directory for cluster: a new key, its intermediate
// signed by root, and the bundle. An initialized directory is refused
// unless force, which replaces the intermediate.
func Init(ctx context.Context, path, cluster string, root RootAuthority, ttl time.Duration, force bool) (*Dir, error) {
	if err := identity.ValidateClusterName(cluster); err != nil {
		return nil, fmt.Errorf("local: %w", err)
	}
	if _, err := os.Stat(filepath.Join(path, fileCluster)); err == nil && !force {
		return nil, fmt.Errorf("local: %s already holds a control plane (pass --force to re-issue its intermediate)", path)
	}
	if err := os.MkdirAll(filepath.Join(path, dirAdmin), 0o700); err != nil {
		return nil, fmt.Errorf("local: %w", err)
	}
	b := root.Bundle()
	if b == nil {
		return nil, errors.New("local: the root authority has no trust bundle")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, err
	}
	cert, err := root.SignIntermediate(ctx, cluster, csr, ttl)
	if err != nil {
		return nil, fmt.Errorf("local: sign intermediate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	// A crash between the key and the certificate (init --force replacing
	// them) leaves the pair Load takes from the .next copy.
	if err := svidfile.WritePair(filepath.Join(path, fileIntermediate), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}),
		filepath.Join(path, fileKey), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})); err != nil {
		return nil, err
	}
	if err := WriteBundle(path, b); err != nil {
		return nil, err
	}
	cf, _ := json.MarshalIndent(clusterFile{Cluster: cluster, TrustDomain: b.TrustDomain().Name(), Created: time.Now().UTC()}, "", "  ")
	if err := atomicfile.WriteFile(filepath.Join(path, fileCluster), append(cf, '\n'), 0o644); err != nil {
		return nil, err
	}
	return Load(path)
}

// WriteBundle stores b (JWKS, with its sequence, and PEM).
func WriteBundle(path string, b *bundle.Bundle) error {
	js, err := b.MarshalJWKS()
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(filepath.Join(path, fileBundle), js, 0o644); err != nil {
		return err
	}
	return atomicfile.WriteFile(filepath.Join(path, fileBundlePEM), b.MarshalPEM(), 0o644)
}

// Load reads a data directory written by Init.
func Load(path string) (*Dir, error) {
	cf, err := readClusterFile(path)
	if err != nil {
		return nil, err
	}
	if cf.Pending {
		return nil, fmt.Errorf("%w: %s", ErrPending, path)
	}
	td, err := identity.ParseTrustDomain(cf.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("local: %s: %w", fileCluster, err)
	}
	d := &Dir{Path: path, Cluster: cf.Cluster, TrustDomain: td}
	signer, err := readKey(filepath.Join(path, fileKey))
	if err != nil {
		return nil, err
	}
	if d.Chain, err = readChain(filepath.Join(path, fileIntermediate)); err != nil {
		return nil, err
	}
	if !ownsKey(d.Chain[0], signer) {
		// Init was cut short between the key and the certificate: the
		// new certificate waits beside; put it in place.
		next := filepath.Join(path, fileIntermediate) + svidfile.NextSuffix
		chain, nerr := readChain(next)
		if nerr != nil || !ownsKey(chain[0], signer) {
			return nil, fmt.Errorf("local: %s does not belong to the certificate in %s", fileKey, fileIntermediate)
		}
		if err := os.Rename(next, filepath.Join(path, fileIntermediate)); err != nil {
			return nil, fmt.Errorf("local: %w", err)
		}
		d.Chain = chain
	}
	d.Signer = signer
	if d.Bundle, err = d.ReadBundle(); err != nil {
		return nil, err
	}
	return d, nil
}

// readChain reads a PEM file of certificates, at least one.
func readChain(path string) ([]*x509.Certificate, error) {
	certPEM, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("local: %w", err)
	}
	var chain []*x509.Certificate
	for rest := certPEM; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("local: %s: %w", filepath.Base(path), err)
		}
		chain = append(chain, c)
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("local: %s holds no certificate", filepath.Base(path))
	}
	return chain, nil
}

func ownsKey(c *x509.Certificate, signer crypto.Signer) bool {
	pub, ok := c.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	return ok && pub.Equal(signer.Public())
}

// ReadBundle reads the trust bundle file again (it changes when the root
// authority rotates roots).
func (d *Dir) ReadBundle() (*bundle.Bundle, error) {
	bj, err := os.ReadFile(d.BundlePath())
	if err != nil {
		return nil, fmt.Errorf("local: %w", err)
	}
	b, err := bundle.ParseJWKS(d.TrustDomain, bj)
	if err != nil {
		return nil, fmt.Errorf("local: %s: %w", fileBundle, err)
	}
	// WriteBundle writes the JWKS, then the PEM copy sidecars read on
	// first contact: a crash between the two left the copy behind.
	if pemBytes, err := os.ReadFile(d.BundlePEMPath()); err != nil || !bytes.Equal(pemBytes, b.MarshalPEM()) {
		if err := atomicfile.WriteFile(d.BundlePEMPath(), b.MarshalPEM(), 0o644); err != nil {
			return nil, fmt.Errorf("local: repair %s: %w", fileBundlePEM, err)
		}
	}
	return b, nil
}

// MintAdmin issues the cluster's admin SVID with m and writes it to the
// admin directory; the CLI presents it to the admin API.
func (d *Dir) MintAdmin(m Minter, ttl time.Duration) (*x509svid.SVID, error) {
	id, err := identity.Admin(d.TrustDomain, d.Cluster)
	if err != nil {
		return nil, err
	}
	cert, key := d.AdminPaths()
	return mintTo(m, id, ttl, cert, key)
}

// MintGateway issues an SVID for this cluster's gateway with m and writes
// it, with the bundle, to dir: the gateway's first credentials, which it
// then renews from the control plane.
func (d *Dir) MintGateway(m Minter, ttl time.Duration, dir string) (*x509svid.SVID, error) {
	id, err := identity.Gateway(d.TrustDomain, d.Cluster)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("local: %w", err)
	}
	s, err := mintTo(m, id, ttl, filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid-key.pem"))
	if err != nil {
		return nil, err
	}
	return s, atomicfile.WriteFile(filepath.Join(dir, "bundle.pem"), d.Bundle.MarshalPEM(), 0o644)
}

func mintTo(m Minter, id spiffeid.ID, ttl time.Duration, certPath, keyPath string) (*x509svid.SVID, error) {
	s, err := m.MintSVID(id, ttl)
	if err != nil {
		return nil, fmt.Errorf("local: mint SVID for %s: %w", id, err)
	}
	if err := svidfile.Save(s, certPath, keyPath); err != nil {
		return nil, err
	}
	return s, nil
}

// fileBundleJWS is the trust bundle as the root authority signed it.
const fileBundleJWS = "bundle.jws"

// WriteSignedBundle stores the signed form of the bundle (a JWS) before
// the bundle itself is written with WriteBundle.
func (d *Dir) WriteSignedBundle(jws string) error {
	return atomicfile.WriteFile(filepath.Join(d.Path, fileBundleJWS), []byte(jws), 0o644)
}

// ReadSignedBundle returns the stored signed bundle, or "" if there is none.
func (d *Dir) ReadSignedBundle() (string, error) {
	b, err := os.ReadFile(filepath.Join(d.Path, fileBundleJWS))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("local: %w", err)
	}
	return string(b), nil
}

// InstallIntermediate replaces the intermediate certificate with cert, a
// re-signing of the same key (a root rotation): the key stays, and cert
// must be for it. It updates d.Chain.
func (d *Dir) InstallIntermediate(cert *x509.Certificate) error {
	if pub, ok := cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(d.Signer.Public()) {
		return errors.New("local: the certificate is not for this cluster's intermediate key")
	}
	if !cert.IsCA {
		return errors.New("local: the certificate is not a CA certificate")
	}
	if err := atomicfile.WriteFile(filepath.Join(d.Path, fileIntermediate), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o644); err != nil {
		return err
	}
	d.Chain = []*x509.Certificate{cert}
	return nil
}
