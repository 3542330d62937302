package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/smallstep/certificates/cas/apiv1"
	"github.com/smallstep/certificates/cas/softcas"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/x509util"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/identity"
)

// Lifetimes of CA certificates.
const (
	DefaultRootTTL         = 10 * 365 * 24 * time.Hour
	DefaultIntermediateTTL = 90 * 24 * time.Hour
	MaxIntermediateTTL     = 365 * 24 * time.Hour
	caBackdate             = time.Minute
)

// Errors of the authority.
var (
	ErrExists         = errors.New("ca: a CA already exists in this data directory")
	ErrNotInitialized = errors.New("ca: no CA in this data directory")
	ErrBusy           = errors.New("ca: data directory is locked by another strait process")
	ErrTransition     = errors.New("ca: transition not allowed")
	ErrReadOnly       = errors.New("ca: authority opened read-only")
	ErrNoIntermediate = errors.New("ca: no intermediate held here")
)

// RootState is where a root stands in its lifecycle.
type RootState string

// Root states. Roots in the first four are in the trust bundle.
const (
	RootPrepared RootState = "prepared" // next slot: trusted, not yet signing
	RootActive   RootState = "active"   // current slot: trusted and signing
	RootOld      RootState = "old"      // next slot: previous root, trusted until retired
	RootTainted  RootState = "tainted"  // next slot: compromised, trusted until revoked
	RootRetired  RootState = "retired"  // gone from the bundle, normal end
	RootRevoked  RootState = "revoked"  // gone from the bundle, emergency end
)

func (s RootState) inBundle() bool {
	return s == RootPrepared || s == RootActive || s == RootOld || s == RootTainted
}

func (s RootState) inNextSlot() bool {
	return s == RootPrepared || s == RootOld || s == RootTainted
}

// Config configures an Authority opened on a data directory.
type Config struct {
	// Dir is the data directory. Required.
	Dir string
	// Clock returns the current time. Nil means time.Now.
	Clock func() time.Time
	// Logger receives transition and issuance logs. Nil discards them.
	Logger *slog.Logger
	// ReadOnly opens without taking the directory lock; mutations fail.
	ReadOnly bool
}

