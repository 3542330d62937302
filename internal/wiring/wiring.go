// Package wiring composes domains for local mode: the mesh CA behind the
// interfaces the control plane declares, and a whole local control plane
// from its data directory. The CLI and the end-to-end tests share it, so
// what the tests run is what users run.
package wiring

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/controlplane/local"
	"github.com/straitmesh/strait/controlplane/registry"
	"github.com/straitmesh/strait/controlplane/server"
	"github.com/straitmesh/strait/controlplane/store"
	"github.com/straitmesh/strait/internal/svidfile"
)

// RootAuthority lets a local control plane get its intermediate from the
// mesh CA's data directory.
type RootAuthority struct {
	CA      *ca.Authority
	Replace bool
}

func (r RootAuthority) SignIntermediate(ctx context.Context, cluster string, csr []byte, ttl time.Duration) (*x509.Certificate, error) {
	return r.CA.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: cluster, CSR: csr, TTL: ttl, Replace: r.Replace})
}

// joinSigner signs the intermediates of clusters joining with a token.
type joinSigner struct{ ca *ca.Authority }

func (j joinSigner) SignIntermediate(ctx context.Context, cluster string, csr []byte, ttl time.Duration) (*x509.Certificate, error) {
	return j.ca.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: cluster, CSR: csr, TTL: ttl, Join: true})
}

func (r RootAuthority) Bundle() *bundle.Bundle { return r.CA.Bundle() }

// Issuer adapts ca.Issuer to what the control plane declares it needs.
type Issuer struct{ I *ca.Issuer }

func (i Issuer) IssueSVID(csr []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error) {
	chain, err := i.I.IssueSVID(ca.SVIDRequest{CSR: csr, ID: id, TTL: ttl})
	if errors.Is(err, ca.ErrCSRRefused) {
		return nil, fmt.Errorf("%w: %w", server.ErrBadRequest, err)
	}
	return chain, err
}

func (i Issuer) CheckRequest(csr []byte, id spiffeid.ID) error {
	return i.I.CheckRequest(csr, id)
}

func (i Issuer) MintSVID(id spiffeid.ID, ttl time.Duration) (*x509svid.SVID, error) {
	return i.I.MintSVID(id, ttl)
}

var (
	_ server.Issuer       = Issuer{}
	_ local.RootAuthority = RootAuthority{}
)

// NewIssuer is the cluster intermediate of d as an Issuer.
func NewIssuer(d *local.Dir, svidTTL time.Duration) (Issuer, error) {
	return newIssuer(d, svidTTL, nil)
}

func newIssuer(d *local.Dir, svidTTL time.Duration, clock func() time.Time) (Issuer, error) {
	i, err := ca.NewIssuer(ca.IssuerConfig{TrustDomain: d.TrustDomain, Chain: d.Chain, Signer: d.Signer, DefaultTTL: svidTTL, Clock: clock})
	return Issuer{i}, err
}

// ControlPlaneOptions configure RunControlPlane.
type ControlPlaneOptions struct {
	Dir     string        // data directory from local.Init; required
	Listen  string        // gRPC listen address; required
	SVIDTTL time.Duration // zero means 1h
	Logger  *slog.Logger  // nil discards
	Clock   func() time.Time
	// Ready, if set, is called with the bound address before serving.
	Ready func(addr string)
	// Registerer receives metrics; nil means a private registry.
	Registerer prometheus.Registerer
	// RootAuthority, on the root authority's cluster only, signs the
	// intermediates of clusters that join pending. A RootAuthority value
	// of this package also drives trust-root rotations.
	RootAuthority server.IntermediateSigner
	// ReissueWindow spreads nodes' re-issuance after a root rotation
	// re-signs the intermediate; zero means 30s.
	ReissueWindow time.Duration
}

