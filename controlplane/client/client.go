// Package client is what sidecars and gateways share to talk to their
// cluster's control plane: a gRPC connection over mTLS that checks it
// reached a control plane under current trust, SVID issuance and renewal
// at half life (with the SVID kept on disk across restarts), the wire
// bundle's conversion, and a jittered backoff.
//
// It stays lean (no CA, no QUIC, no Kubernetes client): the sidecar links it.
package client

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/internal/atomicfile"
	"github.com/straitmesh/strait/internal/clock"
)

// Credentials hold the current SVID and bundle (proxy.Credentials).
type Credentials interface {
	TrustDomain() spiffeid.TrustDomain
	Verifier() *svid.Verifier
	ClientTLS(nextProtos []string, verify func(tls.ConnectionState) error) *tls.Config
	SetSVID(*x509svid.SVID) error
	SetBundle(*bundle.Bundle) (bool, error)
	SVID() *x509svid.SVID
}

// Identity obtains and renews an SVID from the control plane.
type Identity struct {
	// ControlPlane is host:port. Required.
	ControlPlane string
	Creds        Credentials
	// DataDir keeps svid.pem and svid-key.pem across restarts; empty keeps
	// nothing.
	DataDir string
	Log     *slog.Logger
	// Clock is time.Now if nil.
	Clock func() time.Time
	// Issued, if set, is called with every new SVID.
	Issued func(*x509svid.SVID)

	conn atomic.Pointer[grpc.ClientConn]
}

func (c *Identity) clock() time.Time {
	if c.Clock == nil {
		return time.Now()
	}
	return c.Clock()
}

func (c *Identity) log() *slog.Logger {
	if c.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return c.Log
}

// verifier accepts only a control plane, under current trust.
func (c *Identity) verifier() func(tls.ConnectionState) error {
	return c.Creds.Verifier().VerifyConnection(svid.RoleServer, func(id spiffeid.ID) error {
		if k := identity.Classify(id).Kind; k != identity.KindControlPlane {
			return fmt.Errorf("%s is a %s, not a control plane", id, k)
		}
		return nil
	})
}

// Dial opens a connection to the control plane, presenting the current
// SVID if withCert.
func (c *Identity) Dial(withCert bool) (*grpc.ClientConn, error) {
	tc := c.Creds.ClientTLS(nil, c.verifier())
	if !withCert {
		tc.GetClientCertificate = nil
	}
	// Reconnect within seconds when the control plane comes back, not on
	// grpc's default schedule (up to two minutes).
	return grpc.NewClient(c.ControlPlane, grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
			MinConnectTimeout: 5 * time.Second,
		}))
}

// Conn is the mTLS connection made by Start and moved to each renewed SVID.
func (c *Identity) Conn() *grpc.ClientConn { return c.conn.Load() }

// Paths are where the SVID is kept.
func (c *Identity) Paths() (cert, key string) {
	return filepath.Join(c.DataDir, "svid.pem"), filepath.Join(c.DataDir, "svid-key.pem")
}

// LoadSaved restores a saved SVID that still verifies.
func (c *Identity) LoadSaved() bool {
	if c.DataDir == "" {
		return false
	}
	cp, kp := c.Paths()
	s, err := x509svid.Load(cp, kp)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			c.log().Warn("ignoring saved SVID", "err", err)
		}
		return false
	}
	if _, _, err := c.Creds.Verifier().Verify(s.Certificates, svid.RoleAny); err != nil {
		c.log().Info("saved SVID no longer usable", "err", err)
		return false
	}
	return c.Creds.SetSVID(s) == nil
}

func (c *Identity) save(s *x509svid.SVID) error {
	if c.DataDir == "" {
		return nil
	}
	certPEM, keyPEM, err := s.Marshal()
	if err != nil {
		return err
	}
	cp, kp := c.Paths()
	if err := atomicfile.WriteFile(kp, keyPEM, 0o600); err != nil {
		return err
	}
	return atomicfile.WriteFile(cp, certPEM, 0o644)
}

