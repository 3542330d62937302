// Package catest gives tests a real Strait CA in a temporary directory: a
// mesh root, a cluster intermediate and an issuer, as SPIRE's testca does.
// It is for tests only.
package catest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/identity"
)

// CA is a test mesh root with one cluster intermediate, and others made
// as SVIDs of other clusters' identities are minted.
type CA struct {
	Authority *ca.Authority
	Issuer    *ca.Issuer
	Cluster   string

	mu      sync.Mutex
	issuers map[string]*ca.Issuer // other clusters'
}

// Options tunes New.
type Options struct {
	Cluster string           // default "east"
	Clock   func() time.Time // default time.Now
}

// New creates a CA for td in t.TempDir(); it is closed when the test ends.
func New(t testing.TB, td string, opts ...Options) *CA {
	t.Helper()
	var o Options
	if len(opts) > 0 {
		o = opts[0]
	}
	if o.Cluster == "" {
		o.Cluster = "east"
	}
	ctx := context.Background()
	a, err := ca.Init(ctx, ca.Config{Dir: t.TempDir(), Clock: o.Clock}, ca.InitOptions{TrustDomain: spiffeid.RequireTrustDomainFromString(td)})
	if err != nil {
		t.Fatalf("catest: init CA: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	if _, err := a.CreateIntermediate(ctx, o.Cluster, 0, false); err != nil {
		t.Fatalf("catest: create intermediate: %v", err)
	}
	iss, err := a.Issuer(o.Cluster)
	if err != nil {
		t.Fatalf("catest: issuer: %v", err)
	}
	return &CA{Authority: a, Issuer: iss, Cluster: o.Cluster}
}

// Bundle returns the CA's current trust bundle.
func (c *CA) Bundle() *bundle.Bundle { return c.Authority.Bundle() }

// SVID mints an SVID for id (a SPIFFE ID string) valid for ttl (0:
// default). An identity scoped to another cluster (its control plane,
// gateway or admin) is minted by that cluster's intermediate, made on
// first use, as verification requires.
func (c *CA) SVID(t testing.TB, id string, ttl time.Duration) *x509svid.SVID {
	t.Helper()
	sid := spiffeid.RequireFromString(id)
	s, err := c.IssuerFor(t, identity.Classify(sid).Cluster).MintSVID(sid, ttl)
	if err != nil {
		t.Fatalf("catest: mint %s: %v", id, err)
	}
	return s
}

// IssuerFor returns the issuer of cluster's intermediate, making the
// intermediate on first use; "" or the CA's own cluster is Issuer.
func (c *CA) IssuerFor(t testing.TB, cluster string) *ca.Issuer {
	t.Helper()
	if cluster == "" || cluster == c.Cluster {
		return c.Issuer
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if iss := c.issuers[cluster]; iss != nil {
		return iss
	}
	if _, err := c.Authority.CreateIntermediate(context.Background(), cluster, 0, false); err != nil {
		t.Fatalf("catest: create intermediate for %s: %v", cluster, err)
	}
	iss, err := c.Authority.Issuer(cluster)
	if err != nil {
		t.Fatalf("catest: issuer for %s: %v", cluster, err)
	}
	if c.issuers == nil {
		c.issuers = map[string]*ca.Issuer{}
	}
	c.issuers[cluster] = iss
	return iss
}

// CSR returns a fresh P-256 key and a DER CSR for it naming uris (none if
// empty), for tests of the CSR path.
func CSR(t testing.TB, template *x509.CertificateRequest) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if template == nil {
		template = &x509.CertificateRequest{}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, template, key)
	if err != nil {
		t.Fatalf("catest: create CSR: %v", err)
	}
	return key, der
}
