package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// `strait apply -f -` reads at most 8 MiB of stdin. Input beyond that must
// be refused, not cut off: here the cut falls between two documents, so
// the first would be applied and the second dropped without a word.
func TestApplyStdinOverLimitIsRefused(t *testing.T) {
	const limit = 8 << 20
	first := "apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: first\nspec:\n  service: first\n"
	second := "---\napiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: second\nspec:\n  service: second\n"
	var b strings.Builder
	b.WriteString(first)
	line := "# " + strings.Repeat("x", 1000) + "\n"
	for b.Len()+len(line) <= limit {
		b.WriteString(line)
	}
	b.WriteString(strings.Repeat("#", limit-b.Len()-1) + "\n")
	b.WriteString(second)

	path := filepath.Join(t.TempDir(), "stdin")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	saved := os.Stdin
	os.Stdin = f
	defer func() { os.Stdin = saved }()

	// A config that does not exist: the command must refuse the input
	// before it gets as far as connecting.
	code, _, errOut := cli(t, "apply", "--config", filepath.Join(t.TempDir(), "no-config"), "-f", "-")
	if code == 0 || !strings.Contains(errOut, "more than") {
		t.Fatalf("apply of %d bytes on stdin: exit %d, stderr %q; want a refusal naming the limit", b.Len(), code, errOut)
	}
}
