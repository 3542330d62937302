package local

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/bundle"
)

const (
	testTD      = "strait.example"
	testCluster = "east"
)

var td = spiffeid.RequireTrustDomainFromString(testTD)

// rootAuthority adapts *ca.Authority to RootAuthority, as internal/wiring
// does.
type rootAuthority struct{ a *ca.Authority }

func (r rootAuthority) SignIntermediate(ctx context.Context, cluster string, csr []byte, ttl time.Duration) (*x509.Certificate, error) {
	return r.a.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: cluster, CSR: csr, TTL: ttl})
}

func (r rootAuthority) Bundle() *bundle.Bundle { return r.a.Bundle() }

var _ RootAuthority = rootAuthority{}

// fakeRoot is a RootAuthority that fails on demand.
type fakeRoot struct {
	bundle  *bundle.Bundle
	signErr error
}

func (f fakeRoot) SignIntermediate(context.Context, string, []byte, time.Duration) (*x509.Certificate, error) {
	return nil, f.signErr
}

func (f fakeRoot) Bundle() *bundle.Bundle { return f.bundle }

// keysMatch reports whether two public keys are the same key.
func keysMatch(a, b crypto.PublicKey) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && e.Equal(b)
}

// newCA creates a mesh root in a temporary directory, closed when the test
// ends.
func newCA(t *testing.T) *ca.Authority {
	t.Helper()
	a, err := ca.Init(t.Context(), ca.Config{Dir: t.TempDir()}, ca.InitOptions{TrustDomain: td})
	if err != nil {
		t.Fatalf("ca.Init: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

// initDir runs Init for testCluster in a fresh directory.
func initDir(t *testing.T, a *ca.Authority) *Dir {
	t.Helper()
	d, err := Init(t.Context(), filepath.Join(t.TempDir(), "cp"), testCluster, rootAuthority{a}, 0, false)
	if err != nil {
		t.Fatalf("Init: %v", err)
	}
	return d
}

func TestInitLoadRoundTrip(t *testing.T) {
	a := newCA(t)
	d := initDir(t, a)
	loaded, err := Load(d.Path)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	for _, tt := range []struct {
		name string
		d    *Dir
	}{{"from Init", d}, {"from Load", loaded}} {
		t.Run(tt.name, func(t *testing.T) {
			d := tt.d
			if d.Cluster != testCluster {
				t.Errorf("cluster: got %q, want %q", d.Cluster, testCluster)
			}
			if d.TrustDomain != td {
				t.Errorf("trust domain: got %q, want %q", d.TrustDomain, td)
			}
			if len(d.Chain) == 0 {
				t.Fatal("chain: got none, want the intermediate")
			}
			if !d.Chain[0].IsCA {
				t.Errorf("chain[0].IsCA: got false, want true")
			}
			if !keysMatch(d.Chain[0].PublicKey, d.Signer.Public()) {
				t.Errorf("signer: got a key that does not match chain[0], want chain[0]'s key")
			}
			if d.Bundle == nil {
				t.Fatal("bundle: got nil, want the CA's")
			}
			if got, want := d.Bundle.Digest(), a.Bundle().Digest(); got != want {
				t.Errorf("bundle digest: got %q, want %q", got, want)
			}
			if got, want := d.Bundle.Sequence(), a.Bundle().Sequence(); got != want {
				t.Errorf("bundle sequence: got %d, want %d", got, want)
			}
			roots := x509.NewCertPool()
			for _, r := range a.Bundle().Roots() {
				roots.AddCert(r)
			}
			if _, err := d.Chain[0].Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
				t.Errorf("intermediate: got %v verifying against the CA's roots, want nil", err)
			}
		})
	}

	t.Run("key file mode", func(t *testing.T) {
		fi, err := os.Stat(filepath.Join(d.Path, fileKey))
		if err != nil {
			t.Fatal(err)
		}
		if got, want := fi.Mode().Perm(), os.FileMode(0o600); got != want {
			t.Errorf("mode of %s: got %v, want %v", fileKey, got, want)
		}
	})
	t.Run("paths", func(t *testing.T) {
		if got, want := d.StorePath(), filepath.Join(d.Path, "state.db"); got != want {
			t.Errorf("StorePath: got %q, want %q", got, want)
		}
		pemData, err := os.ReadFile(d.BundlePEMPath())
		if err != nil {
			t.Fatalf("bundle PEM: %v", err)
		}
		b, err := bundle.ParsePEM(td, 0, pemData)
		if err != nil {
			t.Fatalf("bundle.ParsePEM: %v", err)
		}
		if got, want := b.Digest(), a.Bundle().Digest(); got != want {
			t.Errorf("bundle PEM digest: got %q, want %q", got, want)
		}
	})
}

func TestInitRefusesExistingDir(t *testing.T) {
	a := newCA(t)
	d := initDir(t, a)
	first := d.Chain[0]

	tests := []struct {
		name      string
		force     bool
		wantErr   bool
		wantFresh bool // a new intermediate replaced the first
	}{
		{name: "without force", force: false, wantErr: true},
		{name: "with force", force: true, wantFresh: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Init(t.Context(), d.Path, testCluster, rootAuthority{a}, 0, tt.force)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("Init: got nil error, want a refusal")
				}
				if !strings.Contains(err.Error(), "already") {
					t.Errorf("Init: got %q, want it to say the directory is already initialized", err)
				}
			} else if err != nil {
				t.Fatalf("Init: got %v, want nil", err)
			} else if got.Chain[0].Equal(first) {
				t.Errorf("Init returned the old intermediate, want a new one")
			}
			onDisk, err := Load(d.Path)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if fresh := !onDisk.Chain[0].Equal(first); fresh != tt.wantFresh {
				t.Errorf("intermediate replaced: got %v, want %v", fresh, tt.wantFresh)
			}
			if !keysMatch(onDisk.Chain[0].PublicKey, onDisk.Signer.Public()) {
				t.Errorf("signer on disk: got a key that does not match the intermediate, want its key")
			}
		})
	}
}

