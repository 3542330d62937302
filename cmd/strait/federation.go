package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/federation/token"
)

// federation connects to the context's FederationService; the calls are
// bounded by timeout.
func (f *clientFlags) federation(cmd *cobra.Command, timeout time.Duration) (context.Context, controlplanev1.FederationServiceClient, func(), error) {
	ctx, conn, _, done, err := f.call(cmd, timeout)
	if err != nil {
		return nil, nil, nil, err
	}
	return ctx, controlplanev1.NewFederationServiceClient(conn), done, nil
}

func newFederationCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "federation",
		Short: "Link clusters into one mesh: join tokens, joins, links and their status",
		Long: `Link clusters into one mesh.

On the cluster that invites:   strait federation token create --ttl 15m
On the cluster that joins:     strait federation join TOKEN
On either:                     strait federation status

A token is one-time and short-lived, pins the inviting cluster's trust bundle
(no trust on first use) and carries no credentials: the joiner proves it
holds the token on the TLS channel it redeems it on.`,
	}
	token := &cobra.Command{Use: "token", Short: "Create, list and revoke join tokens"}
	token.AddCommand(newTokenCreateCmd(g), newTokenListCmd(g), newTokenRevokeCmd(g))
	cmd.AddCommand(token, newJoinCmd(g), newFederationStatusCmd(g), newUnlinkCmd(g), newAuditCmd(g))
	return cmd
}

func newTokenCreateCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	var ttl time.Duration
	var forCluster string
	cmd := &cobra.Command{
		Use:   "create [--ttl 15m] [--for-cluster NAME]",
		Short: "Print a one-time join token for another cluster",
		Long: `Print a one-time join token for another cluster on stdout, and its ID and
expiry on stderr. Run it on the inviting cluster, then redeem the token on the
joining cluster with ` + "`strait federation join TOKEN`" + `. The token names this
cluster's gateway addresses, so the gateway must be connected. A new token
--for-cluster NAME supersedes an unused older one for the same cluster.`,
		Example: `  strait federation token create --for-cluster west --config mesh/strait.config --context east`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, client, done, err := f.federation(cmd, 15*time.Second)
			if err != nil {
				return err
			}
			defer done()
			resp, err := client.CreateJoinToken(ctx, &controlplanev1.CreateJoinTokenRequest{Ttl: durationpb.New(ttl), ForCluster: forCluster})
			if err != nil {
				return rpcError(err)
			}
			fmt.Fprintln(g.stdout, resp.GetToken())
			info := resp.GetInfo()
			who := "any cluster"
			if info.GetForCluster() != "" {
				who = "cluster " + info.GetForCluster()
			}
			fmt.Fprintf(g.stderr, "token %s for %s, valid until %s; redeem it once with `strait federation join TOKEN`\n", info.GetId(), who, info.GetExpires().AsTime().UTC().Format(time.RFC3339))
			return nil
		},
	}
	ttl = 15 * time.Minute
	cmd.Flags().Var(durationValue{&ttl}, "ttl", "lifetime of the token, 1s to 24h")
	cmd.Flags().StringVar(&forCluster, "for-cluster", "", "only this cluster may redeem the token")
	f.register(cmd)
	return cmd
}

func newTokenListCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List join tokens and their state (never their secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, client, done, err := f.federation(cmd, 15*time.Second)
			if err != nil {
				return err
			}
			defer done()
			resp, err := client.ListJoinTokens(ctx, &controlplanev1.ListJoinTokensRequest{})
			if err != nil {
				return rpcError(err)
			}
			tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tSTATE\tFOR\tCREATED\tEXPIRES\tUSED BY")
			for _, t := range resp.GetTokens() {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", t.GetId(), t.GetState(), dash(t.GetForCluster()),
					t.GetCreated().AsTime().UTC().Format(time.RFC3339), t.GetExpires().AsTime().UTC().Format(time.RFC3339), dash(t.GetUsedBy()))
			}
			return tw.Flush()
		},
	}
	f.register(cmd)
	return cmd
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newTokenRevokeCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	cmd := &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke an unused join token",
		Long: `Revoke an unused join token by its ID (the 26 characters that
` + "`strait federation token create`" + ` prints on stderr and ` + "`strait federation token list`" + `
shows), on the cluster that created it. A revoked token is refused when
redeemed. Revoking twice is harmless; a used token cannot be revoked (remove
the link with ` + "`strait federation unlink PEER`" + ` instead).`,
		Example: `  strait federation token list --config mesh/strait.config --context east
  strait federation token revoke mdev62bg52rqwj4cjlgdjnq6xq --config mesh/strait.config --context east`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkTokenID(args[0]); err != nil {
				return usageError{cmd: cmd.CommandPath(), err: err}
			}
			ctx, client, done, err := f.federation(cmd, 15*time.Second)
			if err != nil {
				return err
			}
			defer done()
			if _, err := client.RevokeJoinToken(ctx, &controlplanev1.RevokeJoinTokenRequest{Id: args[0]}); err != nil {
				if status.Code(err) == codes.NotFound {
					return fmt.Errorf("no join token %s on this cluster: `strait federation token list` shows its tokens (a token is revoked on the cluster that created it)", args[0])
				}
				return rpcError(err)
			}
			fmt.Fprintf(g.stdout, "token %s revoked\n", args[0])
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

// checkTokenID refuses what is not a join token's ID before anything is
// dialed, the token itself (a likely mix-up) with the ID to give instead.
func checkTokenID(s string) error {
	if strings.HasPrefix(strings.TrimSpace(s), token.Prefix) {
		if tok, err := token.Parse(s); err == nil {
			return fmt.Errorf("that is a join token, not its ID: revoke it with `strait federation token revoke %s`", tok.ID())
		}
		return fmt.Errorf("that looks like a join token, not its ID: give the token's ID (%d characters, as `strait federation token list` shows)", token.IDStringLength)
	}
	if _, err := token.ParseID(s); err != nil {
		return fmt.Errorf("%q is not a join token ID: an ID is %d characters of a-z and 2-7, as `strait federation token create` prints on stderr and `strait federation token list` shows", s, token.IDStringLength)
	}
	return nil
}

func newJoinCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	cmd := &cobra.Command{
		Use:   "join TOKEN",
		Short: "Join the mesh of the cluster that created TOKEN",
		Long: `Join the mesh of the cluster that created TOKEN: this cluster's control plane
dials that cluster's gateway, checks it against the trust bundle the token
pins, proves the token on that TLS channel and stores the link. A cluster
installed without an intermediate (pending) receives it through the join.

A refused token says why: malformed, truncated, tampered with, expired, not
yet valid, for another cluster, revoked, superseded, already used or unknown.`,
		Example: `  TOKEN=$(strait federation token create --for-cluster west --config mesh/strait.config --context east)
  strait federation join "$TOKEN" --config mesh/strait.config --context west`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			// A malformed, tampered or expired token is refused here,
			// before anything is dialed (the control plane checks again).
			tok, err := token.Parse(strings.TrimSpace(args[0]))
			if err != nil {
				return err
			}
			if exp := tok.ExpiresAt(); !time.Now().Before(exp.Add(token.DefaultClockSkew)) {
				return fmt.Errorf("federation: join token refused: it expired at %s: create a new one on cluster %q", exp.Format(time.RFC3339), tok.Issuer())
			}
			ctx, client, done, err := f.federation(cmd, 60*time.Second)
			if err != nil {
				return err
			}
			defer done()
			fmt.Fprintln(g.stderr, "joining: dialing the issuer's gateway, checking it against the pinned bundle, proving the token...")
			resp, err := client.Join(ctx, &controlplanev1.JoinRequest{Token: strings.TrimSpace(args[0])})
			if err != nil {
				return rpcError(err)
			}
			l := resp.GetLink()
			fmt.Fprintf(g.stdout, "linked with %s (link %s)\n", l.GetPeer(), l.GetId())
			if resp.GetReceivedIntermediate() {
				fmt.Fprintln(g.stdout, "received this cluster's intermediate from the root authority; the control plane now issues SVIDs")
			}
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

func newUnlinkCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	cmd := &cobra.Command{
		Use:   "unlink PEER",
		Short: "Remove the link to PEER: its traffic is refused at once, open sessions included",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, client, done, err := f.federation(cmd, 15*time.Second)
			if err != nil {
				return err
			}
			defer done()
			if _, err := client.RemoveLink(ctx, &controlplanev1.RemoveLinkRequest{Peer: args[0]}); err != nil {
				return rpcError(err)
			}
			fmt.Fprintf(g.stdout, "link to %s removed\n", args[0])
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

func newFederationStatusCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	var output string
	cmd := &cobra.Command{
		Use:   "status [-o json]",
		Short: "Show every link: state, control stream, RTT, bundle sync, catalog lag, imports and exports",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "" && output != "json" && output != "table" {
				return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("-o %q: want json or table", output)}
			}
			ctx, client, done, err := f.federation(cmd, 15*time.Second)
			if err != nil {
				return err
			}
			defer done()
			st, err := client.FederationStatus(ctx, &controlplanev1.FederationStatusRequest{})
			if err != nil {
				return rpcError(err)
			}
			if output == "json" {
				return printProtoJSON(g.stdout, st)
			}
			printFederationStatus(g.stdout, st)
			return nil
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "", "output format: table (default) or json")
	f.register(cmd)
	return cmd
}

func printFederationStatus(w io.Writer, st *controlplanev1.FederationStatusResponse) {
	fmt.Fprintf(w, "cluster %s  bundle %s\n", st.GetCluster(), dash(st.GetBundleDigest()))
	if st.GetPending() {
		fmt.Fprintln(w, "  pending: waiting for its intermediate (join with a token from the root authority's cluster: strait federation join TOKEN)")
		return
	}
	if len(st.GetLinks()) == 0 {
		fmt.Fprintln(w, "  no links (create a token with `strait federation token create`)")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nPEER\tROLE HERE\tSTATE\tCONTROL\tRTT\tBUNDLE\tLAG\tIMPORTED\tEXPORTED\tLAST ERROR")
	for _, l := range st.GetLinks() {
		rtt := "-"
		if l.GetRtt() != nil && l.GetRtt().AsDuration() > 0 {
			rtt = l.GetRtt().AsDuration().Round(10 * time.Microsecond).String()
		}
		bundleState := "out of sync"
		if l.GetBundleInSync() {
			bundleState = "in sync"
		} else if l.GetPeerBundleDigest() == "" {
			bundleState = "unknown"
		}
		control := "down"
		if l.GetControlStreamUp() {
			control = "up"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", l.GetLink().GetPeer(), l.GetLink().GetRole(), l.GetState(), control, rtt,
			bundleState, l.GetCatalogLag(), l.GetImported(), l.GetExported(), dash(l.GetLastError()))
	}
	tw.Flush()
	for _, l := range st.GetLinks() {
		for _, c := range l.GetConflicts() {
			fmt.Fprintf(w, "  conflict: %s\n", c)
		}
	}
}

func newAuditCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	var limit uint32
	cmd := &cobra.Command{
		Use:   "audit [--limit N]",
		Short: "Show the federation audit log: tokens, joins (refused ones too) and link changes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, client, done, err := f.federation(cmd, 15*time.Second)
			if err != nil {
				return err
			}
			defer done()
			resp, err := client.AuditLog(ctx, &controlplanev1.AuditLogRequest{Limit: limit})
			if err != nil {
				return rpcError(err)
			}
			tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "TIME\tEVENT\tTOKEN\tPEER\tREMOTE\tDETAIL")
			for _, e := range resp.GetEvents() {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", e.GetTime().AsTime().UTC().Format(time.RFC3339), e.GetEvent(),
					dash(e.GetTokenId()), dash(e.GetPeer()), dash(e.GetRemote()), dash(e.GetDetail()))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().Uint32Var(&limit, "limit", 100, "show at most this many of the latest events")
	f.register(cmd)
	return cmd
}

