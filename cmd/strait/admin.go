package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/status"

	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/resource"
	"github.com/straitmesh/strait/controlplane/store"
)

// rpcError turns a gRPC status into the server's message, or into the
// client's own account of a call that did not reach the API (callError).
func rpcError(err error) error {
	var ce *callError
	if errors.As(err, &ce) {
		return ce
	}
	if s, ok := status.FromError(err); ok {
		return fmt.Errorf("%s: %s", codeWords(s.Code().String()), s.Message())
	}
	return err
}

// codeWords turns a gRPC code name ("PermissionDenied") into words
// ("permission denied").
func codeWords(name string) string {
	var b strings.Builder
	for i, r := range name {
		if i > 0 && r >= 'A' && r <= 'Z' {
			b.WriteByte(' ')
		}
		b.WriteRune(r)
	}
	return strings.ToLower(b.String())
}

// maxApplyInput bounds what `strait apply -f -` reads from stdin.
const maxApplyInput = 8 << 20

// readLimited reads all of r, refusing more than max bytes: input cut off
// at the limit could still decode, and apply only part of what was given.
func readLimited(r io.Reader, max int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > max {
		return nil, fmt.Errorf("more than %d MiB; nothing applied", max>>20)
	}
	return data, nil
}

func newApplyCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	var file string
	var dryRun bool
	cmd := &cobra.Command{
		Use:   "apply -f FILE",
		Short: "Create or update resources (TrafficPolicy, AuthorizationPolicy, ServiceExport) from YAML or JSON",
		Long: `Create or update resources from a file of Kubernetes-style documents
(apiVersion, kind, metadata, spec), separated by "---". Use -f - for stdin.
Every document is checked before anything is stored: one invalid field and
nothing is applied. The kinds and their fields are described in
docs/local-mode.md; unset fields take the defaults listed in
controlplane/resource/doc.go.`,
		Example: `  strait apply -f policy.yaml --config dev/strait.config
  strait apply -f export.yaml --config mesh/strait.config --context west
  strait get trafficpolicy -o yaml --config dev/strait.config | strait apply -f - --config dev/strait.config`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if file == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("-f FILE is required")}
			}
			var data []byte
			var err error
			if file == "-" {
				if data, err = readLimited(os.Stdin, maxApplyInput); err != nil {
					err = fmt.Errorf("stdin: %w", err)
				}
			} else {
				data, err = os.ReadFile(file)
			}
			if err != nil {
				return err
			}
			objs, err := resource.Decode(data)
			if err != nil {
				return fmt.Errorf("%s: %w", file, err)
			}
			ctx, client, cx, done, err := f.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			td, err := identity.ParseTrustDomain(cx.TrustDomain)
			if err != nil {
				return err
			}
			req := &controlplanev1.ApplyRequest{DryRun: dryRun}
			var problems []string
			seen := map[string]int{} // kind/namespace/name -> document
			for _, o := range objs {
				if _, err := resource.Validate(o, td); err != nil {
					problems = append(problems, err.Error())
					continue
				}
				k := o.Kind + "/" + o.Metadata.Namespace + "/" + o.Metadata.Name
				if prev, dup := seen[k]; dup {
					problems = append(problems, (&resource.Error{Doc: o.Doc, Kind: o.Kind, Namespace: o.Metadata.Namespace, Name: o.Metadata.Name,
						Fields: []resource.FieldError{{Message: fmt.Sprintf("names the same object as document %d", prev)}}}).Error())
					continue
				}
				seen[k] = o.Doc
				p, err := resource.ToProto(o)
				if err != nil {
					return err
				}
				req.Resources = append(req.Resources, p)
			}
			if len(problems) > 0 {
				return fmt.Errorf("%s: nothing applied:\n%s", file, strings.Join(problems, "\n"))
			}
			resp, err := client.Apply(ctx, req)
			if err != nil {
				return rpcError(err)
			}
			for _, r := range resp.GetResults() {
				fmt.Fprintf(g.stdout, "%s %s/%s %s\n", strings.ToLower(r.GetKind()), r.GetNamespace(), r.GetName(), r.GetAction())
			}
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringVarP(&file, "filename", "f", "", "file to apply (- for stdin)")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "validate on the server, store nothing")
	return cmd
}

func newGetCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	var ns, output string
	cmd := &cobra.Command{
		Use:   "get KIND [NAME]",
		Short: "List stored resources of a kind",
		Long:  "List stored resources of a kind: " + strings.Join(resource.Kinds(), ", ") + " (or tp, ap, se).",
		Example: `  strait get ap --config dev/strait.config
  strait get trafficpolicy backend -n default -o yaml --config dev/strait.config`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			kind, err := resource.KnownKind(args[0])
			if err != nil {
				return usageError{cmd: cmd.CommandPath(), err: err}
			}
			name := ""
			if len(args) == 2 {
				name = args[1]
			}
			if output != "" && output != "table" && output != "yaml" {
				return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("-o: want table or yaml, got %q", output)}
			}
			ctx, client, _, done, err := f.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := client.List(ctx, &controlplanev1.ListRequest{Kind: kind, Namespace: ns, Name: name})
			if err != nil {
				return rpcError(err)
			}
			if name != "" && len(resp.GetResources()) == 0 {
				return fmt.Errorf("%s %q not found", kind, name)
			}
			switch output {
			case "yaml":
				var objs []resource.Object
				for _, r := range resp.GetResources() {
					o, err := resource.FromProto(r)
					if err != nil {
						return err
					}
					objs = append(objs, o)
				}
				out, err := resource.Encode(objs)
				if err != nil {
					return err
				}
				g.stdout.Write(out)
			case "", "table":
				if len(resp.GetResources()) == 0 {
					where := "in any namespace"
					if ns != "" {
						where = "in namespace " + ns
					}
					fmt.Fprintf(g.stderr, "no %s found %s\n", kind, where)
					return nil
				}
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "KIND\tNAMESPACE\tNAME\tGENERATION")
				for _, r := range resp.GetResources() {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", r.GetKind(), r.GetNamespace(), r.GetName(), r.GetGeneration())
				}
				tw.Flush()
			default:
				return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("-o: want table or yaml, got %q", output)}
			}
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringVarP(&ns, "namespace", "n", "", "namespace (default: all)")
	cmd.Flags().StringVarP(&output, "output", "o", "table", "table or yaml")
	return cmd
}

func newDeleteCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	ns := "default"
	cmd := &cobra.Command{
		Use:   "delete KIND NAME",
		Short: "Delete a stored resource",
		Long:  "Delete a stored resource of a kind: " + strings.Join(resource.Kinds(), ", ") + " (or tp, ap, se), by name, in the namespace -n.",
		Example: `  strait delete authorizationpolicy backend-callers --config dev/strait.config
  strait delete se payments -n default --config mesh/strait.config --context west`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			kind, err := resource.KnownKind(args[0])
			if err != nil {
				return usageError{cmd: cmd.CommandPath(), err: err}
			}
			ctx, client, _, done, err := f.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			if _, err := client.Delete(ctx, &controlplanev1.DeleteRequest{Kind: kind, Namespace: ns, Name: args[1]}); err != nil {
				return rpcError(err)
			}
			fmt.Fprintf(g.stdout, "%s %s/%s deleted\n", strings.ToLower(kind), ns, args[1])
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringVarP(&ns, "namespace", "n", ns, "namespace")
	return cmd
}

func newStatusCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show a control plane's state: trust, instances and connected sidecars",
		Example: `  strait status --config dev/strait.config
  strait status --config mesh/strait.config --context west`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, client, _, done, err := f.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			st, err := client.Status(ctx, &controlplanev1.StatusRequest{})
			if err != nil {
				return rpcError(err)
			}
			printCPStatus(g.stdout, st)
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

