package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/straitmesh/strait/ca"
)

// cli runs strait with args and returns its exit code, stdout and stderr.
func cli(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(t.Context(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func mustCLI(t *testing.T, args ...string) string {
	t.Helper()
	code, out, errOut := cli(t, args...)
	if code != 0 {
		t.Fatalf("strait %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, out, errOut)
	}
	return out
}

func TestCLIErrors(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	// A gateway whose data dir does not exist: refused flags must be
	// caught before it is read.
	gw := []string{"gateway", "run", "--cluster", "east", "--trust-domain", "strait.example", "--control-plane", "127.0.0.1:1", "--data-dir", filepath.Join(dir, "no-gw")}
	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string
	}{
		{"init needs a trust domain", []string{"ca", "init", "--data-dir", dir}, 2, "--trust-domain is required"},
		{"init needs a data dir", []string{"ca", "init", "--trust-domain", "strait.example"}, 2, "--data-dir is required"},
		{"bad trust domain", []string{"ca", "init", "--data-dir", dir, "--trust-domain", "Bad_TD"}, 1, "trust domain"},
		{"bad cluster", []string{"ca", "init", "--data-dir", dir, "--trust-domain", "strait.example", "--cluster", "East"}, 1, "cluster name"},
		{"bad duration", []string{"ca", "init", "--data-dir", dir, "--trust-domain", "strait.example", "--root-ttl", "ten years"}, 2, "invalid duration"},
		{"status before init", []string{"ca", "status", "--data-dir", dir}, 1, "run 'strait ca init' first"},
		{"unknown flag", []string{"ca", "status", "--nope"}, 2, "unknown flag"},
		{"mistyped subcommand", []string{"ca", "rotate", "retier", "--data-dir", dir}, 2, `unknown command "retier"`},
		{"mistyped group", []string{"ca", "rotat"}, 2, `unknown command "rotat"`},
		{"missing argument", []string{"ca", "rotate", "taint", "--data-dir", dir}, 2, "accepts 1 arg"},
		{"extra argument", []string{"ca", "status", "extra"}, 2, `strait ca status takes no arguments, got "extra"`},
		{"mistyped subcommand before its flags", []string{"federation", "stauts", "--config", "c"}, 2, `unknown command "stauts" for "strait federation"; did you mean status?`},
		{"gateway: negative concurrency", append(gw, "--concurrency", "-1"), 2, "--concurrency must be 0 or more"},
		{"gateway: profiles need an admin port", append(gw, "--profiling"), 2, "--profiling needs --admin"},
		{"token: ttl under a second", []string{"workload", "token", "--service", "web", "--ttl", "900ms"}, 2, "a registration token lives from 10s to 1h0m0s"},
		{"token: ttl over an hour", []string{"workload", "token", "--service", "web", "--ttl", "2h"}, 2, "--ttl 2h0m0s"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errOut := cli(t, tc.args...)
			if code != tc.wantCode || !strings.Contains(errOut, tc.wantErr) {
				t.Fatalf("got exit %d, stderr %q; want exit %d mentioning %q", code, errOut, tc.wantCode, tc.wantErr)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "state.json")); err == nil {
		t.Fatal("a refused init left a CA behind")
	}
}

func TestCLICAWorkflow(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "ca")
	mustCLI(t, "ca", "init", "--trust-domain", "strait.example", "--data-dir", dir, "--cluster", "east")

	code, _, errOut := cli(t, "ca", "init", "--trust-domain", "strait.example", "--data-dir", dir)
	if code == 0 || !strings.Contains(errOut, "--force") {
		t.Fatalf("second init: exit %d, stderr %q; want a refusal mentioning --force", code, errOut)
	}

	out := filepath.Join(base, "web")
	mustCLI(t, "ca", "mint", "--data-dir", dir, "--spiffe-id", "spiffe://strait.example/ns/shop/sa/web", "--ttl", "30m", "--out", out)
	for name, perm := range map[string]os.FileMode{"svid.pem": 0o644, "key.pem": 0o600, "bundle.pem": 0o644} {
		info, err := os.Stat(filepath.Join(out, name))
		if err != nil || info.Mode().Perm() != perm {
			t.Fatalf("%s: got %v, %v; want mode %v", name, info.Mode().Perm(), err, perm)
		}
	}
	if got := mustCLI(t, "ca", "verify", "--data-dir", dir, "--cert", filepath.Join(out, "svid.pem"), "--role", "server"); !strings.Contains(got, "OK: spiffe://strait.example/ns/shop/sa/web") {
		t.Fatalf("verify output %q, want an OK line", got)
	}
	for _, bad := range [][]string{
		{"--spiffe-id", "spiffe://other.example/ns/a/sa/b"},
		{"--spiffe-id", "spiffe://strait.example"},
		{"--spiffe-id", "not-an-id"},
		{"--spiffe-id", "spiffe://strait.example/ns/a/sa/b", "--ttl", "48h"},
	} {
		args := append([]string{"ca", "mint", "--data-dir", dir, "--out", filepath.Join(base, "bad")}, bad...)
		if code, _, _ := cli(t, args...); code == 0 {
			t.Errorf("strait %s: exit 0, want a refusal", strings.Join(args, " "))
		}
	}

	var st ca.Status
	if err := json.Unmarshal([]byte(mustCLI(t, "ca", "status", "--data-dir", dir, "-o", "json")), &st); err != nil {
		t.Fatalf("status -o json: %v", err)
	}
	if st.TrustDomain != "strait.example" || len(st.Roots) != 1 || len(st.Intermediates) != 1 || st.Bundle.Sequence != 1 {
		t.Fatalf("status: got %+v", st)
	}

	mustCLI(t, "ca", "rotate", "prepare", "--data-dir", dir)
	mustCLI(t, "ca", "rotate", "activate", "--data-dir", dir)
	if code, _, errOut := cli(t, "ca", "rotate", "retire", "--data-dir", dir); code != 1 || !strings.Contains(errOut, "may be in use until") {
		t.Fatalf("retire right after activate: exit %d, %q; want a refusal naming when it may run", code, errOut)
	}
	got := mustCLI(t, "ca", "rotate", "retire", "--force", "--data-dir", dir)
	if !strings.Contains(got, "bundle sequence 3") {
		t.Fatalf("retire output %q, want bundle sequence 3", got)
	}
	if got := mustCLI(t, "ca", "status", "--data-dir", dir); !strings.Contains(got, "retired") || !strings.Contains(got, "east") {
		t.Fatalf("status text %q, want a retired root and east's intermediate", got)
	}
	if got := mustCLI(t, "ca", "bundle", "--data-dir", dir); !strings.Contains(got, `"spiffe_sequence": 3`) {
		t.Fatalf("bundle JWKS %q, want spiffe_sequence 3", got)
	}
}

func TestDemo(t *testing.T) {
	out := mustCLI(t, "demo", "--dir", t.TempDir(), "--proxy-bin", buildProxy(t))
	for _, want := range []string{"OK: spiffe://demo.strait.example/ns/shop/sa/frontend", "REFUSED (untrusted)",
		`"caller":"spiffe://strait.example/ns/default/sa/frontend"`, "HTTP 502", "spec.from[0].spifeID: unknown field",
		`strait_proxy_requests_total{destination="backend",direction="inbound",response_class="2xx"`, "Demo complete",
		"failover: last answer from east -> first answer from west", "failback: the first answer from east came",
		"the whole act, failover and failback:", "prepare acknowledged by 3 clusters", "retire acknowledged by 3 clusters",
		"requests during the rotation:", "still run (no restart)"} {
		if !strings.Contains(out, want) {
			t.Fatalf("demo output lacks %q:\n%s", want, out)
		}
	}
}

func TestVersion(t *testing.T) {
	if out := mustCLI(t, "version"); !strings.HasPrefix(out, "strait ") {
		t.Fatalf("version output %q", out)
	}
}
