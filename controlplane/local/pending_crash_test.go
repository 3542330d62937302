package local

import (
	"crypto/x509"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestResumeOnlyFinishesThisKeysJoin: Resume completes a pending
// directory only from an intermediate for its own key with the bundle
// received beside it. A directory initialized pending again with --force
// over one that had joined keeps the old intermediate and bundle files:
// they are not this key's, and it stays pending; so does one whose crash
// came before the bundle was written.
func TestResumeOnlyFinishesThisKeysJoin(t *testing.T) {
	a := newCA(t)
	d := initDir(t, a)
	p, err := InitPending(d.Path, testCluster, td, true)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := p.Resume(); got != nil || err != nil {
		t.Fatalf("Resume with the previous key's intermediate: %v, %v; want nothing to finish", got, err)
	}
	if _, err := Load(d.Path); !errors.Is(err, ErrPending) {
		t.Fatalf("Load after Resume: %v, want still pending", err)
	}

	// This key's intermediate, but the crash came before the bundle.
	p2, err := InitPending(filepath.Join(t.TempDir(), "cp"), testCluster, td, false)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := p2.CSR()
	if err != nil {
		t.Fatal(err)
	}
	c, err := rootAuthority{a}.SignIntermediate(t.Context(), testCluster, csr, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p2.Complete([]*x509.Certificate{c}, a.Bundle()); err != nil {
		t.Fatal(err)
	}
	// Back to the state of a crash right after the intermediate's write.
	if err := os.Remove(filepath.Join(p2.Path, fileBundle)); err != nil {
		t.Fatal(err)
	}
	cf, _ := readClusterFile(p2.Path)
	cf.Pending = true
	writeClusterFile(t, p2.Path, cf)
	// (Complete removed the bootstrap CA LoadPending reads: p2 stands in.)
	if got, err := p2.Resume(); got != nil || err != nil {
		t.Fatalf("Resume without the bundle: %v, %v; want nothing to finish", got, err)
	}
	// With the bundle back it finishes.
	if err := WriteBundle(p2.Path, a.Bundle()); err != nil {
		t.Fatal(err)
	}
	got, err := p2.Resume()
	if err != nil || got == nil {
		t.Fatalf("Resume with the intermediate and the bundle: %v, %v; want the joined directory", got, err)
	}
	if !ownsKey(got.Chain[0], p2.Key) {
		t.Fatal("Resume installed an intermediate for another key")
	}
}

func writeClusterFile(t *testing.T, path string, cf clusterFile) {
	t.Helper()
	raw, err := json.Marshal(cf)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(path, fileCluster), raw, 0o644); err != nil {
		t.Fatal(err)
	}
}
