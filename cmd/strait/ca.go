package main

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	"github.com/straitmesh/strait/internal/atomicfile"
)

const dataDirEnv = "STRAIT_CA_DIR"

type caFlags struct {
	g       *globals
	dataDir string
}

func (f *caFlags) register(cmd *cobra.Command) {
	cmd.PersistentFlags().StringVar(&f.dataDir, "data-dir", os.Getenv(dataDirEnv), "CA data directory (default $"+dataDirEnv+")")
}

func (f *caFlags) dir(cmd *cobra.Command) (string, error) {
	if f.dataDir == "" {
		return "", usageError{cmd: cmd.CommandPath(), err: errors.New("--data-dir is required")}
	}
	return f.dataDir, nil
}

func (f *caFlags) open(cmd *cobra.Command, readOnly bool) (*ca.Authority, error) {
	a, err := f.openDir(cmd, readOnly)
	if errors.Is(err, ca.ErrBusy) {
		return nil, fmt.Errorf("%w; the root authority's control plane (controlplane run --root-authority) holds it while it runs: stop it first (`strait dev down --dir DIR` for a dev mesh)", err)
	}
	return a, err
}

func (f *caFlags) openDir(cmd *cobra.Command, readOnly bool) (*ca.Authority, error) {
	dir, err := f.dir(cmd)
	if err != nil {
		return nil, err
	}
	return ca.Open(cmd.Context(), ca.Config{Dir: dir, Logger: f.g.logger(), ReadOnly: readOnly})
}

func newCACmd(g *globals) *cobra.Command {
	f := &caFlags{g: g}
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "Manage the mesh certificate authority",
		Long: `Manage the mesh certificate authority: the mesh root (held by the root
authority cluster), cluster intermediates, X.509-SVIDs and root rotation.`,
	}
	f.register(cmd)
	cmd.AddCommand(newCAInitCmd(f), newCAStatusCmd(f), newCAMintCmd(f), newCAIntermediateCmd(f),
		newCABundleCmd(f), newCAVerifyCmd(f), newCARotateCmd(f))
	return cmd
}

func newCAInitCmd(f *caFlags) *cobra.Command {
	var (
		tdName, cluster, kmsURI string
		rootTTL, interTTL       time.Duration
		force                   bool
	)
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create the mesh root and trust bundle",
		Long: `Create the mesh root (ECDSA P-256) and the trust bundle in the data directory.
The root key is a 0600 file under DATA_DIR/keys unless --kms names a KMS.
With --cluster, also create that cluster's intermediate (the root authority's own cluster).`,
		Example: "  strait ca init --trust-domain strait.example --data-dir ./ca --cluster east",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			dir, err := f.dir(cmd)
			if err != nil {
				return err
			}
			if tdName == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--trust-domain is required")}
			}
			td, err := identity.ParseTrustDomain(tdName)
			if err != nil {
				return err
			}
			if cluster != "" {
				if err := identity.ValidateClusterName(cluster); err != nil {
					return err
				}
			}
			a, err := ca.Init(cmd.Context(), ca.Config{Dir: dir, Logger: f.g.logger()}, ca.InitOptions{TrustDomain: td, RootTTL: rootTTL, KMS: kmsURI, Force: force})
			if err != nil {
				return err
			}
			defer a.Close()
			st := a.Status()
			out := f.g.stdout
			fmt.Fprintf(out, "Created mesh root %s for trust domain %s in %s\n", st.Roots[0].ID, td.Name(), dir)
			fmt.Fprintf(out, "  valid until %s, key %s\n", st.Roots[0].NotAfter.UTC().Format(time.RFC3339), st.Roots[0].Key)
			fmt.Fprintf(out, "  trust bundle: %s (sequence %d, %s)\n", filepath.Join(dir, "bundle.json"), st.Bundle.Sequence, st.Bundle.Digest)
			if cluster != "" {
				c, err := a.CreateIntermediate(cmd.Context(), cluster, interTTL, false)
				if err != nil {
					return err
				}
				fmt.Fprintf(out, "Created intermediate for cluster %s, valid until %s\n", cluster, c.NotAfter.UTC().Format(time.RFC3339))
			} else {
				fmt.Fprintf(out, "Next: per cluster, strait controlplane init --dir DIR --cluster NAME --ca-dir %s\n", dir)
				fmt.Fprintf(out, "  (or, to mint SVIDs here without a control plane: strait ca intermediate create --data-dir %s --cluster NAME)\n", dir)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&tdName, "trust-domain", "", "trust domain of the mesh, e.g. strait.example (required)")
	cmd.Flags().StringVar(&cluster, "cluster", "", "also create this cluster's intermediate")
	cmd.Flags().StringVar(&kmsURI, "kms", "", "smallstep KMS URI for keys (default: 0600 files in the data directory)")
	cmd.Flags().Var(durationValue{&rootTTL}, "root-ttl", "root lifetime (default 3650d)")
	cmd.Flags().Var(durationValue{&interTTL}, "intermediate-ttl", "intermediate lifetime with --cluster (default 90d)")
	cmd.Flags().BoolVar(&force, "force", false, "replace an existing CA (its state is kept as a backup)")
	return cmd
}

