package atomicfile

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	if err := WriteFile(path, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	if err := WriteFileHook(path, []byte("two"), 0o600, func(string) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("hook error: got %v, want boom", err)
	}
	got, _ := os.ReadFile(path)
	info, _ := os.Stat(path)
	if string(got) != "one" || info.Mode().Perm() != 0o600 {
		t.Fatalf("after aborted write: got %q mode %v, want \"one\" 0600", got, info.Mode().Perm())
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("temporary files left: %d entries, want 1", len(entries))
	}
}