func TestInitRefusesBadCluster(t *testing.T) {
	a := newCA(t)
	tests := []struct {
		name    string
		cluster string
	}{
		{name: "empty", cluster: ""},
		{name: "upper case", cluster: "East"},
		{name: "underscore", cluster: "east_1"},
		{name: "leading dash", cluster: "-east"},
		{name: "dot", cluster: "east.one"},
		{name: "too long", cluster: strings.Repeat("a", 64)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "cp")
			if _, err := Init(t.Context(), path, tt.cluster, rootAuthority{a}, 0, false); err == nil {
				t.Fatalf("Init(%q): got nil error, want a refusal", tt.cluster)
			}
			if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("Stat(%s): got %v, want it not to exist", path, err)
			}
		})
	}
}

func TestInitRootFailure(t *testing.T) {
	a := newCA(t)
	boom := errors.New("root offline")
	tests := []struct {
		name    string
		root    RootAuthority
		wantErr error  // matched with errors.Is, if set
		wantMsg string // contained in the error
	}{
		{name: "no bundle", root: fakeRoot{signErr: boom}, wantMsg: "no trust bundle"},
		{name: "signing fails", root: fakeRoot{bundle: a.Bundle(), signErr: boom}, wantErr: boom, wantMsg: "sign intermediate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "cp")
			_, err := Init(t.Context(), path, testCluster, tt.root, 0, false)
			if err == nil {
				t.Fatal("Init: got nil error, want one")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("Init: got %v, want an error wrapping %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("Init: got %q, want it to contain %q", err, tt.wantMsg)
			}
			// Nothing that makes a data directory was written.
			if _, err := Load(path); !errors.Is(err, ErrNotInitialized) {
				t.Errorf("Load after a failed Init: got %v, want %v", err, ErrNotInitialized)
			}
			for _, f := range []string{fileKey, fileIntermediate, fileBundle, fileCluster} {
				if _, err := os.Stat(filepath.Join(path, f)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("Stat(%s): got %v, want it not to exist", f, err)
				}
			}
		})
	}
}