func newCAStatusCmd(f *caFlags) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show roots, intermediates and the trust bundle",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("-o %q: want text or json", output)}
			}
			a, err := f.open(cmd, true)
			if err != nil {
				return err
			}
			defer a.Close()
			st := a.Status()
			if output == "json" {
				enc := json.NewEncoder(f.g.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			printStatus(f.g.stdout, st)
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output format: text or json")
	return cmd
}

func printStatus(w io.Writer, st ca.Status) {
	fmt.Fprintf(w, "Trust domain:  %s\n", st.TrustDomain)
	fmt.Fprintf(w, "Trust bundle:  sequence %d, roots %s\n", st.Bundle.Sequence, strings.Join(st.Bundle.Roots, ", "))
	fmt.Fprintf(w, "               digest %s\n\n", st.Bundle.Digest)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ROOT\tSTATE\tIN BUNDLE\tNOT AFTER\tSHA-256 FINGERPRINT")
	for _, r := range st.Roots {
		fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\n", r.ID, r.State, yesNo(r.InBundle), day(r.NotAfter), r.Fingerprint)
	}
	tw.Flush()
	for _, r := range st.Roots {
		if r.RetireAfter != nil {
			fmt.Fprintf(w, "Root %s can be retired after %s (every SVID issued with a chain to it has expired then)\n", r.ID, r.RetireAfter.UTC().Format(time.RFC3339))
		}
	}
	fmt.Fprintln(w)
	if len(st.Intermediates) == 0 {
		fmt.Fprintln(w, "No cluster intermediates yet.")
		return
	}
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CLUSTER\tROOT\tSTATE\tNOT AFTER\tKEY HERE\tSHA-256 FINGERPRINT")
	for _, im := range st.Intermediates {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", im.Cluster, im.RootID, im.State, day(im.NotAfter), yesNo(im.KeyHeldHere), im.Fingerprint)
	}
	tw.Flush()
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func day(t time.Time) string { return t.UTC().Format("2006-01-02 15:04Z") }

func newCAMintCmd(f *caFlags) *cobra.Command {
	var (
		id, outDir, cluster string
		ttl                 time.Duration
	)
	cmd := &cobra.Command{
		Use:   "mint",
		Short: "Issue an X.509-SVID with a key generated here (operator escape hatch)",
		Long: `Issue an X.509-SVID for any SPIFFE ID of the trust domain, signed by a cluster
intermediate held in the data directory, with a new key generated here. Writes
svid.pem (leaf then intermediate), key.pem (0600) and bundle.pem to --out.
Workloads normally get SVIDs from their control plane with a CSR instead.`,
		Example: "  strait ca mint --data-dir ./ca --spiffe-id spiffe://strait.example/ns/shop/sa/web --out ./web",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if id == "" || outDir == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--spiffe-id and --out are required")}
			}
			sid, err := identity.Parse(id)
			if err != nil {
				return err
			}
			if ttl > ca.MaxSVIDTTL {
				return fmt.Errorf("--ttl %s is more than the cap of %s", ttl, ca.MaxSVIDTTL)
			}
			a, err := f.open(cmd, false)
			if err != nil {
				return err
			}
			defer a.Close()
			iss, err := a.Issuer(cluster)
			if err != nil {
				return err
			}
			s, err := iss.MintSVID(sid, ttl)
			if err != nil {
				return err
			}
			certPEM, keyPEM, err := s.Marshal()
			if err != nil {
				return fmt.Errorf("encode SVID: %w", err)
			}
			if err := os.MkdirAll(outDir, 0o700); err != nil {
				return err
			}
			files := []struct {
				name string
				data []byte
				perm os.FileMode
			}{{"key.pem", keyPEM, 0o600}, {"svid.pem", certPEM, 0o644}, {"bundle.pem", a.Bundle().MarshalPEM(), 0o644}}
			for _, fl := range files {
				if err := atomicfile.WriteFile(filepath.Join(outDir, fl.name), fl.data, fl.perm); err != nil {
					return err
				}
			}
			leaf := s.Certificates[0]
			fmt.Fprintf(f.g.stdout, "Minted %s\n  valid %s to %s, serial %s\n  wrote %s/{svid.pem,key.pem,bundle.pem}\n",
				sid, day(leaf.NotBefore), day(leaf.NotAfter), leaf.SerialNumber.Text(16), outDir)
			return nil
		},
	}
	cmd.Flags().StringVar(&id, "spiffe-id", "", "SPIFFE ID to issue, e.g. spiffe://strait.example/ns/NS/sa/SA (required)")
	cmd.Flags().StringVar(&outDir, "out", "", "directory to write svid.pem, key.pem and bundle.pem (required)")
	cmd.Flags().StringVar(&cluster, "cluster", "", "cluster whose intermediate signs (default: the only one held here)")
	cmd.Flags().Var(durationValue{&ttl}, "ttl", "SVID lifetime (default 1h, at most 24h)")
	return cmd
}