func (c *Config) setDefaults() error {
	if c.Dir == "" {
		return errors.New("ca: data directory is required")
	}
	if c.Clock == nil {
		c.Clock = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// InitOptions says how to create a new mesh root.
type InitOptions struct {
	// TrustDomain of the mesh. Required.
	TrustDomain spiffeid.TrustDomain
	// RootTTL is the root's lifetime. Zero means DefaultRootTTL.
	RootTTL time.Duration
	// KMS is a smallstep KMS URI for the root and intermediate keys. Empty
	// means 0600 PEM files under DIR/keys.
	KMS string
	// Force replaces an existing CA; its state file is kept as a backup.
	Force bool
}

// Authority is the mesh root authority held in a data directory: root slots,
// the trust bundle, and the intermediates it signed. Its methods are safe
// for concurrent use; the directory lock keeps other processes out.
type Authority struct {
	cfg  Config
	log  *slog.Logger
	lock *dirLock
	keys *keyStore

	mu      sync.Mutex
	st      *state
	bundle  *bundle.Bundle
	pending []string // keys created by the transition in progress
	signed  signedBundle
}

type state struct {
	Version       int                   `json:"version"`
	TrustDomain   string                `json:"trust_domain"`
	KMS           string                `json:"kms,omitempty"`
	Sequence      uint64                `json:"bundle_sequence"`
	Roots         []*rootRecord         `json:"roots"`
	Intermediates []*intermediateRecord `json:"intermediates,omitempty"`

	td spiffeid.TrustDomain
}

type rootRecord struct {
	ID      string    `json:"id"`
	State   RootState `json:"state"`
	Cert    string    `json:"cert"`
	Key     string    `json:"key"`
	Created time.Time `json:"created"`
	Changed time.Time `json:"changed"`
	// LastInUse is when this root last stopped signing or an intermediate
	// under it was superseded; leaves under it may live MaxSVIDTTL longer.
	LastInUse time.Time `json:"last_in_use,omitzero"`

	cert *x509.Certificate
}

type intermediateRecord struct {
	Cluster string    `json:"cluster"`
	RootID  string    `json:"root_id"`
	Cert    string    `json:"cert"`
	Key     string    `json:"key,omitempty"` // set when this directory holds the key
	Issued  time.Time `json:"issued"`

	cert *x509.Certificate
}

const stateVersion = 1

// Init creates a new mesh root in cfg.Dir and returns the open authority.
func Init(ctx context.Context, cfg Config, opts InitOptions) (*Authority, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	if cfg.ReadOnly {
		return nil, ErrReadOnly
	}
	if opts.TrustDomain.IsZero() {
		return nil, errors.New("ca: trust domain is required")
	}
	if opts.RootTTL <= 0 {
		opts.RootTTL = DefaultRootTTL
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("ca: create data directory: %w", err)
	}
	lock, err := lockDir(cfg.Dir)
	if err != nil {
		return nil, err
	}
	a, err := initLocked(ctx, cfg, opts, lock)
	if err != nil {
		lock.unlock()
		return nil, err
	}
	return a, nil
}

func initLocked(ctx context.Context, cfg Config, opts InitOptions, lock *dirLock) (*Authority, error) {
	statePath := filepath.Join(cfg.Dir, stateFile)
	var prevSequence uint64
	if _, err := os.Stat(statePath); err == nil {
		if !opts.Force {
			return nil, fmt.Errorf("%w (%s); pass --force to replace it", ErrExists, cfg.Dir)
		}
		// Keep a copy; the commit below replaces state.json atomically, so
		// a failure before it leaves the old CA in place.
		backup := fmt.Sprintf("%s.replaced-%d", statePath, cfg.Clock().UnixNano())
		old, err := os.ReadFile(statePath)
		if err != nil {
			return nil, fmt.Errorf("ca: read old state: %w", err)
		}
		if err := writeFileAtomic(backup, old, 0o600); err != nil {
			return nil, fmt.Errorf("ca: keep old state: %w", err)
		}
		// Members only accept a bundle with a higher sequence: continue it.
		var prev struct {
			Sequence uint64 `json:"bundle_sequence"`
		}
		if json.Unmarshal(old, &prev) == nil {
			prevSequence = prev.Sequence
		}
		cfg.Logger.Warn("replacing existing CA; previous state kept", "backup", backup)
	}
	keys, err := openKeyStore(ctx, cfg.Dir, opts.KMS)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	a := &Authority{cfg: cfg, log: cfg.Logger, lock: lock, keys: keys}
	now := cfg.Clock()
	st := &state{Version: stateVersion, TrustDomain: opts.TrustDomain.Name(), KMS: opts.KMS, td: opts.TrustDomain}
	root, err := a.newRoot(st, now, opts.RootTTL, RootActive)
	if err == nil {
		st.Roots = append(st.Roots, root)
		st.Sequence = prevSequence + 1
		err = a.commit(st)
	}
	if err != nil {
		a.dropPending()
		keys.close()
		return nil, err
	}
	a.pending = nil
	a.log.Info("created mesh root", "trust_domain", st.TrustDomain, "root_id", root.ID, "not_after", root.cert.NotAfter)
	return a, nil
}

// Open loads the authority kept in cfg.Dir.
func Open(ctx context.Context, cfg Config) (*Authority, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	var lock *dirLock
	if !cfg.ReadOnly {
		if _, err := os.Stat(filepath.Join(cfg.Dir, stateFile)); err != nil {
			return nil, fmt.Errorf("%w (%s): run 'strait ca init' first", ErrNotInitialized, cfg.Dir)
		}
		l, err := lockDir(cfg.Dir)
		if err != nil {
			return nil, err
		}
		lock = l
	}
	a, err := openLocked(ctx, cfg, lock)
	if err != nil {
		lock.unlock()
		return nil, err
	}
	return a, nil
}

func openLocked(ctx context.Context, cfg Config, lock *dirLock) (*Authority, error) {
	data, err := os.ReadFile(filepath.Join(cfg.Dir, stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w (%s): run 'strait ca init' first", ErrNotInitialized, cfg.Dir)
	}
	if err != nil {
		return nil, fmt.Errorf("ca: read state: %w", err)
	}
	st, err := decodeState(data)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", filepath.Join(cfg.Dir, stateFile), err)
	}
	keys, err := openKeyStore(ctx, cfg.Dir, st.KMS)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	a := &Authority{cfg: cfg, log: cfg.Logger, lock: lock, keys: keys, st: st}
	if a.bundle, err = st.makeBundle(); err != nil {
		keys.close()
		return nil, err
	}
	if !cfg.ReadOnly {
		// The bundle files are derived from the state; a crash between the
		// state commit and their rewrite is healed here.
		if err := a.writeBundleFiles(a.bundle); err != nil {
			keys.close()
			return nil, err
		}
	}
	return a, nil
}

// Close releases the directory lock and the KMS.
func (a *Authority) Close() error {
	return errors.Join(a.keys.close(), a.lock.unlock())
}

// TrustDomain returns the mesh trust domain.
func (a *Authority) TrustDomain() spiffeid.TrustDomain {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.st.td
}

// Bundle returns the current trust bundle.
func (a *Authority) Bundle() *bundle.Bundle {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.bundle
}

// Dir returns the data directory.
func (a *Authority) Dir() string { return a.cfg.Dir }

func decodeState(data []byte) (*state, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var st state
	if err := dec.Decode(&st); err != nil {
		return nil, fmt.Errorf("decode state: %w", err)
	}
	if st.Version != stateVersion {
		return nil, fmt.Errorf("state version %d, this strait reads %d", st.Version, stateVersion)
	}
	td, err := identity.ParseTrustDomain(st.TrustDomain)
	if err != nil {
		return nil, err
	}
	st.td = td
	active, next := 0, 0
	ids := map[string]bool{}
	for _, r := range st.Roots {
		if r == nil {
			return nil, errors.New("state lists an empty root")
		}
		if ids[r.ID] {
			return nil, fmt.Errorf("state lists root %q twice", r.ID)
		}
		ids[r.ID] = true
		if r.cert, err = parseCertPEM(r.Cert); err != nil {
			return nil, fmt.Errorf("root %s: %w", r.ID, err)
		}
		if !r.cert.IsCA || r.cert.CheckSignatureFrom(r.cert) != nil {
			return nil, fmt.Errorf("root %s is not a self-signed CA", r.ID)
		}
		switch {
		case r.State == RootActive:
			active++
		case r.State.inNextSlot():
			next++
		case r.State == RootRetired || r.State == RootRevoked:
		default:
			return nil, fmt.Errorf("root %s has unknown state %q", r.ID, r.State)
		}
	}
	if active != 1 || next > 1 {
		return nil, fmt.Errorf("state has %d active roots and %d in the next slot; want 1 and at most 1", active, next)
	}
	for _, im := range st.Intermediates {
		if im == nil {
			return nil, errors.New("state lists an empty intermediate")
		}
		if !ids[im.RootID] {
			return nil, fmt.Errorf("intermediate of %q chains to unknown root %q", im.Cluster, im.RootID)
		}
		if im.cert, err = parseCertPEM(im.Cert); err != nil {
			return nil, fmt.Errorf("intermediate of %s: %w", im.Cluster, err)
		}
	}
	return &st, nil
}

func (st *state) clone() *state {
	c := *st
	c.Roots = make([]*rootRecord, len(st.Roots))
	for i, r := range st.Roots {
		rc := *r
		c.Roots[i] = &rc
	}
	c.Intermediates = make([]*intermediateRecord, len(st.Intermediates))
	for i, im := range st.Intermediates {
		ic := *im
		c.Intermediates[i] = &ic
	}
	return &c
}

func (st *state) root(id string) *rootRecord {
	for _, r := range st.Roots {
		if r.ID == id {
			return r
		}
	}
	return nil
}

func (st *state) rootIn(states ...RootState) *rootRecord {
	for _, r := range st.Roots {
		if slices.Contains(states, r.State) {
			return r
		}
	}
	return nil
}

func (st *state) intermediate(cluster string) *intermediateRecord {
	for _, im := range st.Intermediates {
		if im.Cluster == cluster {
			return im
		}
	}
	return nil
}

func (st *state) makeBundle() (*bundle.Bundle, error) {
	var roots []*x509.Certificate
	for _, r := range st.Roots {
		if r.State.inBundle() {
			roots = append(roots, r.cert)
		}
	}
	return bundle.New(st.td, st.Sequence, roots)
}

// commit makes next the authority's state: durably first, in memory second.
// On error nothing changed, on disk or in memory. Once state.json is
// replaced the transition has happened: a failure to rewrite the derived
// bundle files is logged, and they are rebuilt on the next open.
func (a *Authority) commit(next *state) error {
	b, err := next.makeBundle()
	if err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	data, err := json.MarshalIndent(next, "", "  ")
	if err != nil {
		return fmt.Errorf("ca: encode state: %w", err)
	}
	if err := writeFileAtomic(filepath.Join(a.cfg.Dir, stateFile), append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("ca: write state: %w", err)
	}
	a.st, a.bundle = next, b
	if err := a.writeBundleFiles(b); err != nil {
		a.log.Warn("state committed but the bundle files could not be rewritten; they are rebuilt on the next open", "error", err)
	}
	return nil
}

func (a *Authority) writeBundleFiles(b *bundle.Bundle) error {
	jwks, err := b.MarshalJWKS()
	if err != nil {
		return err
	}
	files := []struct {
		name string
		data []byte
	}{{bundleJWKSFile, append(jwks, '\n')}, {bundlePEMFile, b.MarshalPEM()}}
	for _, f := range files {
		name, data := f.name, f.data
		path := filepath.Join(a.cfg.Dir, name)
		if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
			continue
		}
		if err := writeFileAtomic(path, data, 0o644); err != nil {
			return fmt.Errorf("ca: write %s: %w", name, err)
		}
	}
	return nil
}

// mutate runs fn on a copy of the state and commits the copy.
func (a *Authority) mutate(fn func(st *state, now time.Time) error) error {
	if a.cfg.ReadOnly {
		return ErrReadOnly
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	next := a.st.clone()
	a.pending = nil
	err := fn(next, a.cfg.Clock())
	if err == nil {
		err = a.commit(next)
	}
	if err != nil {
		a.dropPending()
	}
	a.pending = nil
	return err
}

// createKey creates a key for the transition in progress; if the transition
// fails, dropPending removes it again.
func (a *Authority) createKey(purpose string) (string, crypto.Signer, error) {
	ref, signer, err := a.keys.create(purpose)
	if err == nil {
		a.pending = append(a.pending, ref)
	}
	return ref, signer, err
}

func (a *Authority) dropPending() {
	for _, ref := range a.pending {
		a.destroyKey(ref)
	}
	a.pending = nil
}

// rootTemplate and intermediateTemplate are x509util templates; data holds
// TrustDomain, TrustDomainID and (for intermediates) Cluster, RootID.
const rootTemplate = `{
	"subject": {"organization": ["Strait"], "commonName": {{ toJson (printf "Strait root %s %s" .TrustDomain .RootID) }}},
	"issuer": {"organization": ["Strait"], "commonName": {{ toJson (printf "Strait root %s %s" .TrustDomain .RootID) }}},
	"uris": [{{ toJson .TrustDomainID }}],
	"keyUsage": ["certSign", "crlSign", "digitalSignature"],
	"basicConstraints": {"isCA": true, "maxPathLen": 1},
	"nameConstraints": {"critical": true, "permittedURIDomains": [{{ toJson .TrustDomain }}]}
}`

const intermediateTemplate = `{
	"subject": {"organization": ["Strait"], "organizationalUnit": [{{ toJson .Cluster }}], "commonName": {{ toJson (printf "Strait intermediate %s" .Cluster) }}},
	"uris": [{{ toJson .TrustDomainID }}],
	"keyUsage": ["certSign", "crlSign", "digitalSignature"],
	"basicConstraints": {"isCA": true, "maxPathLen": 0},
	"nameConstraints": {"critical": true, "permittedURIDomains": [{{ toJson .TrustDomain }}]}
}`

func templateFor(text string, pub crypto.PublicKey, td spiffeid.TrustDomain, extra map[string]string) (*x509.Certificate, error) {
	data := x509util.NewTemplateData()
	data.Set("TrustDomain", td.Name())
	data.Set("TrustDomainID", td.IDString())
	for k, v := range extra {
		data.Set(k, v)
	}
	c, err := x509util.NewCertificateFromX509(&x509.Certificate{PublicKey: pub}, x509util.WithTemplate(text, data))
	if err != nil {
		return nil, fmt.Errorf("render certificate template: %w", err)
	}
	return c.GetCertificate(), nil
}

// keyID names a root by the SHA-256 of its public key.
// keyID names a root by its key; svid.RootID computes the same from the
// root's certificate, for clusters that hold only the bundle.
func keyID(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:6]), nil
}

