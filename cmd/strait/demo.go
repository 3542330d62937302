package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
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
Then run cluster east (control plane, gateway, frontend and backends behind
sidecars): calls through the mesh, an AuthorizationPolicy denying and
re-allowing, metrics. Then three clusters (east, west, and south installed
without an intermediate) linked with join tokens, a payments service running
in west only exported with a ServiceExport and called from east and south,
federation status, a replayed token refused. Then failover: east's backends
SIGKILLed under steady load from east's frontend, west answering, and the
failback when backend starts again in east; and a root rotation across the
three clusters under load (strait ca rotate --auto), with the timings and
error counts measured. Then a clean shutdown.
Exits non-zero if any step does not go as expected or any request of the
load fails. Nothing outside --dir
(default: a temporary directory) is touched; processes are loopback-only.`,
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
	_, _, err := d.exec(wantOK, args...)
	return err
}

// exec is step, returning what the command printed.
func (d *demo) exec(wantOK bool, args ...string) (stdout, stderr string, err error) {
	fmt.Fprintf(d.g.stdout, "\n$ strait %s\n", strings.Join(args, " "))
	// Both streams are shown in the order they were written.
	var out, errOut, both bytes.Buffer
	code := run(d.cmd.Context(), args, io.MultiWriter(&out, &both), io.MultiWriter(&errOut, &both))
	d.g.stdout.Write(indent(both.Bytes()))
	if ok := code == 0; ok != wantOK {
		return out.String(), errOut.String(), fmt.Errorf("demo: 'strait %s' exited %d, which the demo did not expect", strings.Join(args, " "), code)
	}
	return out.String(), errOut.String(), nil
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
	if err := d.federation(filepath.Join(dir, "federation")); err != nil {
		return err
	}
	fmt.Fprintf(d.g.stdout, `