func newCAIntermediateCmd(f *caFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "intermediate",
		Short: "Create or sign cluster intermediates",
	}
	var (
		cluster, csrFile, out string
		ttl                   time.Duration
		force                 bool
	)
	create := &cobra.Command{
		Use:   "create",
		Short: "Create a cluster intermediate whose key is kept in the data directory",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cluster == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--cluster is required")}
			}
			a, err := f.open(cmd, false)
			if err != nil {
				return err
			}
			defer a.Close()
			c, err := a.CreateIntermediate(cmd.Context(), cluster, ttl, force)
			if err != nil {
				return err
			}
			fmt.Fprintf(f.g.stdout, "Created intermediate for cluster %s (serial %s), valid until %s\n", cluster, c.SerialNumber.Text(16), day(c.NotAfter))
			return nil
		},
	}
	create.Flags().StringVar(&cluster, "cluster", "", "cluster name (required)")
	create.Flags().Var(durationValue{&ttl}, "ttl", "lifetime (default 90d, at most 365d, never past the root)")
	create.Flags().BoolVar(&force, "force", false, "replace the cluster's existing intermediate")

	sign := &cobra.Command{
		Use:   "sign",
		Short: "Sign a cluster intermediate from a CSR made where its key lives",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cluster == "" || csrFile == "" || out == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--cluster, --csr and --out are required")}
			}
			der, err := readCSR(csrFile)
			if err != nil {
				return err
			}
			// Fail before signing, not after, if the output cannot be written.
			probe, err := os.CreateTemp(filepath.Dir(out), ".strait-probe-*")
			if err != nil {
				return fmt.Errorf("--out %s: %w", out, err)
			}
			probe.Close()
			os.Remove(probe.Name())
			a, err := f.open(cmd, false)
			if err != nil {
				return err
			}
			defer a.Close()
			c, err := a.SignIntermediate(cmd.Context(), ca.IntermediateRequest{Cluster: cluster, CSR: der, TTL: ttl, Replace: force})
			if err != nil {
				return err
			}
			if err := atomicfile.WriteFile(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}), 0o644); err != nil {
				return err
			}
			fmt.Fprintf(f.g.stdout, "Signed intermediate for cluster %s, valid until %s; wrote %s\n", cluster, day(c.NotAfter), out)
			return nil
		},
	}
	sign.Flags().StringVar(&cluster, "cluster", "", "cluster name (required)")
	sign.Flags().StringVar(&csrFile, "csr", "", "PEM or DER CSR file (required)")
	sign.Flags().StringVar(&out, "out", "", "file to write the intermediate certificate (PEM) to (required)")
	sign.Flags().Var(durationValue{&ttl}, "ttl", "lifetime (default 90d, at most 365d, never past the root)")
	sign.Flags().BoolVar(&force, "force", false, "replace an intermediate whose key is held in this data directory")
	cmd.AddCommand(create, sign)
	return cmd
}

