package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func initTest(t *testing.T, cfg Config, opts InitOptions) *Authority {
	t.Helper()
	if opts.TrustDomain.IsZero() {
		opts.TrustDomain = crashTD
	}
	a, err := Init(t.Context(), cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

func keyFiles(t *testing.T, dir string) []string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, keysDir, "*"))
	return files
}

// Once state.json is replaced the transition happened: a failure to write
// the derived bundle files must not be reported as a failed transition.
func TestBundleFileFailureAfterCommitIsNotAFailure(t *testing.T) {
	dir := t.TempDir()
	a := initTest(t, Config{Dir: dir}, InitOptions{})
	testHookBeforeRename = func(path string) error {
		if filepath.Base(path) == bundlePEMFile {
			return errors.New("disk full")
		}
		return nil
	}
	_, err := a.Prepare(t.Context(), PrepareOptions{})
	testHookBeforeRename = nil
	if err != nil {
		t.Fatalf("Prepare: got %v, want success (state was committed)", err)
	}
	if got := a.Bundle().Sequence(); got != 2 {
		t.Fatalf("sequence: got %d, want 2", got)
	}
	a.Close()
	b, err := Open(t.Context(), Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	pemOnDisk, _ := os.ReadFile(filepath.Join(dir, bundlePEMFile))
	if string(pemOnDisk) != string(b.Bundle().MarshalPEM()) {
		t.Fatal("bundle.pem was not rebuilt on open")
	}
}

func TestKMSURI(t *testing.T) {
	dir := t.TempDir()
	a := initTest(t, Config{Dir: dir}, InitOptions{KMS: "softkms:"})
	if _, err := a.CreateIntermediate(t.Context(), "east", 0, false); err != nil {
		t.Fatalf("softkms: URI must keep keys (as files): %v", err)
	}
	if got := len(keyFiles(t, dir)); got != 2 {
		t.Fatalf("key files: got %d, want 2", got)
	}
	if _, err := Init(t.Context(), Config{Dir: t.TempDir()}, InitOptions{TrustDomain: crashTD, KMS: "nosuchkms:foo"}); err == nil {
		t.Fatal("Init with an unknown KMS: got no error, want one")
	}
}

func TestMalformedStateIsAnError(t *testing.T) {
	dir := t.TempDir()
	a := initTest(t, Config{Dir: dir}, InitOptions{})
	a.Close()
	good, _ := os.ReadFile(filepath.Join(dir, stateFile))
	for name, edit := range map[string]func(string) string{
		"null root":         func(s string) string { return strings.Replace(s, `"roots": [`, `"roots": [null,`, 1) },
		"null intermediate": func(s string) string { return strings.Replace(s, `"roots"`, `"intermediates": [null], "roots"`, 1) },
		"unknown root of im": func(s string) string {
			return strings.Replace(s, `"roots"`, `"intermediates": [{"cluster":"x","root_id":"zz"}], "roots"`, 1)
		},
		"unknown field": func(s string) string { return strings.Replace(s, `"roots"`, `"rootz": 1, "roots"`, 1) },
		"truncated":     func(s string) string { return s[:len(s)/2] },
	} {
		if err := os.WriteFile(filepath.Join(dir, stateFile), []byte(edit(string(good))), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(t.Context(), Config{Dir: dir, ReadOnly: true}); err == nil {
			t.Errorf("%s: Open got no error, want one", name)
		}
	}
}

func TestSignDoesNotSilentlyReplaceAHeldIntermediate(t *testing.T) {
	dir := t.TempDir()
	a := initTest(t, Config{Dir: dir}, InitOptions{})
	if _, err := a.CreateIntermediate(t.Context(), "east", 0, false); err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if _, err := a.SignIntermediate(t.Context(), IntermediateRequest{Cluster: "east", CSR: csr}); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("sign over a held intermediate: got %v, want a refusal mentioning --force", err)
	}
	if _, err := a.Issuer("east"); err != nil {
		t.Fatalf("east's held intermediate was lost: %v", err)
	}
	if _, err := a.SignIntermediate(t.Context(), IntermediateRequest{Cluster: "east", CSR: csr, Replace: true}); err != nil {
		t.Fatal(err)
	}
	if got := len(keyFiles(t, dir)); got != 1 {
		t.Fatalf("key files after replacing with a remote intermediate: got %d, want 1 (root)", got)
	}
}

func TestActivateKeepsIntermediateExpiry(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	a := initTest(t, Config{Dir: t.TempDir(), Clock: clock}, InitOptions{})
	ctx := t.Context()
	long, _ := a.CreateIntermediate(ctx, "east", 48*time.Hour, false)
	if _, err := a.CreateIntermediate(ctx, "west", 24*time.Hour, false); err != nil {
		t.Fatal(err)
	}
	now = now.Add(30 * time.Hour) // west has expired, east has 18h left
	if _, err := a.Prepare(ctx, PrepareOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := a.Activate(ctx); err != nil {
		t.Fatal(err)
	}
	for _, im := range a.Status().Intermediates {
		switch im.Cluster {
		case "east":
			if !im.NotAfter.Equal(long.NotAfter) || im.State != "valid" {
				t.Errorf("east after activate: %s until %s, want valid until %s", im.State, im.NotAfter, long.NotAfter)
			}
		case "west":
			if im.State != "expired" {
				t.Errorf("west after activate: %s, want expired (not revived)", im.State)
			}
		}
	}
}

func TestInitForceContinuesSequence(t *testing.T) {
	dir := t.TempDir()
	a := initTest(t, Config{Dir: dir}, InitOptions{})
	a.Prepare(t.Context(), PrepareOptions{})
	a.Activate(t.Context())
	a.Retire(t.Context(), RetireOptions{Force: true})
	a.Close()
	b := initTest(t, Config{Dir: dir}, InitOptions{Force: true})
	if got := b.Bundle().Sequence(); got != 4 {
		t.Fatalf("sequence after init --force over sequence 3: got %d, want 4", got)
	}
}

func TestFailedTransitionLeavesNoKeys(t *testing.T) {
	dir := t.TempDir()
	a := initTest(t, Config{Dir: dir}, InitOptions{})
	before := len(keyFiles(t, dir))
	testHookBeforeRename = func(path string) error {
		if filepath.Base(path) == stateFile {
			return errors.New("injected")
		}
		return nil
	}
	_, err1 := a.Prepare(t.Context(), PrepareOptions{})
	_, err2 := a.CreateIntermediate(t.Context(), "east", 0, false)
	testHookBeforeRename = nil
	if err1 == nil || err2 == nil {
		t.Fatalf("transitions with a failing commit: got %v, %v; want errors", err1, err2)
	}
	if got := len(keyFiles(t, dir)); got != before {
		t.Fatalf("key files after failed transitions: got %d, want %d", got, before)
	}
}

func TestKeyReferencesStayInKeysDir(t *testing.T) {
	k := &keyStore{dir: t.TempDir()}
	for _, ref := range []string{"../victim", "/etc/passwd", "keys/../../x", "state.json", "keys/./a.key", ""} {
		if _, err := k.path(ref); err == nil {
			t.Errorf("path(%q): got no error, want one", ref)
		}
	}
	if _, err := k.path("keys/root-abc.key"); err != nil {
		t.Errorf("path(keys/root-abc.key): %v", err)
	}
	_ = context.Background
}
