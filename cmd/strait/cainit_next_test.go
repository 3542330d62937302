package main

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestCAInitNextStep: `strait ca init` without --cluster prints the next
// step. docs/local-mode.md's next step is `strait controlplane init
// --ca-dir`; the hint named only `strait ca intermediate create`, after
// which `controlplane init` for that cluster is refused (its intermediate's
// key is held in the CA directory).
func TestCAInitNextStep(t *testing.T) {
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	out := mustCLI(t, "ca", "init", "--trust-domain", "strait.example", "--data-dir", caDir)
	want := "Next: per cluster, strait controlplane init --dir DIR --cluster NAME --ca-dir " + caDir
	if !strings.Contains(out, want) {
		t.Fatalf("ca init printed:\n%s\nwant a line %q", out, want)
	}
	// The step it names works as printed.
	mustCLI(t, "controlplane", "init", "--dir", filepath.Join(dir, "east"), "--cluster", "east", "--ca-dir", caDir)
}
