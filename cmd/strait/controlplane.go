package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/controlplane/local"
	"github.com/straitmesh/strait/internal/wiring"
)

func newControlPlaneCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "controlplane",
		Short: "Run a cluster's control plane (local mode)",
		Long: `Run a cluster's control plane in local mode: processes on one host, state in
a data directory. The control plane holds the cluster's intermediate, issues
SVIDs to sidecars, keeps the service registry and streams configuration.`,
	}
	cmd.AddCommand(newCPInitCmd(g), newCPRunCmd(g), newCPAdminCmd(g), newCPGatewayCredsCmd(g))
	return cmd
}

func newCPInitCmd(g *globals) *cobra.Command {
	var dir, caDir, cluster, tdName string
	var ttl, adminTTL time.Duration
	var force, pending bool
	cmd := &cobra.Command{
		Use:   "init --dir DIR --cluster NAME (--ca-dir CADIR | --pending --trust-domain TD)",
		Short: "Create a control-plane data directory with an intermediate from the mesh CA, or pending one",
		Long: `Create a control-plane data directory.

With --ca-dir, the cluster's intermediate is signed by the mesh CA there.
With --pending, the cluster has no intermediate yet: its control plane waits
for ` + "`strait federation join TOKEN`" + `, through which the root authority's cluster
sends it one. Until then the admin credentials written here come from a
bootstrap CA that exists only in this directory.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if pending {
				if dir == "" || cluster == "" || tdName == "" || caDir != "" {
					return usageError{cmd: cmd.CommandPath(), err: errors.New("--pending needs --dir, --cluster and --trust-domain, and no --ca-dir")}
				}
				td, err := identity.ParseTrustDomain(tdName)
				if err != nil {
					return usageError{cmd: cmd.CommandPath(), err: err}
				}
				if _, err := local.InitPending(dir, cluster, td, force); err != nil {
					return err
				}
				cert, _ := (&local.Dir{Path: dir}).AdminPaths()
				fmt.Fprintf(g.stdout, "control plane for cluster %s initialized pending in %s\n  it waits for `strait federation join TOKEN`\n  bootstrap admin credentials %s\n", cluster, dir, cert)
				return nil
			}
			if dir == "" || cluster == "" || caDir == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--dir, --cluster and --ca-dir are required (or --pending and --trust-domain instead of --ca-dir, for a cluster that receives its intermediate through a join)")}
			}
			auth, err := ca.Open(cmd.Context(), ca.Config{Dir: caDir, Logger: g.logger()})
			if errors.Is(err, ca.ErrBusy) {
				return fmt.Errorf("%w; the root authority's control plane holds it while it runs: initialize every cluster before starting it, or init this one with --pending --trust-domain TD and join it with a token (`strait federation join`)", err)
			}
			if err != nil {
				return err
			}
			defer auth.Close()
			d, err := local.Init(cmd.Context(), dir, cluster, wiring.RootAuthority{CA: auth, Replace: force}, ttl, force)
			if err != nil {
				return err
			}
			iss, err := wiring.NewIssuer(d, 0)
			if err != nil {
				return err
			}
			if _, err := d.MintAdmin(iss, adminTTL); err != nil {
				return err
			}
			cert, _ := d.AdminPaths()
			fmt.Fprintf(g.stdout, "control plane for cluster %s initialized in %s\n  intermediate expires %s\n  admin credentials %s (expire in %s)\n",
				d.Cluster, dir, day(d.Chain[0].NotAfter), cert, adminTTL)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "control-plane data directory (created)")
	cmd.Flags().StringVar(&cluster, "cluster", "", "cluster name (DNS label)")
	cmd.Flags().StringVar(&caDir, "ca-dir", os.Getenv(dataDirEnv), "mesh CA data directory (default $"+dataDirEnv+")")
	cmd.Flags().Var(durationValue{&ttl}, "intermediate-ttl", "intermediate lifetime (default 90d)")
	adminTTL = 24 * time.Hour
	cmd.Flags().Var(durationValue{&adminTTL}, "admin-ttl", "lifetime of the admin credentials")
	cmd.Flags().BoolVar(&force, "force", false, "re-issue the intermediate of an initialized directory")
	cmd.Flags().BoolVar(&pending, "pending", false, "no intermediate yet: wait to receive one through a federation join")
	cmd.Flags().StringVar(&tdName, "trust-domain", "", "the mesh's trust domain (with --pending)")
	return cmd
}

func newCPAdminCmd(g *globals) *cobra.Command {
	var dir string
	ttl := 24 * time.Hour
	cmd := &cobra.Command{
		Use:   "admin-credentials --dir DIR",
		Short: "Re-issue the cluster's admin credentials (the CLI's identity toward the admin API)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--dir is required")}
			}
			d, err := local.Load(dir)
			if err != nil {
				return err
			}
			iss, err := wiring.NewIssuer(d, 0)
			if err != nil {
				return err
			}
			s, err := d.MintAdmin(iss, ttl)
			if err != nil {
				return err
			}
			cert, key := d.AdminPaths()
			fmt.Fprintf(g.stdout, "%s\n  certificate %s\n  key %s\n  expires %s\n", s.ID, cert, key, day(s.Certificates[0].NotAfter))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "control-plane data directory")
	cmd.Flags().Var(durationValue{&ttl}, "ttl", "lifetime (at most 24h)")
	return cmd
}

func newCPGatewayCredsCmd(g *globals) *cobra.Command {
	var dir, out string
	ttl := time.Hour
	cmd := &cobra.Command{
		Use:   "gateway-credentials --dir DIR --out GATEWAY_DIR",
		Short: "Issue a gateway's first credentials (it renews them from the control plane)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" || out == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--dir and --out are required")}
			}
			d, err := local.Load(dir)
			if err != nil {
				return err
			}
			iss, err := wiring.NewIssuer(d, 0)
			if err != nil {
				return err
			}
			s, err := d.MintGateway(iss, ttl, out)
			if err != nil {
				return err
			}
			fmt.Fprintf(g.stdout, "%s\n  written to %s\n  expires %s\n", s.ID, out, s.Certificates[0].NotAfter.UTC().Format(time.RFC3339))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "control-plane data directory")
	cmd.Flags().StringVar(&out, "out", "", "the gateway's data directory (svid.pem, svid-key.pem, bundle.pem)")
	cmd.Flags().Var(durationValue{&ttl}, "ttl", "lifetime (at most 24h)")
	return cmd
}

func newCPRunCmd(g *globals) *cobra.Command {
	var dir, listen, rootDir string
	var svidTTL, reissueWindow time.Duration
	cmd := &cobra.Command{
		Use:   "run --dir DIR --listen HOST:PORT",
		Short: "Serve the control plane until interrupted",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--dir is required")}
			}
			log := slog.New(slog.NewTextHandler(g.stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
			o := wiring.ControlPlaneOptions{Dir: dir, Listen: listen, SVIDTTL: svidTTL, Logger: log, ReissueWindow: reissueWindow}
			if rootDir != "" {
				auth, err := ca.Open(cmd.Context(), ca.Config{Dir: rootDir, Logger: log})
				if err != nil {
					return fmt.Errorf("root authority: %w", err)
				}
				defer auth.Close()
				o.RootAuthority = wiring.RootAuthority{CA: auth}
			}
			return wiring.RunControlPlane(cmd.Context(), o)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "control-plane data directory (from strait controlplane init)")
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:7400", "gRPC listen address")
	cmd.Flags().Var(durationValue{&svidTTL}, "svid-ttl", "lifetime of the SVIDs issued (default 1h)")
	cmd.Flags().Var(durationValue{&reissueWindow}, "reissue-window", "after a root rotation re-signs the intermediate, sidecars and gateways renew their SVIDs at random within this window (default 30s)")
	cmd.Flags().StringVar(&rootDir, "root-authority", "", "mesh CA directory: this cluster is the root authority and signs the intermediates of clusters that join pending")
	return cmd
}
