package svidfile

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/straitmesh/strait/ca/catest"
)

// TestSaveThenLoad: Save leaves the pair and no .next file; Load reads it
// back, recovers the pair a crash between the key and the chain leaves,
// and reports a missing pair as os.ErrNotExist.
func TestSaveThenLoad(t *testing.T) {
	c := catest.New(t, "strait.example")
	dir := t.TempDir()
	cp, kp := filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid-key.pem")
	if _, err := Load(cp, kp); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Load of nothing: %v, want os.ErrNotExist", err)
	}
	old := c.SVID(t, "spiffe://strait.example/ns/a/sa/b", 0)
	if err := Save(old, cp, kp); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(cp + NextSuffix); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Save left %s%s: %v", cp, NextSuffix, err)
	}
	if fi, err := os.Stat(kp); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v, %v; want mode 0600", fi, err)
	}
	got, err := Load(cp, kp)
	if err != nil || !got.Certificates[0].Equal(old.Certificates[0]) {
		t.Fatalf("Load after Save: %v", err)
	}
	// A crash after the new key: Load takes the new chain beside it.
	renewed := c.SVID(t, "spiffe://strait.example/ns/a/sa/b", 0)
	certPEM, keyPEM, err := renewed.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(cp+NextSuffix, certPEM, 0o644)
	os.WriteFile(kp, keyPEM, 0o600)
	if got, err := Load(cp, kp); err != nil || !got.Certificates[0].Equal(renewed.Certificates[0]) {
		t.Fatalf("Load after a crash between the key and the chain: %v", err)
	}
}

// TestLoadFirstSaveCutShort: the first Save, cut short after the key and
// before the chain, leaves no CERT, only CERT.next and KEY: Load takes
// that pair (a sidecar would otherwise start over with its spent token).
func TestLoadFirstSaveCutShort(t *testing.T) {
	c := catest.New(t, "strait.example")
	dir := t.TempDir()
	cp, kp := filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid-key.pem")
	s := c.SVID(t, "spiffe://strait.example/ns/a/sa/b", 0)
	certPEM, keyPEM, err := s.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(cp+NextSuffix, certPEM, 0o644)
	os.WriteFile(kp, keyPEM, 0o600)
	if got, err := Load(cp, kp); err != nil || !got.Certificates[0].Equal(s.Certificates[0]) {
		t.Fatalf("Load after the first Save was cut short: %v", err)
	}
	// CERT.next alone, without its key, is still nothing to load.
	os.Remove(kp)
	if _, err := Load(cp, kp); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Load of a chain without its key: %v, want os.ErrNotExist", err)
	}
}
