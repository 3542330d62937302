package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/federation/token"
)

// noGRPCJargon fails if a message a user reads carries gRPC's own wording
// instead of saying what is wrong.
func noGRPCJargon(t *testing.T, errOut string) {
	t.Helper()
	for _, jargon := range []string{"rpc error", "code =", "desc =", "transport:", "not implemented", "unknown service", "unmarshaling", "goroutine "} {
		if strings.Contains(errOut, jargon) {
			t.Errorf("stderr carries %q:\n%s", jargon, errOut)
		}
	}
}

func TestClientConfigMistakesAreNamed(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "strait.config")
	if err := writeClientConfig(cfg, &clientConfig{CurrentContext: "east", Contexts: []clientContext{{Name: "east", Cluster: "east", Server: "127.0.0.1:1", TrustDomain: "strait.example"}}}); err != nil {
		t.Fatal(err)
	}
	devJSON := filepath.Join(dir, "dev.json")
	if err := os.WriteFile(devJSON, []byte(`{"trustDomain": "strait.example", "caDir": "ca", "clusters": []}`), 0o600); err != nil {
		t.Fatal(err)
	}
	resource := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(resource, []byte("apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: a}\nspec: {service: b}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	empty := t.TempDir()
	for _, tc := range []struct {
		name, config, want string
	}{
		{"missing file", filepath.Join(dir, "nope.config"), "no such file (`strait dev up --dir DIR` writes one to DIR/strait.config)"},
		{"the dev directory", dir, "is a directory; did you mean --config " + cfg + "?"},
		{"a directory without a config", empty, "is a directory, not a client config file"},
		{"dev.json", devJSON, "dev.json is not a strait client config (apiVersion strait.dev/v1alpha1, kind Config;"},
		{"a resource", resource, "policy.yaml is not a strait client config"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errOut := cli(t, "status", "--config", tc.config)
			if code != 1 || !strings.Contains(errOut, tc.want) {
				t.Fatalf("exit %d, stderr %q; want exit 1 saying %q", code, errOut, tc.want)
			}
			noGRPCJargon(t, errOut)
		})
	}
}

func TestUnreachableControlPlaneIsExplained(t *testing.T) {
	fx := newRotationFixture(t, &fakeRotation{})
	fx.stop()
	code, _, errOut := fx.strait(t.Context(), "status")
	want := `cannot reach the control plane of context "east" at ` + fx.addr + `: connection refused; is it running, and is that its address?`
	if code != 1 || !strings.Contains(errOut, want) {
		t.Fatalf("exit %d, stderr %q; want exit 1 saying %q", code, errOut, want)
	}
	noGRPCJargon(t, errOut)
}

func TestWrongServerIsExplained(t *testing.T) {
	fx := newRotationFixture(t, &fakeRotation{})
	// Something that is not a TLS server (an app, a metrics port) at the
	// context's address.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"))
			c.Close()
		}
	}()
	c, err := loadClientConfig(fx.config)
	if err != nil {
		t.Fatal(err)
	}
	c.Contexts[0].Server = lis.Addr().String()
	// loadClientConfig made the paths absolute; they stay valid.
	if err := writeClientConfig(fx.config, c); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := fx.strait(t.Context(), "status")
	for _, want := range []string{"TLS handshake with " + lis.Addr().String() + ` (the server of context "east") failed: `,
		"is " + lis.Addr().String() + " the address of cluster east's control plane"} {
		if code != 1 || !strings.Contains(errOut, want) {
			t.Fatalf("exit %d, stderr %q; want exit 1 saying %q", code, errOut, want)
		}
	}
	noGRPCJargon(t, errOut)
}

func TestUnservedMethodIsExplained(t *testing.T) {
	// The fixture serves only the RotationService, as a pending control
	// plane serves only part of the API.
	fx := newRotationFixture(t, &fakeRotation{})
	code, _, errOut := fx.strait(t.Context(), "get", "tp")
	for _, want := range []string{`the control plane of context "east" at ` + fx.addr + " does not serve List",
		"a cluster installed pending serves only the join", "`strait federation join TOKEN --context east`"} {
		if code != 1 || !strings.Contains(errOut, want) {
			t.Fatalf("exit %d, stderr %q; want exit 1 saying %q", code, errOut, want)
		}
	}
	noGRPCJargon(t, errOut)
}

func TestTokenRevokeChecksTheID(t *testing.T) {
	tok, err := token.New(token.Params{Issuer: "east", TrustDomain: spiffeid.RequireTrustDomainFromString("strait.example"),
		GatewayAddrs: []string{"127.0.0.1:15443"}, BundleDigest: [token.DigestLength]byte{1}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, arg, want string
	}{
		{"too short", "nosuchid", `"nosuchid" is not a join token ID: an ID is 26 characters of a-z and 2-7`},
		{"the token itself", tok.String(), "that is a join token, not its ID: revoke it with `strait federation token revoke " + tok.ID().String() + "`"},
		{"a truncated token", tok.String()[:40], "that looks like a join token, not its ID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Refused before any config is read or control plane dialed.
			code, _, errOut := cli(t, "federation", "token", "revoke", tc.arg)
			if code != 2 || !strings.Contains(errOut, tc.want) {
				t.Fatalf("exit %d, stderr %q; want exit 2 saying %q", code, errOut, tc.want)
			}
		})
	}
}

