package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/local"
	"github.com/straitmesh/strait/internal/wiring"
)

// startGateway issues the gateway's first credentials into
// DIR/<cluster>/gateway (as `strait controlplane gateway-credentials`
// does), runs `strait gateway run` and waits until it serves and its
// control plane knows it (a join token carries its addresses).
func (u *devUpper) startGateway(ctx context.Context, dc *devCluster, d *local.Dir) error {
	gwDir := filepath.Join(u.dir, dc.Name, "gateway")
	iss, err := wiring.NewIssuer(d, 0)
	if err != nil {
		return fmt.Errorf("cluster %s: %w", dc.Name, err)
	}
	if _, err := d.MintGateway(iss, time.Hour, gwDir); err != nil {
		return fmt.Errorf("cluster %s: gateway credentials: %w", dc.Name, err)
	}
	addrFile := filepath.Join(gwDir, "addresses.json")
	os.Remove(addrFile)
	// Linked peers know the gateway by the QUIC address it had: keep it
	// if it is free.
	peerListen := "127.0.0.1:0"
	if prev := u.peerAddrs[dc.Name]; prev != "" {
		if pc, err := net.ListenPacket("udp", prev); err == nil {
			pc.Close()
			peerListen = prev
		} else {
			u.say("cluster %-6s gateway's previous QUIC address %s is taken (%v): peers find it again only by dialing it", dc.Name, prev, err)
		}
	}
	args := []string{"gateway", "run", "--cluster", dc.Name, "--trust-domain", u.td.Name(), "--control-plane", dc.ControlPlane.Address,
		"--data-dir", gwDir, "--peer-listen", peerListen, "--entry-listen", "127.0.0.1:0", "--addresses-file", addrFile,
		"--concurrency", "1"} // every cluster shares this host's cores
	gw, err := u.start(u.self, args, filepath.Join(u.dir, dc.Name, "gateway.log"))
	if err != nil {
		return err
	}
	var a gatewayAddrs
	err = waitFor(ctx, gw, "gateway of "+dc.Name, 15*time.Second, func() error {
		data, err := os.ReadFile(addrFile)
		if err != nil {
			return errors.New("not serving yet")
		}
		return json.Unmarshal(data, &a)
	})
	if err != nil {
		return err
	}
	gwID, err := identity.Gateway(u.td, dc.Name)
	if err != nil {
		return err
	}
	err = waitFor(ctx, gw, "gateway of "+dc.Name+" connecting to its control plane", 15*time.Second, func() error {
		st, err := u.adminStatus(ctx, dc.Name)
		if err != nil {
			return err
		}
		for _, n := range st.GetNodes() {
			if n.GetSpiffeId() == gwID.String() && n.GetConnected() {
				return nil
			}
		}
		return errors.New("not connected yet")
	})
	if err != nil {
		return err
	}
	dc.Gateway = &devGateway{Peer: a.Peer, Entry: a.Entry, PID: gw.cmd.Process.Pid, Log: gw.log, DataDir: gwDir}
	u.say("cluster %-6s gateway       peer %s (QUIC), entry %s (pid %d)", dc.Name, a.Peer, a.Entry, dc.Gateway.PID)
	return nil
}

// cli runs the strait CLI in this process, as a user would from a shell,
// and returns its standard output. The error names the command (not its
// arguments: a join token is a secret) and carries its standard error.
func (u *devUpper) cli(ctx context.Context, args ...string) (string, error) {
	var out, errOut bytes.Buffer
	if code := run(ctx, args, &out, &errOut); code != 0 {
		name := "strait"
		for _, a := range args {
			if strings.HasPrefix(a, "-") || strings.HasPrefix(a, "strait-join-") {
				break
			}
			name += " " + a
		}
		return out.String(), fmt.Errorf("%s: %s", name, strings.TrimSpace(strings.TrimPrefix(errOut.String(), "strait: ")))
	}
	return out.String(), nil
}

