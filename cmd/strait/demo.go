package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

func newDemoCmd(g *globals) *cobra.Command {
	var dir, proxyBin string
	var keep bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run the Strait story end to end on this machine and report",
		Long: `Run the Strait story on this machine, printing each command as it runs:
create a mesh CA, a cluster intermediate and a workload SVID, verify the SVID
the way mesh members do, show a foreign SVID refused, and show the CA status.
Nothing outside --dir (default: a temporary directory) is touched.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				tmp, err := os.MkdirTemp("", "strait-demo-")
				if err != nil {
					return err
				}
				dir = tmp
				if !keep {
					defer os.RemoveAll(tmp)
				}
			}
			d := &demo{g: g, cmd: cmd, proxyBin: proxyBin}
			return d.run(dir)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "working directory (default: a temporary directory, removed afterwards)")
	cmd.Flags().BoolVar(&keep, "keep", false, "keep the temporary directory")
	cmd.Flags().StringVar(&proxyBin, "proxy-bin", "", "strait-proxy binary (default: next to strait, then $PATH)")
	return cmd
}

type demo struct {
	g        *globals
	cmd      *cobra.Command
	proxyBin string
}

// step runs the CLI in-process with args, echoing the command line and its
// output, and fails the demo if the command's outcome is not the expected one.
func (d *demo) step(wantOK bool, args ...string) error {
	fmt.Fprintf(d.g.stdout, "\n$ strait %s\n", strings.Join(args, " "))
	var out, errOut bytes.Buffer
	code := run(d.cmd.Context(), args, &out, &errOut)
	d.g.stdout.Write(indent(out.Bytes()))
	d.g.stdout.Write(indent(errOut.Bytes()))
	if ok := code == 0; ok != wantOK {
		return fmt.Errorf("demo: 'strait %s' exited %d, which the demo did not expect", strings.Join(args, " "), code)
	}
	return nil
}

func indent(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	lines := strings.SplitAfter(strings.TrimRight(string(b), "\n"), "\n")
	return []byte("  " + strings.Join(lines, "  ") + "\n")
}

func (d *demo) section(title string) {
	fmt.Fprintf(d.g.stdout, "\n== %s\n", title)
}

func (d *demo) run(dir string) error {
	const td = "demo.strait.example"
	caDir := filepath.Join(dir, "ca")
	foreignDir := filepath.Join(dir, "foreign-ca")
	web := filepath.Join(dir, "frontend")
	stranger := filepath.Join(dir, "stranger")
	fmt.Fprintf(d.g.stdout, "Strait demo in %s\n", dir)

	steps := []struct {
		title string
		ok    bool
		args  []string
	}{
		{"1. Create the mesh root and the east cluster's intermediate", true,
			[]string{"ca", "init", "--trust-domain", td, "--data-dir", caDir, "--cluster", "east"}},
		{"2. Issue a workload SVID (frontend in namespace shop), key generated here", true,
			[]string{"ca", "mint", "--data-dir", caDir, "--spiffe-id", "spiffe://" + td + "/ns/shop/sa/frontend", "--ttl", "1h", "--out", web}},
		{"3. Verify it as every mesh member does", true,
			[]string{"ca", "verify", "--data-dir", caDir, "--cert", filepath.Join(web, "svid.pem"), "--role", "client"}},
		{"4. An SVID from another CA claiming the same trust domain is refused", true,
			[]string{"ca", "init", "--trust-domain", td, "--data-dir", foreignDir, "--cluster", "rogue"}},
		{"", true,
			[]string{"ca", "mint", "--data-dir", foreignDir, "--spiffe-id", "spiffe://" + td + "/ns/shop/sa/frontend", "--out", stranger}},
		{"", false,
			[]string{"ca", "verify", "--data-dir", caDir, "--cert", filepath.Join(stranger, "svid.pem")}},
		{"5. The CA's state: roots, bundle and intermediates", true,
			[]string{"ca", "status", "--data-dir", caDir}},
	}
	for _, s := range steps {
		if s.title != "" {
			d.section(s.title)
		}
		if err := d.step(s.ok, s.args...); err != nil {
			return err
		}
	}
	if err := d.mesh(filepath.Join(dir, "mesh")); err != nil {
		return err
	}
	fmt.Fprintf(d.g.stdout, "\nDemo complete: mesh root, intermediate and SVIDs verified, a foreign SVID refused; a cluster ran with\nmTLS between sidecars, policy allowed and denied callers, and the metrics saw every call.\n")
	return nil
}

// mesh runs one local cluster with the sample application and shows a
// call through two sidecars, authorization, and what the metrics saw.
func (d *demo) mesh(dir string) (err error) {
	d.section("6. Start cluster east: a control plane and frontend/backend behind sidecars")
	up := []string{"dev", "up", "--dir", dir, "--clusters", "east"}
	if d.proxyBin != "" {
		up = append(up, "--proxy-bin", d.proxyBin)
	}
	if err := d.step(true, up...); err != nil {
		return err
	}
	defer func() {
		d.section("11. Stop everything")
		if derr := d.step(true, "dev", "down", "--dir", dir); err == nil {
			err = derr
		}
	}()
	df, err := readDevFile(dir)
	if err != nil {
		return err
	}
	cfg := df.Config
	fe := df.Clusters[0].Workloads[0]
	url := "http://" + fe.Upstreams["backend"] + "/"
	d.section("7. frontend calls backend through its sidecar: mTLS between sidecars, caller verified")
	for range 4 {
		if err := d.call(url, http.StatusOK); err != nil {
			return err
		}
	}
	if err := d.step(true, "status", "--config", cfg); err != nil {
		return err
	}
	d.section("8. Only billing may call backend: frontend is refused at backend's inbound listener")
	// The same AuthorizationPolicy, three times: only billing, a typo,
	// then frontend.
	apply := func(file, field, sa string, wantOK bool) error {
		path := filepath.Join(dir, file)
		doc := `apiVersion: strait.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: backend-callers, namespace: default}