// RunControlPlane serves a local-mode control plane until ctx ends.
//
// A pending data directory (local.InitPending) first serves only the join;
// once it has its intermediate, the full control plane takes over on the
// same address.
func RunControlPlane(ctx context.Context, o ControlPlaneOptions) error {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Clock == nil {
		o.Clock = time.Now
	}
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	if o.Ready != nil {
		o.Ready(ln.Addr().String())
	}
	d, err := local.Load(o.Dir)
	if errors.Is(err, local.ErrPending) {
		p, perr := local.LoadPending(o.Dir)
		if perr != nil {
			return perr
		}
		// A join cut short while it installed what it received: the
		// issuer spent the token and stored its link, so it is finished
		// here rather than waited for again.
		rd, rerr := p.Resume()
		switch {
		case rerr != nil:
			o.Logger.Warn("the intermediate received through a join that a restart interrupted could not be installed; waiting for a join", "err", rerr)
		case rd != nil:
			o.Logger.Info("finished installing the intermediate received through a join that a restart interrupted", "cluster", rd.Cluster)
		}
		if rd != nil {
			d, err = rd, nil
		} else {
			// The pending server and then the full control plane serve
			// views of one listener: clients are never refused during the
			// switch.
			h := newHandoff(ln)
			if err := runPending(ctx, p, h.view(), o.Logger, o.Clock); err != nil {
				return err
			}
			ln = h.view()
			d, err = local.Load(o.Dir)
		}
	}
	if err != nil {
		return err
	}
	st, err := store.Open(d.StorePath(), store.Options{Logger: o.Logger, Clock: o.Clock})
	if err != nil {
		return err
	}
	defer st.Close()
	reg, err := registry.NewLocal(registry.LocalConfig{Store: st, Cluster: d.Cluster, Clock: o.Clock})
	if err != nil {
		return err
	}
	if o.Registerer == nil {
		o.Registerer = prometheus.NewRegistry()
	}
	var current atomic.Pointer[bundle.Bundle]
	current.Store(d.Bundle)
	tr, err := newTrust(d, &current, o.SVIDTTL, o.Clock, o.Logger)
	if err != nil {
		return err
	}
	var root server.RootCA
	joins := o.RootAuthority
	if ra, ok := o.RootAuthority.(RootAuthority); ok && ra.CA != nil {
		joins = joinSigner{ra.CA}
		rc := &rootCA{ca: ra.CA, trust: tr}
		// A step taken while this control plane was down (or a crash
		// between the CA's commit and this directory's) is caught up.
		if err := rc.sync(); err != nil {
			return fmt.Errorf("root authority: %w", err)
		}
		root = rc
	}
	healAdmin(d, tr.issuer, o.Logger)
	srv, err := server.New(server.Config{
		Cluster: d.Cluster, TrustDomain: d.TrustDomain, Issuer: tr.issuer, Bundle: current.Load,
		Store: st, Registry: reg, IntermediateExpiry: d.Chain[0].NotAfter, SVIDTTL: o.SVIDTTL,
		Logger: o.Logger, Registerer: o.Registerer, Clock: o.Clock, RootAuthority: joins,
		Trust: tr, RootCA: root, ReissueWindow: o.ReissueWindow,
	})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go watchBundle(ctx, d, &current, o.Logger)
	return srv.Run(ctx, ln)
}

// watchBundle re-reads the data directory's trust bundle every second and
// installs a newer sequence; the server pushes it to every sidecar. A file
// that does not parse is logged and ignored: the bundle in force stays.
func watchBundle(ctx context.Context, d *local.Dir, current *atomic.Pointer[bundle.Bundle], log *slog.Logger) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	lastErr := ""
	var lastMod time.Time
	var lastSize int64 = -1
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		// Only a file that changed is read and parsed again.
		if fi, err := os.Stat(d.BundlePath()); err == nil {
			if fi.ModTime().Equal(lastMod) && fi.Size() == lastSize {
				continue
			}
			lastMod, lastSize = fi.ModTime(), fi.Size()
		}
		b, err := d.ReadBundle()
		if err != nil {
			if err.Error() != lastErr {
				log.Error("trust bundle file unreadable; keeping the bundle in force", "err", err)
				lastErr = err.Error()
			}
			continue
		}
		lastErr = ""
		if cur := current.Load(); b.Sequence() > cur.Sequence() {
			current.Store(b)
			log.Info("trust bundle updated", "sequence", b.Sequence(), "digest", b.Digest(), "roots", len(b.Roots()))
		}
	}
}

// healAdmin re-issues the admin credentials kept in the data directory
// when they do not chain to the intermediate in force: a crash between a
// change of intermediate (a join completing, a rotation installing the
// re-signed one) and their re-issue left them on the previous chain,
// which this control plane refuses (a bootstrap CA's at once, an old
// root's after retire). Credentials absent are left so.
func healAdmin(d *local.Dir, m local.Minter, log *slog.Logger) {
	s, err := svidfile.Load(d.AdminPaths())
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	ttl, why := 24*time.Hour, fmt.Sprintf("unreadable (%v)", err)
	if err == nil {
		if len(s.Certificates) > 1 && bytes.Equal(s.Certificates[1].Raw, d.Chain[0].Raw) {
			return
		}
		ttl, why = min(ttl, s.Certificates[0].NotAfter.Sub(s.Certificates[0].NotBefore)), "issued under another intermediate"
	}
	cert, _ := d.AdminPaths()
	if _, err := d.MintAdmin(m, ttl); err != nil {
		log.Warn("the admin credentials do not chain to the intermediate in force and could not be re-issued; run `strait controlplane admin-credentials`", "path", cert, "err", err)
		return
	}
	log.Info("admin credentials re-issued under the intermediate in force", "path", cert, "were", why)
}
