// Package client is what sidecars and gateways share to talk to their
// cluster's control plane: a gRPC connection over mTLS that checks it
// reached a control plane under current trust, SVID issuance and renewal
// at half life or early when the control plane asks for a reissue (with the
// SVID kept on disk across restarts), the wire bundle's conversion, and a
// jittered backoff.
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
	"io/fs"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"sync"
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
	iclock "github.com/straitmesh/strait/internal/clock"
	"github.com/straitmesh/strait/internal/svidfile"
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
	// Jitter, if set, picks when an early renewal asked for by Reissue
	// happens: an offset into the window it is given (> 0), clamped to
	// [0, window). Nil means uniformly at random.
	Jitter func(window time.Duration) time.Duration

	conn atomic.Pointer[grpc.ClientConn]

	mu sync.Mutex
	// hint is the last Reissue issuer seen; pending, when not zero, is when
	// an early renewal is due, asked for by hint number gen.
	hint    string
	pending time.Time
	gen     uint64
	wake    chan struct{} // RenewLoop re-reads pending
	// moved is closed when Connect replaces the connection; retiring are
	// replaced connections still open for their streams to move.
	moved    chan struct{}
	retiring map[*grpc.ClientConn]*time.Timer
	// tokenKey is the key registration tokens are redeemed for (see
	// redemptionKey).
	tokenKey *ecdsa.PrivateKey
}

// connGrace is how long a connection replaced by Connect stays open: the
// streams on it move to the new one (Follow) and calls in flight end.
const connGrace = 30 * time.Second

// minRenewRetry is the shortest wait between renewal attempts.
const minRenewRetry = 100 * time.Millisecond

// MaxReissueWindow caps the window a reissue hint may spread renewals over.
const MaxReissueWindow = 10 * time.Minute

// maxIssuerLen bounds a reissue hint's issuer ("sha256:" and 64 hex digits
// today).
const maxIssuerLen = 256

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

// Conn is the mTLS connection made by Connect and moved to each renewed
// SVID.
func (c *Identity) Conn() *grpc.ClientConn { return c.conn.Load() }

// ConnChanged returns a channel closed when Connect next replaces Conn.
func (c *Identity) ConnChanged() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.moved == nil {
		c.moved = make(chan struct{})
	}
	return c.moved
}

// Paths are where the SVID is kept.
func (c *Identity) Paths() (cert, key string) {
	return filepath.Join(c.DataDir, "svid.pem"), filepath.Join(c.DataDir, "svid-key.pem")
}

// RedemptionKeyPath is where the key a registration token is being
// redeemed for is kept until the SVID issued for it is saved.
func (c *Identity) RedemptionKeyPath() string { return filepath.Join(c.DataDir, "token-key.pem") }