func (a *Authority) newRoot(st *state, now time.Time, ttl time.Duration, rs RootState) (*rootRecord, error) {
	ref, signer, err := a.createKey("root")
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	id, err := keyID(signer.Public())
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	tmpl, err := templateFor(rootTemplate, signer.Public(), st.td, map[string]string{"RootID": id})
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	tmpl.NotBefore, tmpl.NotAfter = now.Add(-caBackdate), now.Add(ttl)
	cert, err := x509util.CreateCertificate(tmpl, tmpl, signer.Public(), signer)
	if err != nil {
		return nil, fmt.Errorf("ca: sign root: %w", err)
	}
	return &rootRecord{ID: id, State: rs, Cert: encodeCertPEM(cert), Key: ref, Created: now, Changed: now, cert: cert}, nil
}

// signIntermediate signs pub as cluster's intermediate under the active root.
func (a *Authority) signIntermediate(st *state, now time.Time, cluster string, pub crypto.PublicKey, ttl time.Duration) (*x509.Certificate, *rootRecord, error) {
	root := st.rootIn(RootActive)
	signer, err := a.keys.signer(root.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("ca: root %s: %w", root.ID, err)
	}
	tmpl, err := templateFor(intermediateTemplate, pub, st.td, map[string]string{"Cluster": cluster})
	if err != nil {
		return nil, nil, fmt.Errorf("ca: %w", err)
	}
	if ttl <= 0 {
		ttl = DefaultIntermediateTTL
	}
	ttl = min(ttl, MaxIntermediateTTL)
	tmpl.NotBefore, tmpl.NotAfter = now.Add(-caBackdate), now.Add(ttl)
	if tmpl.NotAfter.After(root.cert.NotAfter) {
		tmpl.NotAfter = root.cert.NotAfter
	}
	if !tmpl.NotAfter.After(now) {
		return nil, nil, fmt.Errorf("ca: root %s has expired", root.ID)
	}
	cas, err := softcas.New(context.Background(), apiv1.Options{CertificateChain: []*x509.Certificate{root.cert}, Signer: signer})
	if err != nil {
		return nil, nil, fmt.Errorf("ca: %w", err)
	}
	resp, err := cas.CreateCertificate(&apiv1.CreateCertificateRequest{Template: tmpl, Lifetime: tmpl.NotAfter.Sub(now)})
	if err != nil {
		return nil, nil, fmt.Errorf("ca: sign intermediate for %s: %w", cluster, err)
	}
	return resp.Certificate, root, nil
}