func printCPStatus(w io.Writer, st *controlplanev1.StatusResponse) {
	if st.GetBundleDigest() == "" {
		// Only a pending control plane answers without a bundle.
		fmt.Fprintf(w, "cluster %s  trust domain %s\n  pending: no intermediate or bundle yet; it serves only the join (strait federation join TOKEN)\n", st.GetCluster(), st.GetTrustDomain())
		return
	}
	fmt.Fprintf(w, "cluster %s  trust domain %s\n  bundle %s\n  snapshot version %d\n", st.GetCluster(), st.GetTrustDomain(), st.GetBundleDigest(), st.GetSnapshotVersion())
	if st.GetIntermediateExpiresAt() != nil {
		fmt.Fprintf(w, "  intermediate expires %s\n", day(st.GetIntermediateExpiresAt().AsTime()))
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nINSTANCE\tSERVICE\tADDRESS\tHEALTH\tSNAPSHOT\tBUNDLE IN SYNC\tSPIFFE ID")
	nodes := map[string]*controlplanev1.NodeStatus{}
	for _, n := range st.GetNodes() {
		nodes[n.GetNode()] = n
	}
	for _, in := range st.GetInstances() {
		n := nodes[in.GetName()]
		health, version, sync := "-", "-", "-"
		if n != nil {
			health = strings.TrimPrefix(n.GetHealth().String(), "HEALTH_")
			version = fmt.Sprint(n.GetVersion())
			if !n.GetConnected() {
				version += " (disconnected)"
			}
			sync = yesNo(n.GetBundleDigest() == st.GetBundleDigest())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", in.GetName(), in.GetService(), in.GetAddress(), health, version, sync, in.GetSpiffeId())
	}
	tw.Flush()
}

func newWorkloadCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "workload",
		Short: "Manage workloads' registration",
	}
	cmd.AddCommand(newWorkloadTokenCmd(g))
	return cmd
}

func newWorkloadTokenCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	var service, ns, sa string
	ttl := 10 * time.Minute
	cmd := &cobra.Command{
		Use:   "token --service S [--namespace N] [--service-account A]",
		Short: "Mint a short-lived, single-use registration token for a sidecar",
		Long: `Mint a short-lived, single-use registration token. A sidecar presents it on
its first Certify and receives the SVID spiffe://<trust domain>/ns/N/sa/A;
it renews with that SVID afterwards. The token is printed once, on stdout
(give it to strait-proxy with --token-file); its identity and expiry on stderr.`,
		Example: `  strait workload token --service payments --config dev/strait.config > payments.token
  strait workload token --service web --namespace shop --service-account web --ttl 30m --config dev/strait.config`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if service == "" {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--service is required")}
			}
			saDefaulted := sa == ""
			if saDefaulted {
				sa = service
			}
			if err := store.CheckTokenRequest(store.TokenRequest{Namespace: ns, ServiceAccount: sa, Service: service}); err != nil {
				msg := strings.TrimPrefix(err.Error(), store.ErrInvalid.Error()+": ")
				if saDefaulted && strings.HasPrefix(msg, `service "`) {
					msg += " (it is also the service account unless --service-account is given)"
				}
				return usageError{cmd: cmd.CommandPath(), err: errors.New(msg)}
			}
			if ttl != 0 && (ttl < store.MinTokenTTL || ttl > store.MaxTokenTTL) {
				return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("--ttl %s: a registration token lives from %s to %s", ttl, store.MinTokenTTL, store.MaxTokenTTL)}
			}
			ctx, client, _, done, err := f.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := client.CreateRegistrationToken(ctx, &controlplanev1.CreateRegistrationTokenRequest{
				Namespace: ns, ServiceAccount: sa, Service: service, TtlSeconds: uint32(ttl / time.Second)})
			if err != nil {
				return rpcError(err)
			}
			fmt.Fprintln(g.stdout, resp.GetToken())
			fmt.Fprintf(g.stderr, "token for %s, single use, expires %s\n", resp.GetSpiffeId(), resp.GetExpiresAt().AsTime().UTC().Format(time.RFC3339))
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&service, "service", "", "service the workload serves")
	cmd.Flags().StringVar(&ns, "namespace", "default", "namespace")
	cmd.Flags().StringVar(&sa, "service-account", "", "service account (default: the service name)")
	cmd.Flags().Var(durationValue{&ttl}, "ttl", "lifetime (10s to 1h)")
	return cmd
}