func newExplainCmd(g *globals) *cobra.Command {
	f := &clientFlags{g: g}
	var ns, output, from string
	cmd := &cobra.Command{
		Use:   "explain SERVICE [-n NAMESPACE] [--from WORKLOAD] [-o json]",
		Short: "Say where traffic for a service goes now, tier by tier, and why",
		Long: `Say where traffic for a service goes now, tier by tier, and why: the
control plane's view (endpoints, health, failover policy, links).

--from WORKLOAD (a sidecar's instance name, as in dev.json) explains one
caller's own view instead: the snapshot version it holds, and the endpoints
its passive outlier detection ejects (counted as unhealthy), as it last
reported them with its health.`,
		Example: `  strait explain backend --config dev/strait.config
  strait explain payments --from frontend-0 --config mesh/strait.config --context east`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if output != "" && output != "text" && output != "json" {
				return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("-o %q: want text or json", output)}
			}
			ctx, client, _, done, err := f.admin(cmd)
			if err != nil {
				return err
			}
			defer done()
			r, err := client.Explain(ctx, &controlplanev1.ExplainRequest{Service: args[0], Namespace: ns, From: from})
			if err != nil {
				return rpcError(err)
			}
			if output == "json" {
				return printProtoJSON(g.stdout, r)
			}
			fmt.Fprintln(g.stdout, r.GetSummary())
			if fr := r.GetFrom(); fr != nil {
				state := "connected"
				if !fr.GetConnected() {
					state = "not connected"
				}
				lag := "up to date"
				if fr.GetSnapshotVersion() != fr.GetCurrentVersion() {
					lag = fmt.Sprintf("the control plane is at %d", fr.GetCurrentVersion())
				}
				fmt.Fprintf(g.stdout, "  from %s: %s, holds snapshot %d (%s)\n", fr.GetNode(), state, fr.GetSnapshotVersion(), lag)
				for _, e := range fr.GetEjected() {
					fmt.Fprintf(g.stdout, "  ejected by %s's outlier detection: %s until %s\n", fr.GetNode(), e.GetEndpoint(), e.GetUntil().AsTime().Local().Format("15:04:05"))
				}
			}
			tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "\nTIER\tCLUSTERS\tHEALTHY\tWHY")
			for _, t := range r.GetTiers() {
				fmt.Fprintf(tw, "%d\t%s\t%d/%d\t%s\n", t.GetPriority(), strings.Join(t.GetClusters(), ","), t.GetHealthy(), t.GetTotal(), t.GetReason())
			}
			tw.Flush()
			for _, e := range r.GetExcluded() {
				fmt.Fprintf(g.stdout, "  left out: %s\n", e)
			}
			if fo := r.GetPolicy().GetFailover(); fo != nil {
				fmt.Fprintf(g.stdout, "  failover: spill threshold %d%%, slow start %s, staleness %s\n", fo.GetSpillThresholdPercent(), fo.GetSlowStart().AsDuration(), fo.GetStaleness().AsDuration())
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&ns, "namespace", "n", "default", "the service's namespace")
	cmd.Flags().StringVarP(&output, "output", "o", "", "output format: text (default) or json (the whole answer)")
	cmd.Flags().StringVar(&from, "from", "", "explain one sidecar's own view (its instance name): its snapshot and the endpoints it ejects")
	f.register(cmd)
	return cmd
}

// printProtoJSON writes m as indented protojson, every field present (what
// -o json prints for an API answer).
func printProtoJSON(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}