func TestLoadEmptyDir(t *testing.T) {
	tests := []struct {
		name string
		path func(t *testing.T) string
	}{
		{name: "empty directory", path: func(t *testing.T) string { return t.TempDir() }},
		{name: "missing directory", path: func(t *testing.T) string { return filepath.Join(t.TempDir(), "nope") }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tt.path(t)
			d, err := Load(path)
			if !errors.Is(err, ErrNotInitialized) {
				t.Fatalf("Load: got (%v, %v), want an error wrapping %v", d, err, ErrNotInitialized)
			}
			if !strings.Contains(err.Error(), path) {
				t.Errorf("Load: got %q, want it to name %s", err, path)
			}
		})
	}
}

func TestLoadCorrupt(t *testing.T) {
	a := newCA(t)
	good := initDir(t, a)
	certPEM, err := os.ReadFile(filepath.Join(good.Path, fileIntermediate))
	if err != nil {
		t.Fatal(err)
	}

	const junkPEM = "-----BEGIN %s-----\nAAAA\n-----END %s-----\n"
	pemOf := func(typ string) string { return strings.ReplaceAll(junkPEM, "%s", typ) }
	tests := []struct {
		name     string
		file     string
		content  string // "" with remove: the file is deleted
		remove   bool
		wantFile string // the error names this file
	}{
		{name: "cluster.json not JSON", file: fileCluster, content: "{not json", wantFile: fileCluster},
		{name: "cluster.json empty", file: fileCluster, content: "", wantFile: fileCluster},
		{name: "cluster.json bad trust domain", file: fileCluster, content: `{"cluster":"east","trust_domain":"Not A Domain!"}`, wantFile: fileCluster},
		{name: "cluster.json no trust domain", file: fileCluster, content: `{"cluster":"east"}`, wantFile: fileCluster},
		{name: "intermediate.pem not PEM", file: fileIntermediate, content: "garbage", wantFile: fileIntermediate},
		{name: "intermediate.pem bad certificate", file: fileIntermediate, content: pemOf("CERTIFICATE"), wantFile: fileIntermediate},
		{name: "intermediate.pem missing", file: fileIntermediate, remove: true, wantFile: fileIntermediate},
		{name: "intermediate-key.pem not PEM", file: fileKey, content: "garbage", wantFile: fileKey},
		{name: "intermediate-key.pem empty", file: fileKey, content: "", wantFile: fileKey},
		{name: "intermediate-key.pem bad key", file: fileKey, content: pemOf("PRIVATE KEY"), wantFile: fileKey},
		{name: "intermediate-key.pem holds a certificate", file: fileKey, content: string(certPEM), wantFile: fileKey},
		{name: "intermediate-key.pem missing", file: fileKey, remove: true, wantFile: fileKey},
		{name: "bundle.json not JSON", file: fileBundle, content: "{not json", wantFile: fileBundle},
		{name: "bundle.json empty object", file: fileBundle, content: "{}", wantFile: fileBundle},
		{name: "bundle.json null", file: fileBundle, content: "null", wantFile: fileBundle},
		{name: "bundle.json no keys", file: fileBundle, content: `{"keys":[],"spiffe_sequence":1}`, wantFile: fileBundle},
		{name: "bundle.json bad key", file: fileBundle, content: `{"keys":[{"kty":"EC","use":"x509-svid"}],"spiffe_sequence":1}`, wantFile: fileBundle},
		{name: "bundle.json missing", file: fileBundle, remove: true, wantFile: fileBundle},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := copyDir(t, good.Path)
			target := filepath.Join(path, tt.file)
			if tt.remove {
				if err := os.Remove(target); err != nil {
					t.Fatal(err)
				}
			} else if err := os.WriteFile(target, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			d, err := Load(path)
			if err == nil {
				t.Fatalf("Load: got %+v, want an error", d)
			}
			if errors.Is(err, ErrNotInitialized) {
				t.Errorf("Load: got %v, want an error other than %v", err, ErrNotInitialized)
			}
			if !strings.Contains(err.Error(), tt.wantFile) {
				t.Errorf("Load: got %q, want it to name %s", err, tt.wantFile)
			}
		})
	}
}