// IntermediateRequest asks the root authority to sign a cluster's
// intermediate from a CSR made where the key lives.
type IntermediateRequest struct {
	Cluster string
	CSR     []byte // DER; only its public key is used
	TTL     time.Duration
	// Replace allows replacing an intermediate whose key is held in this
	// directory (its key is then deleted). Records of remote clusters are
	// always replaced: that is how they renew.
	Replace bool
	// Join marks a request from a cluster joining with a token: it may not
	// take over the name of a cluster whose intermediate is still valid
	// under another key (a retry of the same cluster's join, with its key,
	// is signed again).
	Join bool
}

// SignIntermediate signs a cluster intermediate from a CSR (path length 0,
// URI name constraint to the trust domain, within the root's lifetime) and
// records it as that cluster's current intermediate.
func (a *Authority) SignIntermediate(ctx context.Context, req IntermediateRequest) (*x509.Certificate, error) {
	if err := identity.ValidateClusterName(req.Cluster); err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	csr, err := ParseCSR(req.CSR)
	if err != nil {
		return nil, err
	}
	var out *x509.Certificate
	var dropKey string
	err = a.mutate(func(st *state, now time.Time) error {
		cert, root, err := a.signIntermediate(st, now, req.Cluster, csr.PublicKey, req.TTL)
		if err != nil {
			return err
		}
		if old := st.intermediate(req.Cluster); old != nil {
			if req.Join && now.Before(old.cert.NotAfter) && !samePublicKey(old.cert.PublicKey, csr.PublicKey) {
				return fmt.Errorf("%w: cluster %s already holds an intermediate of this mesh (until %s) under another key; a cluster that joins for its intermediate needs a name of its own", ErrCSRRefused, req.Cluster, old.cert.NotAfter.UTC().Format(time.RFC3339))
			}
			if old.Key != "" && !req.Replace {
				return fmt.Errorf("ca: the intermediate of cluster %s has its key held in this directory; pass --force to replace it with one signed from a CSR", req.Cluster)
			}
			dropKey = old.Key
		}
		st.putIntermediate(now, &intermediateRecord{Cluster: req.Cluster, RootID: root.ID, Cert: encodeCertPEM(cert), Issued: now, cert: cert})
		out = cert
		return nil
	})
	if err != nil {
		return nil, err
	}
	a.destroyKey(dropKey)
	a.log.Info("signed cluster intermediate", "cluster", req.Cluster, "serial", out.SerialNumber.Text(16), "not_after", out.NotAfter)
	return out, nil
}