// redemptionKey returns the key to redeem a registration token for: the
// same on every attempt, and across restarts with a DataDir (written
// before the first attempt, removed once the SVID is saved). The control
// plane takes a spent token again for the key it was spent for, so an
// attempt whose answer was lost (a dropped connection, a crash before the
// SVID was saved) can be repeated with the same token.
func (c *Identity) redemptionKey() (*ecdsa.PrivateKey, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tokenKey != nil {
		return c.tokenKey, nil
	}
	// A key that cannot be read or kept on disk is still kept in memory:
	// retries in this process repeat the redemption, as before a restart.
	if c.DataDir != "" {
		k, err := svidfile.ReadKey(c.RedemptionKeyPath())
		ek, ok := k.(*ecdsa.PrivateKey)
		switch {
		case err == nil && ok && ek.Curve == elliptic.P256():
			c.tokenKey = ek
			return ek, nil
		case err == nil:
			err = errors.New("not a P-256 key")
		}
		if !errors.Is(err, fs.ErrNotExist) {
			c.log().Warn("unreadable saved token redemption key; making a new one", "path", c.RedemptionKeyPath(), "err", err)
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	if c.DataDir != "" {
		if err := svidfile.WriteKey(c.RedemptionKeyPath(), key); err != nil {
			c.log().Warn("could not save the token redemption key: a restart before the SVID is saved will need a new token", "err", err)
		}
	}
	c.tokenKey = key
	return key, nil
}

// redeemed forgets the redemption key once the SVID issued for it is
// saved (or held, without a DataDir).
func (c *Identity) redeemed() {
	c.mu.Lock()
	c.tokenKey = nil
	c.mu.Unlock()
	if c.DataDir != "" {
		if err := os.Remove(c.RedemptionKeyPath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
			c.log().Warn("could not remove the token redemption key", "err", err)
		}
	}
}

// BundlePath is where the trust bundle last received with an SVID is kept
// (SPIFFE bundle format, with its sequence number).
func (c *Identity) BundlePath() string { return filepath.Join(c.DataDir, "bundle.json") }

// LoadSaved restores a saved SVID that still verifies. The bundle saved
// with it is installed first (unless the one held is newer): after a root
// rotation the SVID chains to a root the bundle the sidecar was started
// with may not hold.
func (c *Identity) LoadSaved() bool {
	if c.DataDir == "" {
		return false
	}
	if data, err := os.ReadFile(c.BundlePath()); err == nil {
		if b, err := bundle.ParseJWKS(c.Creds.TrustDomain(), data); err != nil {
			c.log().Warn("ignoring saved trust bundle", "err", err)
		} else if _, err := c.Creds.SetBundle(b); err != nil {
			c.log().Warn("ignoring saved trust bundle", "err", err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		c.log().Warn("ignoring saved trust bundle", "err", err)
	}
	s, err := svidfile.Load(c.Paths())
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
	if c.Creds.SetSVID(s) != nil {
		return false
	}
	c.redeemed() // a redemption key left by a crash after the save
	return true
}

// save replaces the saved SVID (crash-safe: see package svidfile) and,
// first, the bundle it came with.
func (c *Identity) save(s *x509svid.SVID, b *bundle.Bundle) error {
	if c.DataDir == "" {
		return nil
	}
	data, err := b.MarshalJWKS()
	if err != nil {
		return err
	}
	if err := atomicfile.WriteFile(c.BundlePath(), data, 0o644); err != nil {
		return err
	}
	cp, kp := c.Paths()
	return svidfile.Save(s, cp, kp)
}

// Certify obtains a new SVID on conn: with the registration token when
// token is set, otherwise over mTLS with the current SVID.
func (c *Identity) Certify(ctx context.Context, conn *grpc.ClientConn, token string) error {
	var key *ecdsa.PrivateKey
	var err error
	if token != "" {
		key, err = c.redemptionKey()
	} else {
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
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
	if err := c.save(s, b); err != nil {
		c.log().Warn("could not save SVID", "err", err)
	} else if token != "" {
		c.redeemed()
	}
	c.log().Info("SVID issued", "spiffe_id", id.String(), "expires", chain[0].NotAfter.UTC().Format(time.RFC3339))
	return nil
}

// Connect makes the mTLS connection with the current SVID. A connection
// it replaces stays open for a grace period (30s), so that streams on it
// move to the new one before it closes (see Follow) and calls in flight
// finish; ConnChanged says when.
func (c *Identity) Connect() error {
	conn, err := c.Dial(true)
	if err != nil {
		return err
	}
	old := c.conn.Swap(conn)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.moved != nil {
		close(c.moved)
	}
	c.moved = make(chan struct{})
	if old != nil {
		if c.retiring == nil {
			c.retiring = map[*grpc.ClientConn]*time.Timer{}
		}
		c.retiring[old] = time.AfterFunc(connGrace, func() {
			c.mu.Lock()
			delete(c.retiring, old)
			c.mu.Unlock()
			old.Close()
		})
	}
	return nil
}

// Reissue takes the reissue hint of a snapshot (nil or an empty issuer:
// none). When the hint names another issuer than the one that signed the
// current SVID, an early renewal is scheduled at a uniformly random moment
// within the hint's window from now (at once for a window of zero or less;
// the window is capped at MaxReissueWindow), and RenewLoop is woken for
// it. Each distinct issuer value schedules at most once: snapshots that
// repeat the hint change nothing. A renewal already scheduled is never
// postponed.
func (c *Identity) Reissue(r *controlplanev1.Reissue) {
	issuer := r.GetIssuer()
	if issuer == "" || len(issuer) > maxIssuerLen {
		return
	}
	s := c.Creds.SVID()
	if s == nil {
		return // nothing to renew yet; the first SVID comes from the current issuer
	}
	current := svid.IssuerFingerprint(s.Certificates)
	window := reissueWindow(r)
	c.mu.Lock()
	defer c.mu.Unlock()
	if issuer == c.hint {
		return
	}
	c.hint = issuer
	c.gen++
	if current == issuer {
		// The SVID in force is already what the control plane asks for.
		c.pending = time.Time{}
		return
	}
	at := c.clock().Add(c.jitter(window))
	if c.pending.IsZero() || at.Before(c.pending) {
		c.pending = at
	}
	c.wakeLocked()
	c.log().Info("SVID reissue scheduled: the control plane names another issuer", "issuer", issuer, "current_issuer", current,
		"at", c.pending.UTC().Format(time.RFC3339Nano))
}

// PendingReissue returns when an early renewal asked for by Reissue is
// due, or the zero time if none is.
func (c *Identity) PendingReissue() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pending
}

// reissueWindow is the hint's window: invalid or negative means zero, and
// it is at most MaxReissueWindow.
func reissueWindow(r *controlplanev1.Reissue) time.Duration {
	w := r.GetWindow()
	if w == nil || w.CheckValid() != nil {
		return 0
	}
	return min(max(w.AsDuration(), 0), MaxReissueWindow)
}

func (c *Identity) jitter(window time.Duration) time.Duration {
	if window <= 0 {
		return 0
	}
	var d time.Duration
	if c.Jitter != nil {
		d = c.Jitter(window)
	} else {
		d = time.Duration(mrand.Int64N(int64(window)))
	}
	return min(max(d, 0), window-1)
}

func (c *Identity) wakeLocked() {
	if c.wake == nil {
		c.wake = make(chan struct{}, 1)
	}
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *Identity) wakeChan() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.wake == nil {
		c.wake = make(chan struct{}, 1)
	}
	return c.wake
}

// sleepUntilRenewal waits until halfLife or an earlier reissue, re-reading
// the schedule when Reissue changes it and the clock at least every second
// (so an injected clock that jumps is noticed). It returns the reissue
// generation it woke for, false if ctx ended first.
func (c *Identity) sleepUntilRenewal(ctx context.Context, halfLife time.Time) (uint64, bool) {
	wake := c.wakeChan()
	for {
		c.mu.Lock()
		at, gen := halfLife, c.gen
		if !c.pending.IsZero() && c.pending.Before(at) {
			at = c.pending
		}
		c.mu.Unlock()
		if !at.After(c.clock()) {
			return gen, true
		}
		// Woken by a new hint, the target is read again.
		if !iclock.SleepUntilOr(ctx, c.clock, at, wake) {
			return 0, false
		}
	}
}

// renewed settles the reissue schedule after a renewal that started at
// generation gen: a renewal satisfies what was asked before it started,
// and a hint that came during it if the new SVID is from that issuer.
func (c *Identity) renewed(gen uint64) {
	issuer := ""
	if s := c.Creds.SVID(); s != nil {
		issuer = svid.IssuerFingerprint(s.Certificates)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pending.IsZero() {
		return
	}
	if c.gen != gen && issuer != c.hint {
		return // a newer hint came during the renewal: it stays due
	}
	c.pending = time.Time{}
	if issuer != c.hint {
		c.log().Warn("the renewed SVID is not from the issuer the control plane named; next renewal at half life",
			"issuer", issuer, "want_issuer", c.hint)
	}
}

// renewAt is when RenewLoop renews leaf: at half its life (svid.RenewAt),
// less up to a tenth of its life at random, so that sidecars started
// together do not renew in step; never within a second from now.
func renewAt(leaf *x509.Certificate, now time.Time) time.Time {
	at := svid.RenewAt(leaf, now)
	if spread := leaf.NotAfter.Sub(leaf.NotBefore) / 10; spread > 0 {
		at = at.Add(-time.Duration(mrand.Int64N(int64(spread))))
	}
	if soonest := now.Add(time.Second); at.Before(soonest) {
		at = soonest
	}
	return at
}

// RenewLoop renews the SVID at half its life (less a random tenth), or earlier when Reissue
// asks, until ctx ends; on failure it retries with backoff (past expiry
// too). Each renewal moves Conn to a connection presenting the new SVID.
func (c *Identity) RenewLoop(ctx context.Context) error {
	backoff := NewBackoff(time.Second, 30*time.Second)
	for {
		leaf := c.Creds.SVID().Certificates[0]
		gen, ok := c.sleepUntilRenewal(ctx, renewAt(leaf, c.clock()))
		if !ok {
			return nil
		}
		for {
			err := c.Certify(ctx, c.conn.Load(), "")
			if err == nil {
				break
			}
			c.log().Warn("SVID renewal failed; retrying", "err", err, "expires", leaf.NotAfter)
			// Before expiry, a retry never waits more than a quarter of
			// what is left: a control plane back shortly before the SVID
			// expires is tried again in time (an expired SVID cannot renew).
			var limit time.Duration
			if left := leaf.NotAfter.Sub(c.clock()); left > 0 {
				limit = max(left/4, minRenewRetry)
			}
			if !backoff.WaitAtMost(ctx, limit) {
				return nil
			}
		}
		backoff.Reset()
		c.renewed(gen)
		if err := c.Connect(); err != nil {
			c.log().Warn("reconnecting with the renewed SVID failed", "err", err)
		}
	}
}

// Close closes the connection, and those replaced by Connect at once.
func (c *Identity) Close() {
	if conn := c.conn.Swap(nil); conn != nil {
		conn.Close()
	}
	c.mu.Lock()
	retiring := c.retiring
	c.retiring = nil
	c.mu.Unlock()
	for conn, t := range retiring {
		t.Stop()
		conn.Close()
	}
}

// Follow keeps one server stream open to the control plane, following
// Conn: when Connect replaces the connection (after an SVID renewal), the
// stream is opened again on the new one first, and the old stream is
// cancelled only once the new one delivered its first message (or the old
// one ended): make before break, so the control plane never sees the node
// without a stream. open opens the stream on conn, bounded by ctx, and
// returns its receive function; handle gets every message in order, with
// first set on the first message of each stream. Follow returns the error
// that ended the stream in use (nil when ctx ends).
func Follow[T any](ctx context.Context, c *Identity, open func(ctx context.Context, conn *grpc.ClientConn) (func() (T, error), error), handle func(msg T, first bool)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // every stream started here
	moved := c.ConnChanged()
	cur := followStream(ctx, c.Conn(), open)
	var next *followed[T]
	first := true // cur has delivered nothing yet
	for {
		var nextMsgs <-chan received[T]
		if next != nil {
			nextMsgs = next.msgs
		}
		select {
		case <-ctx.Done():
			return nil
		case <-moved:
			moved = c.ConnChanged()
			if next != nil {
				next.cancel()
			}
			next = followStream(ctx, c.Conn(), open)
		case r := <-cur.msgs:
			if r.err != nil {
				if next == nil {
					return r.err
				}
				cur.cancel()
				cur, next, first = next, nil, true
				continue
			}
			handle(r.msg, first)
			first = false
		case r := <-nextMsgs:
			if r.err != nil {
				// Stay on the old stream; it ends with its connection.
				c.log().Info("opening the stream on the renewed connection failed; keeping the old one", "err", r.err)
				next.cancel()
				next = nil
				continue
			}
			cur.cancel()
			cur, next = next, nil
			handle(r.msg, true)
			first = false
		}
	}
}

// followed is one stream of Follow: its messages (the last one carrying
// the error that ended it) arrive on msgs.
type followed[T any] struct {
	cancel context.CancelFunc
	msgs   chan received[T]
}

type received[T any] struct {
	msg T
	err error
}

func followStream[T any](ctx context.Context, conn *grpc.ClientConn, open func(context.Context, *grpc.ClientConn) (func() (T, error), error)) *followed[T] {
	ctx, cancel := context.WithCancel(ctx)
	f := &followed[T]{cancel: cancel, msgs: make(chan received[T])}
	go func() {
		var recv func() (T, error)
		var err error
		if conn == nil {
			err = errors.New("not connected to the control plane")
		} else {
			recv, err = open(ctx, conn)
		}
		for {
			var r received[T]
			if err != nil {
				r.err = err
			} else {
				r.msg, r.err = recv()
			}
			select {
			case f.msgs <- r:
			case <-ctx.Done():
				return
			}
			if r.err != nil {
				return
			}
		}
	}()
	return f
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

// WaitAtMost is Wait, but sleeps no longer than limit when limit > 0.
func (b *Backoff) WaitAtMost(ctx context.Context, limit time.Duration) bool {
	return b.wait(ctx, nil, limit)
}

// Wait sleeps for the next delay; false if ctx ended first.
func (b *Backoff) Wait(ctx context.Context) bool { return b.WaitOr(ctx, nil) }

// WaitOr is Wait, cut short (with the backoff reset) when wake receives:
// a sign that trying again now will work.
func (b *Backoff) WaitOr(ctx context.Context, wake <-chan struct{}) bool {
	return b.wait(ctx, wake, 0)
}

func (b *Backoff) wait(ctx context.Context, wake <-chan struct{}, limit time.Duration) bool {
	d := b.cur/2 + time.Duration(mrand.Int64N(int64(b.cur/2)+1))
	b.cur = min(b.cur*2, b.max)
	if limit > 0 {
		d = min(d, limit)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	case <-wake:
		b.Reset()
		return true
	}
}