// copyDir copies the regular files of src into a new temporary directory.
func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "cp")
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatalf("copy %s: %v", src, err)
	}
	return dst
}

func TestMintAdmin(t *testing.T) {
	a := newCA(t)
	d := initDir(t, a)
	iss, err := ca.NewIssuer(ca.IssuerConfig{TrustDomain: d.TrustDomain, Chain: d.Chain, Signer: d.Signer})
	if err != nil {
		t.Fatalf("ca.NewIssuer: %v", err)
	}
	s, err := d.MintAdmin(iss, time.Hour)
	if err != nil {
		t.Fatalf("MintAdmin: %v", err)
	}
	wantID := spiffeid.RequireFromString("spiffe://" + testTD + "/cluster/" + testCluster + "/admin")
	if s.ID != wantID {
		t.Errorf("returned SVID ID: got %s, want %s", s.ID, wantID)
	}

	certPath, keyPath := d.AdminPaths()
	tests := []struct {
		name string
		path string
		mode os.FileMode
	}{
		{name: "key", path: keyPath, mode: 0o600},
		{name: "certificate", path: certPath, mode: 0o644},
	}
	for _, tt := range tests {
		t.Run(tt.name+" file mode", func(t *testing.T) {
			fi, err := os.Stat(tt.path)
			if err != nil {
				t.Fatal(err)
			}
			if got := fi.Mode().Perm(); got != tt.mode {
				t.Errorf("mode of %s: got %v, want %v", tt.path, got, tt.mode)
			}
		})
	}

	t.Run("SVID on disk verifies", func(t *testing.T) {
		loaded, err := x509svid.Load(certPath, keyPath)
		if err != nil {
			t.Fatalf("x509svid.Load: %v", err)
		}
		if loaded.ID != wantID {
			t.Errorf("ID on disk: got %s, want %s", loaded.ID, wantID)
		}
		id, _, err := x509svid.Verify(loaded.Certificates, d.Bundle)
		if err != nil {
			t.Fatalf("x509svid.Verify: got %v, want nil", err)
		}
		if id != wantID {
			t.Errorf("verified ID: got %s, want %s", id, wantID)
		}
		if !bytes.Equal(loaded.Certificates[0].Raw, s.Certificates[0].Raw) {
			t.Errorf("certificate on disk: got serial %s, want the returned SVID's %s", loaded.Certificates[0].SerialNumber, s.Certificates[0].SerialNumber)
		}
		if ttl := loaded.Certificates[0].NotAfter.Sub(loaded.Certificates[0].NotBefore); ttl > time.Hour+time.Minute {
			t.Errorf("lifetime: got %v, want at most about %v", ttl, time.Hour)
		}
	})
}