func TestUsageCheckedBeforeDialing(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"explain -o yaml", []string{"explain", "backend", "-o", "yaml"}, `-o "yaml": want text or json`},
		{"delete an unknown kind", []string{"delete", "bogus", "x"}, `unknown kind "bogus"`},
		{"dev up with SVIDs too short to renew", []string{"dev", "up", "--dir", "unused", "--svid-ttl", "1s"}, "--svid-ttl 1s: at least 10s"},
		// The service account defaults to the service: the service is named.
		{"workload token for a service that is no DNS label", []string{"workload", "token", "--service", "Payments", "--config", "unused"},
			`service "Payments" must be a DNS label: lower-case letters, digits and '-' (it is also the service account unless --service-account is given)`},
		{"workload token for a bad service account", []string{"workload", "token", "--service", "pay", "--service-account", "Web_1", "--config", "unused"},
			`service account "Web_1" must be a DNS label`},
		{"workload token in a bad namespace", []string{"workload", "token", "--service", "pay", "--namespace", "Shop", "--config", "unused"},
			`namespace "Shop" must be a DNS label`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errOut := cli(t, tc.args...)
			if code != 2 || !strings.Contains(errOut, tc.want) {
				t.Fatalf("exit %d, stderr %q; want exit 2 saying %q", code, errOut, tc.want)
			}
		})
	}
}

func TestDevDownWithNothingRunningSucceeds(t *testing.T) {
	dir := t.TempDir()
	code, _, errOut := cli(t, "dev", "down", "--dir", dir)
	if code != 0 || !strings.Contains(errOut, "nothing to stop: "+dir+" has no dev.json") {
		t.Fatalf("exit %d, stderr %q; want exit 0 saying there is nothing to stop in %s", code, errOut, dir)
	}
}

func TestTokenCreateHelpShowsDefaultTTL(t *testing.T) {
	out := mustCLI(t, "federation", "token", "create", "--help")
	if !strings.Contains(out, "lifetime of the token, 1s to 24h (default 15m0s)") {
		t.Fatalf("help does not show --ttl's default:\n%s", out)
	}
}

func TestDevUpChecksProxyBinFirst(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "dev")
	code, _, errOut := cli(t, "dev", "up", "--dir", dir, "--proxy-bin", filepath.Join(dir, "no-such-proxy"))
	if code != 1 || !strings.Contains(errOut, "--proxy-bin "+filepath.Join(dir, "no-such-proxy")+": not an executable file") {
		t.Fatalf("exit %d, stderr %q; want the missing --proxy-bin named", code, errOut)
	}
	if _, err := os.Stat(filepath.Join(dir, "dev.json")); err == nil {
		t.Fatal("dev up started something before finding the proxy missing")
	}
}

func TestLockedCADirSaysWhoHoldsIt(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	mustCLI(t, "ca", "init", "--trust-domain", "strait.example", "--data-dir", dir, "--cluster", "east")
	// Held as a root authority's control plane holds it while it runs.
	a, err := ca.Open(t.Context(), ca.Config{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	code, _, errOut := cli(t, "ca", "mint", "--data-dir", dir, "--spiffe-id", "spiffe://strait.example/ns/a/sa/b", "--out", filepath.Join(t.TempDir(), "out"))
	if code != 1 || !strings.Contains(errOut, "the root authority's control plane (controlplane run --root-authority) holds it while it runs") {
		t.Fatalf("mint: exit %d, stderr %q; want who holds the lock", code, errOut)
	}
	code, _, errOut = cli(t, "controlplane", "init", "--dir", filepath.Join(t.TempDir(), "west"), "--cluster", "west", "--ca-dir", dir)
	if code != 1 || !strings.Contains(errOut, "initialize every cluster before starting it, or init this one with --pending") {
		t.Fatalf("controlplane init: exit %d, stderr %q; want what to do instead", code, errOut)
	}
}

// emptyAdmin lists no resources.
type emptyAdmin struct {
	controlplanev1.UnimplementedAdminServiceServer
}

func (emptyAdmin) List(context.Context, *controlplanev1.ListRequest) (*controlplanev1.ListResponse, error) {
	return &controlplanev1.ListResponse{}, nil
}

func TestGetNothingSaysSo(t *testing.T) {
	fx := newRotationFixture(t, &fakeRotation{})
	fx.stop()
	fx.admin = emptyAdmin{}
	fx.start(t)
	code, out, errOut := fx.strait(t.Context(), "get", "tp", "-n", "shop")
	if code != 0 || out != "" || !strings.Contains(errOut, "no TrafficPolicy found in namespace shop") {
		t.Fatalf("exit %d, stdout %q, stderr %q; want exit 0, nothing on stdout and a line saying nothing was found", code, out, errOut)
	}
}
