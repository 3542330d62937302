package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A dev.json that cannot be read (truncated, hand-edited) must stop
// `strait dev up`: it is what tells dev up whether DIR is already up and
// which cluster holds the mesh root. Ignoring it would start a second set
// of processes beside the running one, or a second root authority, and
// then overwrite the record of what runs.
func TestDevUpRefusesCorruptDevFile(t *testing.T) {
	dir := t.TempDir()
	corrupt := []byte(`{"trustDomain": "strait.example", "clusters": [{"name": "east", "rootAuthority": tr`)
	if err := os.WriteFile(filepath.Join(dir, "dev.json"), corrupt, 0o644); err != nil {
		t.Fatal(err)
	}
	// An empty trust domain and a missing proxy binary: whatever the
	// current code gets to after dev.json fails fast and starts nothing.
	err := devUp(t.Context(), &globals{stdout: os.Stdout, stderr: os.Stderr}, dir, devUpOptions{
		clusters: []string{"west"}, proxyBin: filepath.Join(dir, "no-such-proxy"),
	})
	if err == nil || !strings.Contains(err.Error(), "dev.json") {
		t.Fatalf("dev up over a corrupt dev.json: got %v, want an error naming dev.json", err)
	}
	got, rerr := os.ReadFile(filepath.Join(dir, "dev.json"))
	if rerr != nil || string(got) != string(corrupt) {
		t.Fatalf("dev.json changed: %q, %v", got, rerr)
	}
	if _, err := os.Stat(filepath.Join(dir, "ca")); err == nil {
		t.Fatal("dev up created a mesh CA beside a dev.json it could not read")
	}
}
