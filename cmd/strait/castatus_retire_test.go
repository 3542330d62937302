package main

import (
	"path/filepath"
	"regexp"
	"testing"
)

// TestCAStatusShowsRetireAfter: docs/ca.md says `ca status` shows when an
// old root becomes retirable (retire_after); the text output, the default,
// showed it nowhere (only -o json had it).
func TestCAStatusShowsRetireAfter(t *testing.T) {
	caDir := filepath.Join(t.TempDir(), "ca")
	mustCLI(t, "ca", "init", "--trust-domain", "strait.example", "--data-dir", caDir, "--cluster", "east")
	if out := mustCLI(t, "ca", "status", "--data-dir", caDir); regexp.MustCompile(`can be retired after`).MatchString(out) {
		t.Fatalf("ca status before any rotation names a retirable root:\n%s", out)
	}
	mustCLI(t, "ca", "rotate", "prepare", "--data-dir", caDir)
	mustCLI(t, "ca", "rotate", "activate", "--data-dir", caDir)
	out := mustCLI(t, "ca", "status", "--data-dir", caDir)
	if !regexp.MustCompile(`Root [0-9a-f]+ can be retired after \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ`).MatchString(out) {
		t.Errorf("ca status after activate:\n%s\nwant the old root's retire time", out)
	}
}