func readCSR(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(data) > 64<<10 {
		return nil, fmt.Errorf("%s: %d bytes is too large for a CSR", path, len(data))
	}
	if block, _ := pem.Decode(data); block != nil {
		if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
			return nil, fmt.Errorf("%s: PEM block %q, want CERTIFICATE REQUEST", path, block.Type)
		}
		return block.Bytes, nil
	}
	return data, nil
}

func newCABundleCmd(f *caFlags) *cobra.Command {
	var format string
	cmd := &cobra.Command{
		Use:   "bundle",
		Short: "Print the trust bundle (SPIFFE JWKS or PEM)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			a, err := f.open(cmd, true)
			if err != nil {
				return err
			}
			defer a.Close()
			switch format {
			case "jwks", "spiffe":
				data, err := a.Bundle().MarshalJWKS()
				if err != nil {
					return err
				}
				var pretty bytes.Buffer
				if err := json.Indent(&pretty, data, "", "  "); err != nil {
					return err
				}
				fmt.Fprintf(f.g.stdout, "%s\n", pretty.Bytes())
			case "pem":
				f.g.stdout.Write(a.Bundle().MarshalPEM())
			default:
				return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("--format %q: want jwks or pem", format)}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&format, "format", "jwks", "jwks (SPIFFE bundle format) or pem")
	return cmd
}

func newCAVerifyCmd(f *caFlags) *cobra.Command {
	var certFile, role string
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Verify an X.509-SVID against the current trust bundle",
		Long: `Verify an X.509-SVID (leaf first, then intermediates, PEM) exactly as mesh
members do: chain to a root in the bundle, exactly one SPIFFE ID, key usage and
extended key usage, validity, trust domain.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if certFile == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--cert is required")}
			}
			roles := map[string]svid.Role{"any": svid.RoleAny, "server": svid.RoleServer, "client": svid.RoleClient}
			r, ok := roles[role]
			if !ok {
				return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("--role %q: want any, server or client", role)}
			}
			chain, err := readCertChain(certFile)
			if err != nil {
				return err
			}
			a, err := f.open(cmd, true)
			if err != nil {
				return err
			}
			defer a.Close()
			b := a.Bundle()
			v, err := svid.NewVerifier(svid.VerifierConfig{TrustDomain: b.TrustDomain(), Bundles: b})
			if err != nil {
				return err
			}
			describeChain(f.g.stdout, chain)
			id, chains, err := v.Verify(chain, r)
			if err != nil {
				return fmt.Errorf("REFUSED (%s): %w", svid.ReasonOf(err), err)
			}
			fmt.Fprintf(f.g.stdout, "OK: %s verified against bundle sequence %d (root %s)\n", id, b.Sequence(), chains[0][len(chains[0])-1].Subject.CommonName)
			return nil
		},
	}
	cmd.Flags().StringVar(&certFile, "cert", "", "PEM file with the SVID and its chain (required)")
	cmd.Flags().StringVar(&role, "role", "any", "role to check the extended key usage for: any, server or client")
	return cmd
}

func readCertChain(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var chain []*x509.Certificate
	for rest := data; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: certificate %d: %w", path, len(chain), err)
		}
		chain = append(chain, c)
		if len(chain) > svid.MaxChainLength {
			return nil, fmt.Errorf("%s: more than %d certificates", path, svid.MaxChainLength)
		}
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("%s: no PEM certificates found", path)
	}
	return chain, nil
}

func describeChain(w io.Writer, chain []*x509.Certificate) {
	for i, c := range chain {
		kind := "leaf"
		if i > 0 {
			kind = "intermediate"
		}
		var uris []string
		for _, u := range c.URIs {
			uris = append(uris, u.String())
		}
		fmt.Fprintf(w, "%-12s subject %q, URI SAN %s, valid %s to %s\n", kind, c.Subject.String(), strings.Join(uris, ","), day(c.NotBefore), day(c.NotAfter))
	}
}