// Certify obtains a new SVID on conn: with the registration token when
// token is set, otherwise over mTLS with the current SVID.
func (c *Identity) Certify(ctx context.Context, conn *grpc.ClientConn, token string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return err
	}
	req := &controlplanev1.CertifyRequest{Csr: csr}
	if token != "" {
		req.Credential = &controlplanev1.Credential{Kind: &controlplanev1.Credential_RegistrationToken{RegistrationToken: token}}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := controlplanev1.NewIdentityServiceClient(conn).Certify(ctx, req)
	if err != nil {
		return fmt.Errorf("certify: %w", err)
	}
	b, err := BundleFromProto(c.Creds.TrustDomain(), resp.GetBundle())
	if err != nil {
		return err
	}
	if _, err := c.Creds.SetBundle(b); err != nil {
		return err
	}
	chain := make([]*x509.Certificate, 0, len(resp.GetCertificateChain()))
	for i, der := range resp.GetCertificateChain() {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return fmt.Errorf("certify: certificate %d: %w", i, err)
		}
		chain = append(chain, cert)
	}
	id, _, err := c.Creds.Verifier().Verify(chain, svid.RoleAny)
	if err != nil {
		return fmt.Errorf("certify: the control plane returned an SVID that does not verify: %w", err)
	}
	if id.String() != resp.GetSpiffeId() {
		return fmt.Errorf("certify: SVID names %s, response says %s", id, resp.GetSpiffeId())
	}
	if pub, ok := chain[0].PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(&key.PublicKey) {
		return errors.New("certify: SVID is not for the key we sent")
	}
	s := &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
	if err := c.Creds.SetSVID(s); err != nil {
		return err
	}
	if c.Issued != nil {
		c.Issued(s)
	}
	if err := c.save(s); err != nil {
		c.log().Warn("could not save SVID", "err", err)
	}
	c.log().Info("SVID issued", "spiffe_id", id.String(), "expires", chain[0].NotAfter.UTC().Format(time.RFC3339))
	return nil
}

// Connect makes the mTLS connection with the current SVID.
func (c *Identity) Connect() error {
	conn, err := c.Dial(true)
	if err != nil {
		return err
	}
	if old := c.conn.Swap(conn); old != nil {
		old.Close()
	}
	return nil
}

// RenewLoop renews the SVID at half its life until ctx ends; on failure it
// retries with backoff (past expiry too). Each renewal moves Conn to a
// connection presenting the new SVID.
func (c *Identity) RenewLoop(ctx context.Context) error {
	backoff := NewBackoff(time.Second, 30*time.Second)
	for {
		leaf := c.Creds.SVID().Certificates[0]
		if !clock.SleepUntil(ctx, c.clock, svid.RenewAt(leaf, c.clock())) {
			return nil
		}
		for {
			err := c.Certify(ctx, c.conn.Load(), "")
			if err == nil {
				break
			}
			c.log().Warn("SVID renewal failed; retrying", "err", err, "expires", leaf.NotAfter)
			if !backoff.Wait(ctx) {
				return nil
			}
		}
		backoff.Reset()
		if err := c.Connect(); err != nil {
			c.log().Warn("reconnecting with the renewed SVID failed", "err", err)
		}
	}
}

// Close closes the connection.
func (c *Identity) Close() {
	if conn := c.conn.Swap(nil); conn != nil {
		conn.Close()
	}
}

// BundleFromProto converts a wire bundle, checking it is for td.
func BundleFromProto(td spiffeid.TrustDomain, tb *controlplanev1.TrustBundle) (*bundle.Bundle, error) {
	if tb == nil {
		return nil, errors.New("no trust bundle in response")
	}
	if tb.GetTrustDomain() != td.Name() {
		return nil, fmt.Errorf("bundle for trust domain %q, want %q", tb.GetTrustDomain(), td.Name())
	}
	roots := make([]*x509.Certificate, 0, len(tb.GetRoots()))
	for i, der := range tb.GetRoots() {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("bundle root %d: %w", i, err)
		}
		roots = append(roots, cert)
	}
	b, err := bundle.New(td, tb.GetSequence(), roots)
	if err != nil {
		return nil, err
	}
	if tb.GetDigest() != "" && tb.GetDigest() != b.Digest() {
		return nil, fmt.Errorf("bundle digest %s does not match its roots (%s)", tb.GetDigest(), b.Digest())
	}
	return b, nil
}

// Backoff is a capped exponential backoff with jitter.
type Backoff struct {
	min, max, cur time.Duration
}

// NewBackoff starts at min and doubles up to max.
func NewBackoff(min, max time.Duration) *Backoff { return &Backoff{min: min, max: max, cur: min} }

// Reset goes back to the minimum.
func (b *Backoff) Reset() { b.cur = b.min }

// Wait sleeps for the next delay; false if ctx ended first.
func (b *Backoff) Wait(ctx context.Context) bool {
	d := b.cur/2 + time.Duration(mrand.Int64N(int64(b.cur/2)+1))
	b.cur = min(b.cur*2, b.max)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