// link links cluster df.Clusters[i] to the first cluster, unless it is
// already: a join token created on the first is redeemed by the other,
// through the same commands a user runs (`strait federation token
// create`, `strait federation join`). A pending cluster receives its
// intermediate through the join; then its gateway and workloads start.
func (u *devUpper) link(ctx context.Context, df *devFile, i int) error {
	first, dc := df.Clusters[0].Name, &df.Clusters[i]
	// A pending control plane that just joined restarts as a full one on
	// the same address: give it a moment.
	var peers []string
	err := waitFor(ctx, nil, "control plane of "+dc.Name, 20*time.Second, func() error {
		if !alive(dc.ControlPlane.PID) {
			return fmt.Errorf("it is not running (log: %s)", dc.ControlPlane.Log)
		}
		var err error
		peers, err = u.linkedPeers(ctx, dc.Name)
		return err
	})
	if err != nil {
		return err
	}
	linked, err := u.linkedBothWays(ctx, first, dc.Name, peers)
	if err != nil {
		return err
	}
	if linked {
		u.say("cluster %-6s linked to %s already", dc.Name, first)
	} else {
		var tok string
		// The first cluster's gateway may still be connecting.
		deadline := time.Now().Add(15 * time.Second)
		for {
			out, err := u.cli(ctx, "federation", "token", "create", "--config", u.config, "--context", first, "--for-cluster", dc.Name)
			if err == nil {
				tok = strings.TrimSpace(out)
				break
			}
			if !strings.Contains(err.Error(), "no gateway") || time.Now().After(deadline) {
				return err
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(200 * time.Millisecond):
			}
		}
		out, err := u.cli(ctx, "federation", "join", tok, "--config", u.config, "--context", dc.Name)
		if err != nil {
			return err
		}
		for line := range strings.SplitSeq(strings.TrimSpace(out), "\n") {
			u.say("cluster %-6s %s", dc.Name, line)
		}
	}
	if dc.Pending {
		if err := u.joined(ctx, dc); err != nil {
			return err
		}
		d, err := local.Load(dc.ControlPlane.DataDir)
		if err != nil {
			return fmt.Errorf("cluster %s: %w", dc.Name, err)
		}
		dc.Pending = false
		if err := u.startGateway(ctx, dc, d); err != nil {
			return err
		}
		if err := u.startWorkloads(ctx, dc, sampleWorkloads); err != nil {
			return err
		}
	}
	if err := u.linkUp(ctx, first, dc.Name); err != nil {
		return err
	}
	return u.linkUp(ctx, dc.Name, first)
}