Demo complete: mesh root, intermediate and SVIDs verified, a foreign SVID refused; a cluster ran with
mTLS between sidecars, policy allowed and denied callers, and the metrics saw every call; three clusters
linked with one-time join tokens (south receiving its intermediate through its join), payments ran in
west only and answered east's and south's frontends through the gateways, seeing each caller's own
SPIFFE ID; a replayed token was refused; east's backends were killed under load and west answered, then
east took its traffic back, and the mesh root rotated across the three clusters under load, with no
failed request; and everything stopped.
`)
	return nil
}

// mesh runs one local cluster with the sample application and shows a
// call through two sidecars, authorization, and what the metrics saw.
func (d *demo) mesh(dir string) (err error) {
	d.section("6. Start cluster east: a control plane, its gateway, and frontend/backend behind sidecars")
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
	// Every backend instance: the calls are balanced over them.
	d.section("10. What the metrics saw (the admin /metrics of frontend and of each backend)")
	for _, w := range df.Clusters[0].Workloads {
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

// federation runs three clusters, links them with join tokens through the
// CLI, and shows a service that runs in west only called from the others
// with the caller's identity intact.
func (d *demo) federation(dir string) (err error) {
	cfg := filepath.Join(dir, "strait.config")
	withProxy := func(args ...string) []string {
		if d.proxyBin != "" {
			args = append(args, "--proxy-bin", d.proxyBin)
		}
		return args
	}
	d.section("12. Three clusters: east (the root authority), west, and south installed with no intermediate")
	if err := d.step(true, withProxy("dev", "up", "--dir", dir, "--clusters", "east,west,south", "--pending", "south")...); err != nil {
		return err
	}
	defer func() {
		d.section("24. Stop everything")
		// Whatever dev.json records must be gone after dev down.
		var pids []int
		if df, rerr := readDevFile(dir); rerr == nil {
			pids = df.pids()
		}
		if derr := d.step(true, "dev", "down", "--dir", dir); err == nil {
			err = derr
		}
		if err == nil {
			err = d.allExited(dir, pids)
		}
	}()
	// token creates a join token on issuer for joiner and prints it.
	token := func(issuer, joiner string) (string, error) {
		out, _, err := d.exec(true, "federation", "token", "create", "--config", cfg, "--context", issuer, "--for-cluster", joiner)
		return strings.TrimSpace(out), err
	}
	d.section("13. Link west to east: a one-time join token, created on east, redeemed by west")
	westToken, err := token("east", "west")
	if err != nil {
		return err
	}
	if err := d.step(true, "federation", "join", westToken, "--config", cfg, "--context", "west"); err != nil {
		return err
	}
	d.section("14. south joins too, and receives its intermediate from east through the join; then its gateway and app start")
	tok, err := token("east", "south")
	if err != nil {
		return err
	}
	if err := d.step(true, "federation", "join", tok, "--config", cfg, "--context", "south"); err != nil {
		return err
	}
	if err := d.step(true, withProxy("dev", "link", "--dir", dir, "--cluster", "south")...); err != nil {
		return err
	}
	d.section("15. Link south to west as well: a cluster may have many links")
	if tok, err = token("west", "south"); err != nil {
		return err
	}
	if err := d.step(true, "federation", "join", tok, "--config", cfg, "--context", "south"); err != nil {
		return err
	}
	d.section("16. payments runs in west only; not exported yet, it is out of east's reach")
	if err := d.step(true, withProxy("dev", "run", "payments", "--dir", dir, "--cluster", "west")...); err != nil {
		return err
	}
	df, err := readDevFile(dir)
	if err != nil {
		return err
	}
	frontend := func(cluster string) devWorkload {
		for _, c := range df.Clusters {
			if c.Name == cluster {
				return c.Workloads[0]
			}
		}
		return devWorkload{}
	}
	east, south := frontend("east"), frontend("south")
	eastURL := "http://" + east.Upstreams["payments"] + "/"
	if err := d.call(eastURL, http.StatusServiceUnavailable); err != nil {
		return err
	}
	d.section("17. west exports payments with a ServiceExport (the Kubernetes MCS API's)")
	export := filepath.Join(dir, "payments-export.yaml")
	doc := "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: payments, namespace: default}\n"
	if err := os.WriteFile(export, []byte(doc), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(d.g.stdout, "\n$ cat %s\n%s", export, indent([]byte(doc)))
	if err := d.step(true, "apply", "--config", cfg, "--context", "west", "-f", export); err != nil {
		return err
	}
	d.section("18. east's frontend calls payments: west answers, and sees the caller's own SPIFFE ID")
	if err := d.crossCluster(eastURL, "west", east.SPIFFEID); err != nil {
		return err
	}
	fmt.Fprintf(d.g.stdout, "\n  and from south's frontend (south is linked to west too):\n")
	if err := d.crossCluster("http://"+south.Upstreams["payments"]+"/", "west", south.SPIFFEID); err != nil {
		return err
	}
	fmt.Fprintf(d.g.stdout, "\n  Each call went frontend's sidecar -> its cluster's gateway -> QUIC -> west's gateway -> payments' sidecar;\n  the mTLS between the two sidecars ran inside, unopened, so payments verified the frontend's own SVID.\n")
	d.section("19. The links as each side sees them")
	for _, c := range []string{"east", "west"} {
		if err := d.step(true, "federation", "status", "--config", cfg, "--context", c); err != nil {
			return err
		}
	}
	d.section("20. A join token is one-time: west's, replayed, is refused")
	_, stderr, err := d.exec(false, "federation", "join", westToken, "--config", cfg, "--context", "west")
	if err != nil {
		return err
	}
	if !strings.Contains(stderr, "already used") {
		return fmt.Errorf("demo: the replayed token was refused, but not as already used: %s", strings.TrimSpace(stderr))
	}
	if err := d.failover(dir, cfg, withProxy); err != nil {
		return err
	}
	return d.rotation(dir, cfg)
}

// crossCluster calls url until it is answered by cluster (the import
// reaches the caller's sidecar within a moment), prints the answer and
// checks the caller identity payments saw.
func (d *demo) crossCluster(url, cluster, caller string) error {
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			var r echoReply
			json.NewDecoder(resp.Body).Decode(&r)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && r.Cluster == cluster {
				break
			}
		}
		if time.Now().After(deadline) {
			d.call(url, http.StatusOK)
			return fmt.Errorf("demo: %s was not answered by %s within 15s", url, cluster)
		}
		time.Sleep(100 * time.Millisecond)
	}
	fmt.Fprintf(d.g.stdout, "\n$ curl -s %s\n", url)
	resp, err := http.Get(url)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	fmt.Fprintf(d.g.stdout, "  HTTP %d %s", resp.StatusCode, indent(body))
	var r echoReply
	if err := json.Unmarshal(body, &r); err != nil || resp.StatusCode != http.StatusOK {
		return fmt.Errorf("demo: HTTP %d %q", resp.StatusCode, body)
	}
	if r.Cluster != cluster || r.Caller != caller {
		return fmt.Errorf("demo: answered by %s seeing caller %q; want %s seeing %s", r.Cluster, r.Caller, cluster, caller)
	}
	fmt.Fprintf(d.g.stdout, "  answered in %s by %s; the caller it verified: %s\n", r.Cluster, r.Instance, r.Caller)
	return nil
}

// allExited checks that none of pids runs any more.
func (d *demo) allExited(dir string, pids []int) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		var left []int
		for _, p := range pids {
			if ours(p, dir) && alive(p) {
				left = append(left, p)
			}
		}
		if len(left) == 0 {
			fmt.Fprintf(d.g.stdout, "  all %d processes (control planes, gateways, sidecars, apps) have exited\n", len(pids))
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("demo: processes still running after dev down: %v", left)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// demoSlowStart is the failback ramp the demo's TrafficPolicy sets for
// backend (the default, 10s, is long for a demo).
const demoSlowStart = 3 * time.Second

// devFrontend is cluster's frontend-0 in dir's dev.json.
func devFrontend(dir, cluster string) (devWorkload, error) {
	df, err := readDevFile(dir)
	if err != nil {
		return devWorkload{}, err
	}
	for _, c := range df.Clusters {
		for _, w := range c.Workloads {
			if c.Name == cluster && w.Service == "frontend" {
				return w, nil
			}
		}
	}
	return devWorkload{}, fmt.Errorf("demo: no frontend in cluster %s", cluster)
}

// showApply writes doc to file, shows it, and applies it in context.
func (d *demo) showApply(cfg, context, file, doc string) error {
	if err := os.WriteFile(file, []byte(doc), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(d.g.stdout, "\n$ cat %s\n%s", file, indent([]byte(doc)))
	return d.step(true, "apply", "--config", cfg, "--context", context, "-f", file)
}

// failover kills east's backends while east's frontend calls backend
// under steady load: west, which exports backend, answers. Then backend
// starts again in east and the traffic returns, ramped by the slow start.
// Every client request must succeed.
func (d *demo) failover(dir, cfg string, withProxy func(...string) []string) (err error) {
	out := d.g.stdout
	d.section("21. Failover: east's backends are killed under steady load from east's frontend; west, which exports backend, answers")
	if err := d.showApply(cfg, "west", filepath.Join(dir, "backend-export.yaml"),
		"apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: backend, namespace: default}\n"); err != nil {
		return err
	}
	fmt.Fprintf(out, "\n  and in east, a TrafficPolicy for backend with a short failback ramp (the default slow start is 10s):\n")
	if err := d.showApply(cfg, "east", filepath.Join(dir, "backend-policy.yaml"),
		"apiVersion: strait.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: backend, namespace: default}\nspec:\n  service: backend\n  failover: {slowStart: "+demoSlowStart.String()+"}\n"); err != nil {
		return err
	}
	fe, err := devFrontend(dir, "east")
	if err != nil {
		return err
	}
	// east's frontend's sidecar holds both of east's backends and west's.
	var healthy map[string]int
	if !pollUntil(15*time.Second, func() bool {
		healthy, err = upstreamHealthy(fe.Admin, "backend")
		return err == nil && healthy["east"] >= 2 && healthy["west"] >= 1
	}) {
		return fmt.Errorf("demo: east's frontend never held east's 2 and west's backends healthy (healthy by cluster: %v, %v)", healthy, err)
	}
	if err := d.step(true, "explain", "backend", "--config", cfg, "--context", "east"); err != nil {
		return err
	}

	url := "http://" + fe.Upstreams["backend"] + "/"
	fmt.Fprintf(out, "\n  load: 4 clients call %s (east's frontend's sidecar, upstream backend), each every 2ms\n", url)
	l, err := startLoad([]loadTarget{{"backend", url}}, loadOptions{clients: 4, pause: 2 * time.Millisecond, limit: time.Minute, perClient: 30000})
	if err != nil {
		return err
	}
	defer func() {
		if serr := l.stopLoad(); err == nil {
			err = serr
		}
	}()
	time.Sleep(time.Second)
	killed, err := killInstances(dir, "east", "backend")
	if err != nil {
		return err
	}
	killedAt := time.Now()
	for _, w := range killed {
		fmt.Fprintf(out, "\n$ kill -KILL %d %d   # %s in east: its sidecar and its app (pids from dev.json)\n", w.PID, w.AppPID, w.Instance)
	}
	if !pollUntil(5*time.Second, func() bool { return !l.first("west", killedAt).IsZero() }) {
		c := l.count("", killedAt, time.Time{})
		return fmt.Errorf("demo: west did not answer within 5s of the kill (%d answered, %d failed since: %v)", c.ok, c.failed, c.errs)
	}
	time.Sleep(time.Second)
	now := time.Now()
	lastEast, firstWest := l.last("east", now), l.first("west", killedAt)
	c := l.count("", time.Time{}, now)
	fmt.Fprintf(out, "\n  failover: last answer from east -> first answer from west: %s (the first from west came %s after the kill)\n",
		roundDuration(firstWest.Sub(lastEast)), roundDuration(firstWest.Sub(killedAt)))
	fmt.Fprintf(out, "  requests so far: %d answered (east %d, west %d), %d failed\n", c.ok, c.byCluster["east"], c.byCluster["west"], c.failed)
	if c.failed > 0 {
		return fmt.Errorf("demo: %d client requests failed during the failover: %v", c.failed, c.errs)
	}
	// explain shows the control plane's view: it sees the killed instances
	// unhealthy once they miss their health reports.
	explain := []string{"explain", "backend", "--config", cfg, "--context", "east"}
	var seen string
	if !pollUntil(30*time.Second, func() bool {
		time.Sleep(200 * time.Millisecond) // a new connection each time: not too often
		var b bytes.Buffer
		code := run(d.cmd.Context(), explain, &b, io.Discard)
		seen = b.String()
		return code == 0 && strings.Contains(seen, "goes to west")
	}) {
		return fmt.Errorf("demo: east's control plane still did not send backend's traffic to west 30s after the kill:\n%s", seen)
	}
	fmt.Fprintf(out, "  east's control plane saw them gone %s after the kill, 2s after their sidecars' configuration streams closed; the callers' sidecars had not waited\n",
		roundDuration(time.Since(killedAt)))
	if err := d.step(true, explain...); err != nil {
		return err
	}

	d.section("22. Failback: backend starts again in east; traffic returns to east, ramped up over the slow start")
	if err := d.step(true, withProxy("dev", "run", "backend", "--dir", dir, "--cluster", "east")...); err != nil {
		return err
	}
	back := time.Now()
	if !pollUntil(10*time.Second, func() bool { return !l.first("east", back).IsZero() }) {
		return fmt.Errorf("demo: east did not answer within 10s of its backend's return")
	}
	firstEast := l.first("east", back)
	// The ramp, then a second at full share.
	end := back.Add(demoSlowStart + 1500*time.Millisecond)
	time.Sleep(time.Until(end))
	var shares []string
	for t := back; t.Add(time.Second).Compare(end) <= 0; t = t.Add(time.Second) {
		pct, _ := l.share("east", t, t.Add(time.Second))
		shares = append(shares, fmt.Sprintf("%.0f%%", pct))
	}
	lastPct, lastN := l.share("east", end.Add(-time.Second), end)
	fmt.Fprintf(out, "\n  failback: the first answer from east came %s after `dev run` returned\n", roundDuration(firstEast.Sub(back)))
	fmt.Fprintf(out, "  east's share of the answers, second by second since: %s; in the last second %.0f%% (of %d)\n", strings.Join(shares, ", "), lastPct, lastN)
	if err := d.step(true, "explain", "backend", "--config", cfg, "--context", "east"); err != nil {
		return err
	}
	if err := l.stopLoad(); err != nil {
		return err
	}
	c = l.count("", time.Time{}, time.Time{})
	fmt.Fprintf(out, "\n  the whole act, failover and failback: %d requests, %d answered by east and %d by west; %d failed\n",
		c.ok+c.failed, c.byCluster["east"], c.byCluster["west"], c.failed)
	if c.failed > 0 {
		return fmt.Errorf("demo: %d client requests failed: %v", c.failed, c.errs)
	}
	return nil
}

// rotation rotates the mesh root across the three clusters while east's
// frontend calls payments (answered in west) and backend. No request may
// fail, and no process restarts.
func (d *demo) rotation(dir, cfg string) (err error) {
	out := d.g.stdout
	ctx := d.cmd.Context()
	d.section("23. The mesh root rotates under load: prepare, activate, retire across east, west and south, no restart")
	before, err := rotationStatus(ctx, cfg, "east")
	if err != nil {
		return fmt.Errorf("demo: rotation status: %w", err)
	}
	oldRoot := activeRoot(before)
	df, err := readDevFile(dir)
	if err != nil {
		return err
	}
	var running []int
	for _, p := range df.pids() {
		if alive(p) {
			running = append(running, p)
		}
	}
	fe, err := devFrontend(dir, "east")
	if err != nil {
		return err
	}
	targets := []loadTarget{{"payments", "http://" + fe.Upstreams["payments"] + "/"}, {"backend", "http://" + fe.Upstreams["backend"] + "/"}}
	fmt.Fprintf(out, "\n  load: east's frontend calls payments (%s, answered in west) and backend (%s), 2 clients each, each every 2ms\n", targets[0].url, targets[1].url)
	l, err := startLoad(targets, loadOptions{clients: 2, pause: 2 * time.Millisecond, limit: 90 * time.Second, perClient: 45000})
	if err != nil {
		return err
	}
	defer func() {
		if serr := l.stopLoad(); err == nil {
			err = serr
		}
	}()
	time.Sleep(500 * time.Millisecond)
	// The CLI follows the rotation and prints each step as every cluster
	// acknowledges it; the demo then reads the final state.
	if err := d.step(true, "ca", "rotate", "--auto", "--config", cfg, "--context", "east"); err != nil {
		return err
	}
	st, err := waitAutoRotation(ctx, cfg, "east", time.Minute, nil)
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	time.Sleep(500 * time.Millisecond) // traffic after the last step
	if err := l.stopLoad(); err != nil {
		return err
	}
	if err := d.step(true, "ca", "rotate", "status", "--config", cfg, "--context", "east"); err != nil {
		return err
	}
	pay, be := l.count("payments", time.Time{}, time.Time{}), l.count("backend", time.Time{}, time.Time{})
	all := l.count("", time.Time{}, time.Time{})
	fmt.Fprintf(out, "  requests during the rotation: %d (payments %d, answered by west %d; backend %d), %d failed\n",
		all.ok+all.failed, pay.ok+pay.failed, pay.byCluster["west"], be.ok+be.failed, all.failed)
	var restarted []int
	for _, p := range running {
		if !alive(p) {
			restarted = append(restarted, p)
		}
	}
	fmt.Fprintf(out, "  the root: %s before, %s now; of the %d processes running before, %d still run (no restart)\n", oldRoot, activeRoot(st), len(running), len(running)-len(restarted))
	switch {
	case all.failed > 0:
		return fmt.Errorf("demo: %d client requests failed during the rotation: %v", all.failed, all.errs)
	case pay.byCluster["west"] == 0 || be.ok == 0:
		return fmt.Errorf("demo: the load was not answered as expected: payments by %v, backend by %v", pay.byCluster, be.byCluster)
	case activeRoot(st) == oldRoot:
		return fmt.Errorf("demo: the active root is still %s after the rotation", oldRoot)
	case len(restarted) > 0:
		return fmt.Errorf("demo: processes gone during the rotation: %v", restarted)
	}
	return nil
}

// activeRoot is the ID of the active root in st ("-" if none).
func activeRoot(st *controlplanev1.RotationStatusResponse) string {
	if r := activeRootOf(st); r != nil {
		return r.GetId()
	}
	return "-"
}