func samePublicKey(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// CreateIntermediate generates a key for cluster in this data directory and
// signs its intermediate: for the root authority's own cluster and for dev
// setups. With replace false, an existing intermediate is an error.
func (a *Authority) CreateIntermediate(ctx context.Context, cluster string, ttl time.Duration, replace bool) (*x509.Certificate, error) {
	if err := identity.ValidateClusterName(cluster); err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	var out *x509.Certificate
	var dropKey string
	err := a.mutate(func(st *state, now time.Time) error {
		if old := st.intermediate(cluster); old != nil {
			if !replace {
				return fmt.Errorf("ca: cluster %s already has an intermediate (expires %s); pass --force to replace it", cluster, old.cert.NotAfter.UTC().Format(time.RFC3339))
			}
			dropKey = old.Key
		}
		ref, signer, err := a.createKey("intermediate-" + cluster)
		if err != nil {
			return fmt.Errorf("ca: %w", err)
		}
		cert, root, err := a.signIntermediate(st, now, cluster, signer.Public(), ttl)
		if err != nil {
			return err
		}
		st.putIntermediate(now, &intermediateRecord{Cluster: cluster, RootID: root.ID, Cert: encodeCertPEM(cert), Key: ref, Issued: now, cert: cert})
		out = cert
		return nil
	})
	if err != nil {
		return nil, err
	}
	a.destroyKey(dropKey)
	a.log.Info("created cluster intermediate", "cluster", cluster, "serial", out.SerialNumber.Text(16), "not_after", out.NotAfter)
	return out, nil
}

// putIntermediate records rec as its cluster's current intermediate. If it
// replaces one under a root that no longer signs, that root's chain was in
// use until now: leaves issued under it live on for up to MaxSVIDTTL.
func (st *state) putIntermediate(now time.Time, rec *intermediateRecord) {
	if old := st.intermediate(rec.Cluster); old != nil && old.RootID != rec.RootID {
		if r := st.root(old.RootID); r != nil && r.State != RootActive {
			r.LastInUse = now
		}
	}
	st.Intermediates = slices.DeleteFunc(st.Intermediates, func(im *intermediateRecord) bool { return im.Cluster == rec.Cluster })
	st.Intermediates = append(st.Intermediates, rec)
	slices.SortFunc(st.Intermediates, func(x, y *intermediateRecord) int { return strings.Compare(x.Cluster, y.Cluster) })
}

func (a *Authority) destroyKey(ref string) {
	if ref == "" {
		return
	}
	if err := a.keys.destroy(ref); err != nil {
		a.log.Warn("could not remove key no longer used", "key", ref, "error", err)
	}
}

// Issuer returns an Issuer for cluster's intermediate, whose key must be held
// in this data directory. An empty cluster picks the only one held here.
func (a *Authority) Issuer(cluster string) (*Issuer, error) {
	a.mu.Lock()
	var rec *intermediateRecord
	var held []string
	for _, im := range a.st.Intermediates {
		if im.Key != "" {
			held = append(held, im.Cluster)
			if im.Cluster == cluster || (cluster == "" && rec == nil) {
				rec = im
			}
		}
	}
	td := a.st.td
	a.mu.Unlock()
	switch {
	case len(held) == 0:
		return nil, fmt.Errorf("%w in %s: create one with 'strait ca intermediate create --cluster NAME'", ErrNoIntermediate, a.cfg.Dir)
	case cluster == "" && len(held) > 1:
		return nil, fmt.Errorf("%w: several clusters held here (%v); name one with --cluster", ErrNoIntermediate, held)
	case rec == nil:
		return nil, fmt.Errorf("%w for cluster %q (held here: %v)", ErrNoIntermediate, cluster, held)
	}
	signer, err := a.keys.signer(rec.Key)
	if err != nil {
		return nil, fmt.Errorf("ca: intermediate of %s: %w", rec.Cluster, err)
	}
	return NewIssuer(IssuerConfig{TrustDomain: td, Chain: []*x509.Certificate{rec.cert}, Signer: signer, Clock: a.cfg.Clock})
}

func parseCertPEM(s string) (*x509.Certificate, error) {
	block, rest := pem.Decode([]byte(s))
	if block == nil || block.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("want exactly one PEM CERTIFICATE")
	}
	return x509.ParseCertificate(block.Bytes)
}

func encodeCertPEM(c *x509.Certificate) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
}