spec:
  service: backend
  from:
    - ` + field + `: spiffe://` + df.TrustDomain + `/ns/default/sa/` + sa + "\n"
		if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
			return err
		}
		return d.step(wantOK, "apply", "--config", cfg, "-f", path)
	}
	if err := apply("backend-callers.yaml", "spiffeID", "billing", true); err != nil {
		return err
	}
	if err := d.eventually(url, http.StatusBadGateway); err != nil {
		return err
	}
	d.section("9. Allow frontend again; a typo is refused with the field named, and nothing changes")
	if err := apply("typo.yaml", "spifeID", "frontend", false); err != nil {
		return err
	}
	if err := apply("backend-callers-fixed.yaml", "spiffeID", "frontend", true); err != nil {
		return err
	}
	if err := d.eventually(url, http.StatusOK); err != nil {
		return err
	}
	d.section("10. What the metrics saw (frontend's and backend-0's admin /metrics)")
	for _, w := range df.Clusters[0].Workloads[:2] {
		if err := d.metrics(w); err != nil {
			return err
		}
	}
	return nil
}

// call does one request and prints it as curl would.
func (d *demo) call(url string, want int) error {
	fmt.Fprintf(d.g.stdout, "\n$ curl -s %s\n", url)
	resp, err := http.Get(url)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	fmt.Fprintf(d.g.stdout, "  HTTP %d %s", resp.StatusCode, indent(body))
	if resp.StatusCode != want {
		return fmt.Errorf("demo: got HTTP %d, want %d", resp.StatusCode, want)
	}
	return nil
}

// eventually retries until the call returns want (policy takes effect
// after the control plane's debounce and the push).
func (d *demo) eventually(url string, want int) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == want {
				return d.call(url, want)
			}
		}
		if time.Now().After(deadline) {
			return d.call(url, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (d *demo) metrics(w devWorkload) error {
	fmt.Fprintf(d.g.stdout, "\n$ curl -s http://%s/metrics | grep -E 'requests_total|handshake_failures|svid_expiry'   # %s\n", w.Admin, w.Instance)
	resp, err := http.Get("http://" + w.Admin + "/metrics")
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for line := range strings.SplitSeq(string(body), "\n") {
		if strings.HasPrefix(line, "strait_proxy_requests_total") || strings.HasPrefix(line, "strait_proxy_tls_handshake_failures_total") ||
			strings.HasPrefix(line, "strait_proxy_svid_expiry") {
			fmt.Fprintf(d.g.stdout, "  %s\n", line)
		}
	}
	return nil
}
