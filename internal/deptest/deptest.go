// Package deptest keeps the import graph true to the architecture: a test
// names a package and the module paths it must never pull in, and fails if
// `go list -deps` finds one (as Tailscale's tstest/deptest does for its
// relay server). It is for tests only.
package deptest

import (
	"os/exec"
	"strings"
	"testing"
)

// Forbidden import prefixes shared by the lean packages.
var (
	SmallStep = []string{"github.com/smallstep/", "go.step.sm/"}
	ClientGo  = []string{"k8s.io/client-go", "k8s.io/apimachinery"}
	QUIC      = []string{"github.com/quic-go/"}
)

// Check fails t if pkg (an import path) depends on any path starting with
// one of the forbidden prefixes, naming the offender and who imports it.
func Check(t *testing.T, pkg string, forbidden ...[]string) {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", "-f", `{{.ImportPath}}{{range .Imports}} {{.}}{{end}}`, pkg).Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("go list -deps %s: %v\n%s", pkg, err, stderr)
	}
	var deps []string
	importers := map[string]string{}
	for line := range strings.SplitSeq(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		deps = append(deps, fields[0])
		for _, imp := range fields[1:] {
			if _, seen := importers[imp]; !seen {
				importers[imp] = fields[0]
			}
		}
	}
	for _, dep := range deps {
		by := importers[dep]
		for _, group := range forbidden {
			for _, prefix := range group {
				if strings.HasPrefix(dep, prefix) {
					t.Errorf("%s depends on %s (imported by %s); it must not", pkg, dep, by)
				}
			}
		}
	}
}