func TestWriteReadBundle(t *testing.T) {
	a := newCA(t)
	d := initDir(t, a)
	roots := a.Bundle().Roots()
	otherRoots := newCA(t).Bundle().Roots()

	tests := []struct {
		name  string
		seq   uint64
		roots []*x509.Certificate
	}{
		{name: "same roots, next sequence", seq: a.Bundle().Sequence() + 1, roots: roots},
		{name: "two roots", seq: a.Bundle().Sequence() + 2, roots: append(append([]*x509.Certificate{}, roots...), otherRoots...)},
		{name: "other root only", seq: 99, roots: otherRoots},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := bundle.New(td, tt.seq, tt.roots)
			if err != nil {
				t.Fatalf("bundle.New: %v", err)
			}
			if err := WriteBundle(d.Path, b); err != nil {
				t.Fatalf("WriteBundle: %v", err)
			}
			got, err := d.ReadBundle()
			if err != nil {
				t.Fatalf("ReadBundle: %v", err)
			}
			if got.Digest() != b.Digest() {
				t.Errorf("digest: got %q, want %q", got.Digest(), b.Digest())
			}
			if got.Sequence() != b.Sequence() {
				t.Errorf("sequence: got %d, want %d", got.Sequence(), b.Sequence())
			}
			pemData, err := os.ReadFile(d.BundlePEMPath())
			if err != nil {
				t.Fatal(err)
			}
			fromPEM, err := bundle.ParsePEM(td, 0, pemData)
			if err != nil {
				t.Fatalf("bundle.ParsePEM: %v", err)
			}
			if fromPEM.Digest() != b.Digest() {
				t.Errorf("PEM digest: got %q, want %q", fromPEM.Digest(), b.Digest())
			}
			reloaded, err := Load(d.Path)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if reloaded.Bundle.Digest() != b.Digest() || reloaded.Bundle.Sequence() != b.Sequence() {
				t.Errorf("Load bundle: got %q seq %d, want %q seq %d", reloaded.Bundle.Digest(), reloaded.Bundle.Sequence(), b.Digest(), b.Sequence())
			}
		})
	}

	t.Run("unreadable bundle file", func(t *testing.T) {
		if err := os.WriteFile(filepath.Join(d.Path, fileBundle), []byte("{"), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := d.ReadBundle(); err == nil || !strings.Contains(err.Error(), fileBundle) {
			t.Errorf("ReadBundle: got %v, want an error naming %s", err, fileBundle)
		}
	})
}

// TestReadBundleRepairsPEM: a crash between WriteBundle's JWKS and its PEM
// copy leaves the copy on the old roots; ReadBundle rewrites it.
func TestReadBundleRepairsPEM(t *testing.T) {
	a := newCA(t)
	d := initDir(t, a)
	old := a.Bundle()
	next, err := bundle.New(td, old.Sequence()+1, append(old.Roots(), newCA(t).Bundle().Roots()...))
	if err != nil {
		t.Fatal(err)
	}
	js, err := next.MarshalJWKS()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(d.BundlePath(), js, 0o644); err != nil { // the JWKS written, then the crash
		t.Fatal(err)
	}
	if _, err := d.ReadBundle(); err != nil {
		t.Fatal(err)
	}
	pemData, err := os.ReadFile(d.BundlePEMPath())
	if err != nil {
		t.Fatal(err)
	}
	if fromPEM, err := bundle.ParsePEM(td, 0, pemData); err != nil || fromPEM.Digest() != next.Digest() {
		t.Errorf("PEM copy after ReadBundle: %v, digest %v; want the JWKS's roots", err, fromPEM)
	}
}

// TestLoadAfterACrashInInit: Init --force writes the new intermediate
// beside as .next, then the key, then the certificate. A crash after the
// key leaves the old certificate with the new key: Load puts the .next
// copy in place.
func TestLoadAfterACrashInInit(t *testing.T) {
	a := newCA(t)
	d := initDir(t, a)
	renewed := initDir(t, a) // a second intermediate for the cluster, with its own key
	key, err := os.ReadFile(filepath.Join(renewed.Path, fileKey))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := os.ReadFile(filepath.Join(renewed.Path, fileIntermediate))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d.Path, fileIntermediate)+".next", cert, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(d.Path, fileKey), key, 0o600); err != nil { // then the crash
		t.Fatal(err)
	}
	got, err := Load(d.Path)
	if err != nil {
		t.Fatalf("Load after a crash between the key and the certificate: %v", err)
	}
	if !got.Chain[0].Equal(renewed.Chain[0]) {
		t.Error("Load did not take the new certificate")
	}
	if _, err := os.Stat(filepath.Join(d.Path, fileIntermediate) + ".next"); !os.IsNotExist(err) {
		t.Errorf("the .next copy is still there: %v", err)
	}
	if _, err := Load(d.Path); err != nil {
		t.Errorf("Load again: %v", err)
	}
}