// linkedBothWays reports whether first and cluster (whose peers are given)
// both hold their link. A link held by one side only (the other removed it
// with `strait federation unlink`) is an error saying what to run: a join
// cannot mend it, and waiting for it to connect would be in vain. A side's
// view may lag a removal for a moment, so a one-sided answer is asked again
// for a few seconds first.
func (u *devUpper) linkedBothWays(ctx context.Context, first, cluster string, peers []string) (bool, error) {
	deadline := time.Now().Add(3 * time.Second)
	for {
		firstPeers, err := u.linkedPeers(ctx, first)
		if err != nil {
			return false, err
		}
		linked, err := linkSides(u.config, first, cluster, peers, firstPeers)
		if err == nil || time.Now().After(deadline) {
			return linked, err
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if peers, err = u.linkedPeers(ctx, cluster); err != nil {
			return false, err
		}
	}
}

// linkSides judges the link between the first cluster and cluster from each
// side's peers: held by both (linked), by neither (not linked), or by one
// only, an error naming the `strait federation unlink` to run on that side.
func linkSides(config, first, cluster string, clusterPeers, firstPeers []string) (bool, error) {
	atCluster, atFirst := slices.Contains(clusterPeers, first), slices.Contains(firstPeers, cluster)
	if atCluster == atFirst {
		return atCluster, nil
	}
	holder, other := cluster, first
	if atFirst {
		holder, other = first, cluster
	}
	return false, fmt.Errorf("cluster %s holds a link with %s, but %s has none with it (removed there with `strait federation unlink`): run `strait federation unlink %s --config %s --context %s`, then link again", holder, other, other, other, config, holder)
}

// joined waits until a pending cluster's control plane has installed its
// intermediate and serves as a full control plane (its admin credentials
// are re-issued under the mesh root at the same paths).
func (u *devUpper) joined(ctx context.Context, dc *devCluster) error {
	return waitFor(ctx, nil, "control plane of "+dc.Name+" after the join", 30*time.Second, func() error {
		if !alive(dc.ControlPlane.PID) {
			return fmt.Errorf("it is not running (log: %s)", dc.ControlPlane.Log)
		}
		if _, err := local.Load(dc.ControlPlane.DataDir); err != nil {
			return err
		}
		_, fed, done, err := u.dial(dc.Name)
		if err != nil {
			return err
		}
		defer done()
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		st, err := fed.FederationStatus(rctx, &controlplanev1.FederationStatusRequest{})
		if err != nil {
			return rpcError(err)
		}
		if st.GetPending() {
			return errors.New("still pending")
		}
		return nil
	})
}

// linkedPeers lists the peers a cluster has links with.
func (u *devUpper) linkedPeers(ctx context.Context, cluster string) ([]string, error) {
	st, err := u.federationStatus(ctx, cluster)
	if err != nil {
		return nil, err
	}
	var peers []string
	for _, l := range st.GetLinks() {
		peers = append(peers, l.GetLink().GetPeer())
	}
	return peers, nil
}

func (u *devUpper) federationStatus(ctx context.Context, cluster string) (*controlplanev1.FederationStatusResponse, error) {
	_, fed, done, err := u.dial(cluster)
	if err != nil {
		return nil, err
	}
	defer done()
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := fed.FederationStatus(rctx, &controlplanev1.FederationStatusRequest{})
	if err != nil {
		return nil, rpcError(err)
	}
	return st, nil
}

// linkUp waits until cluster reports its link to peer connected, with
// its control stream up.
func (u *devUpper) linkUp(ctx context.Context, cluster, peer string) error {
	err := waitFor(ctx, nil, "link "+cluster+" → "+peer, 20*time.Second, func() error {
		st, err := u.federationStatus(ctx, cluster)
		if err != nil {
			return err
		}
		for _, l := range st.GetLinks() {
			if l.GetLink().GetPeer() != peer {
				continue
			}
			if l.GetState() == "connected" && l.GetControlStreamUp() {
				return nil
			}
			return fmt.Errorf("state %s, control stream up %t, last error %q", l.GetState(), l.GetControlStreamUp(), l.GetLastError())
		}
		return errors.New("no such link")
	})
	if err == nil && cluster != peer {
		u.say("cluster %-6s link to %s connected", cluster, peer)
	}
	return err
}

// loadDevUpper reads what `strait dev up` wrote in dir, to act on it.
func loadDevUpper(g *globals, dir, proxyFlag string) (*devUpper, *devFile, error) {
	df, err := readDevFile(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, fmt.Errorf("%s has no dev.json: run `strait dev up --dir %s` first", dir, dir)
	}
	if err != nil {
		return nil, nil, err
	}
	if !anyAlive(dir, df) {
		return nil, nil, fmt.Errorf("nothing of %s is running: run `strait dev up --dir %s` first", dir, dir)
	}
	td, err := identity.ParseTrustDomain(df.TrustDomain)
	if err != nil {
		return nil, nil, fmt.Errorf("dev.json: %w", err)
	}
	cfg, err := loadClientConfig(df.Config)
	if err != nil {
		return nil, nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, nil, err
	}
	proxyBin, err := findProxyBinary(proxyFlag)
	if err != nil {
		return nil, nil, err
	}
	u := &devUpper{g: g, dir: dir, self: self, proxyBin: proxyBin, td: td, config: df.Config, contexts: map[string]*clientContext{}}
	for i := range cfg.Contexts {
		u.contexts[cfg.Contexts[i].Name] = &cfg.Contexts[i]
	}
	return u, df, nil
}

func clusterIndex(df *devFile, name string) int {
	return slices.IndexFunc(df.Clusters, func(c devCluster) bool { return c.Name == name })
}

func clusterNames(df *devFile) []string {
	var names []string
	for _, c := range df.Clusters {
		names = append(names, c.Name)
	}
	return names
}

func newDevLinkCmd(g *globals) *cobra.Command {
	var dir, cluster, proxyBin string
	cmd := &cobra.Command{
		Use:   "link --dir DIR --cluster NAME",
		Short: "Link a dev cluster to the first one with a join token; a pending one joins, then its gateway and workloads start",
		Long: `Link cluster NAME of a running ` + "`strait dev up`" + ` to the first cluster (the root
authority), as a user would: a one-time join token from
` + "`strait federation token create --context FIRST --for-cluster NAME`" + ` redeemed by
` + "`strait federation join TOKEN --context NAME`" + `. Nothing is joined again if the
link exists (for instance, made by hand with those commands).

A pending cluster receives its intermediate through the join; then its gateway
and the sample application start, and dev.json records them. Returns once the
link is connected on both sides.`,
		Example: `  strait dev link --dir ./mesh --cluster west`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" || cluster == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--dir and --cluster are required")}
			}
			abs, err := filepath.Abs(dir)
			if err != nil {
				return err
			}
			u, df, err := loadDevUpper(g, abs, proxyBin)
			if err != nil {
				return err
			}
			i := clusterIndex(df, cluster)
			switch {
			case i < 0:
				return fmt.Errorf("no cluster %s in %s (clusters: %s)", cluster, abs, strings.Join(clusterNames(df), ", "))
			case i == 0:
				return fmt.Errorf("%s is the first cluster, the one others link to: name another", cluster)
			}
			ok := false
			defer func() {
				if !ok {
					u.stopStarted()
				}
			}()
			if err := u.link(cmd.Context(), df, i); err != nil {
				return err
			}
			if err := writeDevFile(abs, df); err != nil {
				return err
			}
			ok = true
			u.say("linked: %s and %s (strait federation status --config %s --context %s)", df.Clusters[0].Name, cluster, df.Config, cluster)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory given to strait dev up")
	cmd.Flags().StringVar(&cluster, "cluster", "", "the cluster to link to the first")
	cmd.Flags().StringVar(&proxyBin, "proxy-bin", "", "strait-proxy binary (default: next to strait, then $PATH)")
	return cmd
}

func newDevRunCmd(g *globals) *cobra.Command {
	var dir, cluster, proxyBin string
	var upstreams []string
	instances := 1
	cmd := &cobra.Command{
		Use:   "run SERVICE --dir DIR --cluster NAME [--instances N] [--upstream SVC]...",
		Short: "Start instances of a service (the echo app behind a sidecar) in one running dev cluster",
		Long: `Start N instances of SERVICE (named SERVICE-0, SERVICE-1, ...: ` + "`strait dev echo`" + `
behind a sidecar, identity spiffe://<td>/ns/default/sa/SERVICE) in one cluster
of a running ` + "`strait dev up`" + `, wait until they are ready and record them in
dev.json (so ` + "`strait dev down`" + ` stops them). The sample frontend has a listener for
payments: ` + "`strait dev run payments --cluster west`" + ` gives it something to call,
in west only (export it to linked clusters with a ServiceExport).`,
		Example: `  strait dev run payments --dir ./mesh --cluster west
  strait dev run checkout --dir ./dev --cluster east --instances 2 --upstream payments`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			service := args[0]
			if dir == "" || cluster == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--dir and --cluster are required")}
			}
			if instances < 1 || instances > 16 {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--instances: want 1 to 16")}
			}
			abs, err := filepath.Abs(dir)
			if err != nil {
				return err
			}
			u, df, err := loadDevUpper(g, abs, proxyBin)
			if err != nil {
				return err
			}
			if _, err := identity.Workload(u.td, "default", service); err != nil {
				return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("SERVICE %q: %w", service, err)}
			}
			i := clusterIndex(df, cluster)
			if i < 0 {
				return fmt.Errorf("no cluster %s in %s (clusters: %s)", cluster, abs, strings.Join(clusterNames(df), ", "))
			}
			dc := &df.Clusters[i]
			if dc.Pending {
				return fmt.Errorf("cluster %s is pending (no intermediate yet): join it first with `strait dev link --dir %s --cluster %s`", cluster, abs, cluster)
			}
			if !ours(dc.ControlPlane.PID, abs) {
				return fmt.Errorf("the control plane of %s is not running (pid %d)", cluster, dc.ControlPlane.PID)
			}
			var specs []workloadSpec
			for n := 0; len(specs) < instances; n++ {
				name := service + "-" + strconv.Itoa(n)
				if !slices.ContainsFunc(dc.Workloads, func(w devWorkload) bool { return w.Instance == name }) {
					specs = append(specs, workloadSpec{instance: name, service: service, upstreams: upstreams})
				}
			}
			ok := false
			defer func() {
				if !ok {
					u.stopStarted()
				}
			}()
			if err := u.startWorkloads(cmd.Context(), dc, specs); err != nil {
				return err
			}
			if err := writeDevFile(abs, df); err != nil {
				return err
			}
			ok = true
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory given to strait dev up")
	cmd.Flags().StringVar(&cluster, "cluster", "", "the cluster to run it in")
	cmd.Flags().IntVar(&instances, "instances", 1, "how many instances")
	cmd.Flags().StringSliceVar(&upstreams, "upstream", nil, "a service it calls: its sidecar gets a local listener for it (repeatable)")
	cmd.Flags().StringVar(&proxyBin, "proxy-bin", "", "strait-proxy binary (default: next to strait, then $PATH)")
	return cmd
}
