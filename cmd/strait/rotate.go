package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/straitmesh/strait/ca"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// rotationPoll is how often a waiting command asks for RotationStatus.
const rotationPoll = 500 * time.Millisecond

// rotationCallTimeout bounds one RPC while waiting: a control plane that
// does not answer in time counts as unreachable, not as a failure.
const rotationCallTimeout = 5 * time.Second

// autoErrorGrace is how long --auto keeps following while the control
// plane reports the same error for the auto rotation (it retries) before
// the command gives up; the rotation itself goes on.
var autoErrorGrace = time.Minute

const rotateLong = `Rotate the mesh root across every linked cluster, in three steps:

  prepare   a new root joins the trust bundle; the active root keeps signing.
            Acknowledged once every cluster's control plane, sidecars and
            gateways hold the new bundle.
  activate  the new root signs: every cluster's intermediate is re-signed under
            it and workloads get new SVIDs. Acknowledged once every node of
            every cluster presents an SVID chaining to the new root.
  retire    the old root leaves the bundle. Acknowledged once every node holds
            the bundle without it.

The gate: a step is refused until the previous one is acknowledged by every
linked cluster; the refusal names who is behind (see 'strait ca rotate status').
--force skips the gate. After a step the command waits (--wait, the default)
until the step is acknowledged everywhere, printing each change on stderr,
for at most --timeout.

Interrupting the command (Ctrl-C) while it waits or follows --auto changes
nothing in the control plane: the step stays taken and the clusters keep
converging; an automatic rotation keeps going (only --auto --cancel stops
it). Follow it again with 'strait ca rotate status'. If the root authority
becomes unreachable while the command waits, it says so and keeps waiting:
the rotation's state lives in the control plane, nothing changes meanwhile.

Emergency (an old root's key is compromised):
  strait ca rotate prepare            # a replacement joins every bundle
  strait ca rotate activate           # ...and signs
  strait ca rotate taint OLD_ROOT     # everything under OLD_ROOT is re-issued
  strait ca rotate revoke OLD_ROOT    # OLD_ROOT leaves every bundle at once

Or let the control plane walk prepare, activate and retire by itself, each
step once the previous one is acknowledged everywhere:
  strait ca rotate --auto             # start it and follow it
  strait ca rotate --auto --cancel    # stop it; steps taken stay taken

Where the steps run: on the root authority's control plane (the cluster
holding the mesh CA), reached with --config/--context as every other command;
that control plane holds the CA directory open and locked, so point --context
at the root authority's context. It tells the other clusters through the
gateway links and collects their acknowledgements.

--data-dir acts on a CA directory directly, for when no control plane runs:
the step is taken in that directory only and nobody is waited for (--wait,
--timeout and the gate do not apply, and --auto is not available).

Which one is used: --config or --context on the command line; else --data-dir
on the command line; else $` + configEnv + `; else $` + dataDirEnv + `. Giving
--data-dir together with --config or --context is an error.`

// rotateOpts are the flags of strait ca rotate and its steps.
type rotateOpts struct {
	force   bool
	rootTTL time.Duration
	wait    bool
	timeout time.Duration
	output  string
	auto    bool
	cancel  bool
}

func newCARotateCmd(f *caFlags) *cobra.Command {
	cf := &clientFlags{g: f.g}
	auto := &rotateOpts{wait: true, timeout: 10 * time.Minute}
	cmd := &cobra.Command{
		Use:   "rotate STEP | --auto",
		Short: "Rotate the mesh root across every linked cluster: prepare, activate, retire (and taint/revoke)",
		Long:  rotateLong,
		Example: `  strait ca rotate status --context east
  strait ca rotate prepare --context east
  strait ca rotate activate --context east
  strait ca rotate retire --context east
  strait ca rotate --auto --context east
  strait ca rotate prepare --data-dir ./ca     # no control plane running`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError{cmd: cmd.CommandPath(), err: unknownCommand(cmd, args[0])}
			}
			if auto.cancel && !auto.auto {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--cancel goes with --auto")}
			}
			if !auto.auto {
				return cmd.Help()
			}
			if auto.wait && auto.timeout <= 0 {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--timeout must be more than 0")}
			}
			r, err := newRotator(cmd, f, cf)
			if err != nil {
				return err
			}
			if r == nil {
				return usageError{cmd: cmd.CommandPath(), err: errors.New("--auto needs the root authority's control plane (--config/--context); with --data-dir take the steps one by one")}
			}
			defer r.close()
			if auto.cancel {
				return r.cancelAuto(cmd.Context())
			}
			return r.auto(cmd.Context(), auto)
		},
	}
	cf.register(cmd)
	cmd.Flags().BoolVar(&auto.auto, "auto", false, "let the control plane walk prepare, activate and retire, and follow it (interrupting the command does not stop the rotation)")
	cmd.Flags().BoolVar(&auto.cancel, "cancel", false, "with --auto: stop the automatic rotation (steps already taken stay taken)")
	cmd.Flags().Var(durationValue{&auto.rootTTL}, "root-ttl", "with --auto: lifetime of the new root (default: the active root's)")
	cmd.Flags().BoolVar(&auto.wait, "wait", true, "with --auto: follow the rotation until it is done (false: start it and return)")
	cmd.Flags().Var(durationValue{&auto.timeout}, "timeout", "with --auto: how long to follow before giving up (the rotation goes on)")

	forceHelp := map[string]string{
		"prepare":  "skip the gate: prepare although a cluster has not acknowledged the last step; that cluster may refuse SVIDs from the others until it catches up",
		"activate": "skip the gate: sign with the new root although some cluster does not hold it yet; that cluster refuses every SVID issued under it until it catches up",
		"retire":   "skip the gate and the retire time gate: nodes still presenting an SVID under the old root are refused by everyone at once",
	}
	step := func(use, short, long string, args cobra.PositionalArgs) *cobra.Command {
		name := strings.Fields(use)[0]
		o := &rotateOpts{wait: true, timeout: 10 * time.Minute}
		c := &cobra.Command{
			Use: use, Short: short, Args: args,
			Long: long + `

Runs on the root authority's control plane (--config/--context), or with
--data-dir on a CA directory when no control plane runs: see
'strait ca rotate --help' for which is used and for the whole procedure.`,
			RunE: func(cmd *cobra.Command, args []string) error {
				if o.wait && o.timeout <= 0 {
					return usageError{cmd: cmd.CommandPath(), err: errors.New("--timeout must be more than 0")}
				}
				rootID := ""
				if len(args) > 0 {
					rootID = args[0]
				}
				r, err := newRotator(cmd, f, cf)
				if err != nil {
					return err
				}
				if r == nil {
					return rotateDirect(cmd, f, name, rootID, o)
				}
				defer r.close()
				return r.step(cmd.Context(), name, rootID, o)
			},
		}
		if h, ok := forceHelp[name]; ok {
			c.Flags().BoolVar(&o.force, "force", false, h)
		}
		if name == "prepare" {
			c.Flags().Var(durationValue{&o.rootTTL}, "root-ttl", "lifetime of the new root (default: the active root's)")
		}
		c.Flags().BoolVar(&o.wait, "wait", true, "wait until every cluster acknowledged the step, printing progress on stderr (control plane only)")
		c.Flags().Var(durationValue{&o.timeout}, "timeout", "how long to wait (the step stays taken when it runs out)")
		return c
	}
	so := &rotateOpts{}
	statusCmd := &cobra.Command{
		Use:   "status [-o json]",
		Short: "Show the roots, the bundle and every cluster's progress, and what the next step waits for",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if so.output != "" && so.output != "text" && so.output != "json" {
				return usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("-o %q: want text or json", so.output)}
			}
			r, err := newRotator(cmd, f, cf)
			if err != nil {
				return err
			}
			if r == nil {
				a, err := openForRotation(cmd, f)
				if err != nil {
					return err
				}
				defer a.Close()
				if so.output == "json" {
					return printJSON(f.g.stdout, a.Status())
				}
				printStatus(f.g.stdout, a.Status())
				return nil
			}
			defer r.close()
			return r.status(cmd.Context(), so.output)
		},
	}
	statusCmd.Flags().StringVarP(&so.output, "output", "o", "", "output format: text (default) or json")
	cmd.AddCommand(
		step("prepare", "Add a new root to every cluster's trust bundle",
			`Create a new root and add it to the trust bundle, which the root authority
sends to every linked cluster; the active root keeps signing. Refused until
the previous rotation's last step is acknowledged everywhere (unless --force).
Then waits until every node of every cluster holds the new bundle.`, cobra.NoArgs),
		step("activate", "Make the prepared root the signing root in every cluster",
			`Make the prepared root the signing root: every cluster's intermediate is
re-signed under it and its workloads receive new SVIDs. Refused until prepare
is acknowledged everywhere (unless --force). Then waits until every node of
every cluster presents an SVID chaining to the new root.`, cobra.NoArgs),
		step("retire", "Remove the old root from every cluster's trust bundle",
			`Remove the old root from the trust bundle of every cluster. Refused until
activate is acknowledged everywhere and no SVID under the old root may still
be in use (unless --force). Then waits until every node holds the new bundle.`, cobra.NoArgs),
		step("taint ROOT_ID", "Mark an old root compromised: everything under it is re-issued (emergency)",
			`Emergency: mark ROOT_ID (an old or prepared root, never the active one:
prepare and activate a replacement first) compromised. It stays in the bundle
so nothing breaks yet, and everything chaining to it is re-issued; then
revoke it.`, cobra.ExactArgs(1)),
		step("revoke ROOT_ID", "Remove a tainted root from every bundle now (emergency)",
			`Emergency: remove the tainted ROOT_ID from every cluster's trust bundle at
once. Every SVID still chaining to it is refused on the next handshake.`, cobra.ExactArgs(1)),
		statusCmd,
	)
	return cmd
}

// newRotator picks the control plane or the CA directory (see rotateLong):
// a rotator for the control plane, or nil for the directory.
func newRotator(cmd *cobra.Command, f *caFlags, cf *clientFlags) (*rotator, error) {
	flags := cmd.Flags()
	explicitCP := flags.Changed("config") || flags.Changed("context")
	explicitDir := flags.Changed("data-dir")
	switch {
	case explicitCP && explicitDir:
		return nil, usageError{cmd: cmd.CommandPath(), err: errors.New("give --config/--context (the root authority's control plane) or --data-dir (no control plane running), not both")}
	case explicitDir:
		return nil, nil
	case explicitCP || cf.config != "":
	case f.dataDir != "":
		return nil, nil
	default:
		return nil, usageError{cmd: cmd.CommandPath(), err: errors.New("--config/--context naming the root authority's control plane is required (or set $" + configEnv + "); --data-dir only when no control plane runs")}
	}
	if _, err := cf.resolve(cmd); err != nil {
		return nil, err
	}
	return &rotator{
		out: f.g.stdout, errOut: f.g.stderr, poll: rotationPoll,
		dial: func() (*grpc.ClientConn, error) {
			conn, _, err := cf.dial(cmd)
			return conn, err
		},
	}, nil
}

func openForRotation(cmd *cobra.Command, f *caFlags) (*ca.Authority, error) {
	a, err := f.openDir(cmd, cmd.Name() == "status")
	if errors.Is(err, ca.ErrBusy) {
		return nil, fmt.Errorf("%w; a running control plane holds it: rotate through it with --config/--context (the root authority's context)", err)
	}
	return a, err
}

// rotateDirect takes a step in the CA directory, as before there were
// control planes to tell.
func rotateDirect(cmd *cobra.Command, f *caFlags, step, rootID string, o *rotateOpts) error {
	a, err := openForRotation(cmd, f)
	if err != nil {
		return err
	}
	defer a.Close()
	ctx := cmd.Context()
	switch step {
	case "prepare":
		_, err = a.Prepare(ctx, ca.PrepareOptions{TTL: o.rootTTL})
	case "activate":
		err = a.Activate(ctx)
	case "retire":
		err = a.Retire(ctx, ca.RetireOptions{Force: o.force})
	case "taint":
		err = a.Taint(ctx, rootID)
	case "revoke":
		err = a.Revoke(ctx, rootID)
	}
	if err != nil {
		return err
	}
	st := a.Status()
	fmt.Fprintf(f.g.stdout, "%s: done; bundle sequence %d, roots %s\n", step, st.Bundle.Sequence, describeRoots(st))
	return nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func describeRoots(st ca.Status) string {
	var parts []string
	for _, r := range st.Roots {
		if r.InBundle {
			parts = append(parts, r.ID+" ("+string(r.State)+")")
		}
	}
	return strings.Join(parts, ", ")
}

// rotator talks to the root authority's RotationService. While the control
// plane is unreachable it dials afresh on every poll, so it is seen again as
// soon as it is back rather than after gRPC's reconnect backoff.
type rotator struct {
	out, errOut io.Writer
	poll        time.Duration
	dial        func() (*grpc.ClientConn, error)
	conn        *grpc.ClientConn
}

func (r *rotator) client() (controlplanev1.RotationServiceClient, error) {
	if r.conn == nil {
		conn, err := r.dial()
		if err != nil {
			return nil, err
		}
		r.conn = conn
	}
	return controlplanev1.NewRotationServiceClient(r.conn), nil
}

// reset drops the connection; the next call dials again.
func (r *rotator) reset() {
	if r.conn != nil {
		r.conn.Close()
		r.conn = nil
	}
}

func (r *rotator) close() { r.reset() }

// call runs one RPC bounded by rotationCallTimeout.
func call[Req, Resp any](ctx context.Context, r *rotator, fn func(controlplanev1.RotationServiceClient, context.Context, Req, ...grpc.CallOption) (Resp, error), req Req) (Resp, error) {
	var zero Resp
	c, err := r.client()
	if err != nil {
		return zero, err
	}
	ctx, cancel := context.WithTimeout(ctx, rotationCallTimeout)
	defer cancel()
	return fn(c, ctx, req)
}

func (r *rotator) fetchStatus(ctx context.Context) (*controlplanev1.RotationStatusResponse, error) {
	return call(ctx, r, controlplanev1.RotationServiceClient.RotationStatus, &controlplanev1.RotationStatusRequest{})
}

// unreachable reports whether err means the control plane could not be
// reached (as opposed to it answering no).
func unreachable(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded:
		return true
	}
	return false
}

// unreachableReason is the gist of an unreachable error: "unavailable:
// connection refused" rather than gRPC's whole transport story.
func unreachableReason(err error) string {
	s := status.Convert(err)
	if s.Code() == codes.DeadlineExceeded {
		return fmt.Sprintf("no answer within %s", rotationCallTimeout)
	}
	msg := strings.Trim(s.Message(), `"`)
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = strings.Trim(msg[i+2:], `"`)
	}
	return codeWords(s.Code().String()) + ": " + msg
}

func (r *rotator) status(ctx context.Context, output string) error {
	st, err := r.fetchStatus(ctx)
	if err != nil {
		return rpcError(err)
	}
	if output == "json" {
		return printProtoJSON(r.out, st)
	}
	printRotationStatus(r.out, st)
	return nil
}

// checkRootAuthority refuses a context that is not the root authority's,
// whose control plane would refuse every step.
func (r *rotator) checkRootAuthority(ctx context.Context) error {
	st, err := r.fetchStatus(ctx)
	if err != nil {
		return rpcError(err)
	}
	if !st.GetRootAuthority() {
		return fmt.Errorf("cluster %s is not the root authority (it does not hold the mesh CA); run rotation steps with --context set to the root authority's context", st.GetCluster())
	}
	return nil
}

func (r *rotator) step(ctx context.Context, step, rootID string, o *rotateOpts) error {
	if err := r.checkRootAuthority(ctx); err != nil {
		return err
	}
	start := time.Now()
	req := &controlplanev1.RotateRequest{Step: step, RootId: rootID, Force: o.force}
	if o.rootTTL > 0 {
		req.RootTtl = durationpb.New(o.rootTTL)
	}
	resp, err := call(ctx, r, controlplanev1.RotationServiceClient.Rotate, req)
	if err != nil {
		if status.Code(err) == codes.FailedPrecondition {
			return r.refused(ctx, step, status.Convert(err).Message())
		}
		if unreachable(err) {
			return fmt.Errorf("%s: root authority unreachable (%s); the step may or may not have been taken: check with `strait ca rotate status`", step, unreachableReason(err))
		}
		return rpcError(err)
	}
	st := resp.GetStatus()
	fmt.Fprintf(r.out, "%s: taken; bundle sequence %d, roots %s\n", step, st.GetBundleSequence(), describeRootInfos(st.GetRoots()))
	if !o.wait {
		if st.GetNext() != "" {
			fmt.Fprintf(r.out, "next: %s\n", st.GetNext())
		}
		return nil
	}
	w := newWaiter(r, step)
	w.minSeq = st.GetBundleSequence()
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	st, err = r.follow(ctx, func(st *controlplanev1.RotationStatusResponse) (bool, error) {
		w.progress(st)
		return w.acknowledged(st), nil
	})
	if err != nil {
		if ctx.Err() == context.DeadlineExceeded {
			return fmt.Errorf("%s not acknowledged everywhere after %s: %s; the step stays taken: follow it with `strait ca rotate status`", step, o.timeout, w.behindSummary())
		}
		return err
	}
	fmt.Fprintf(r.out, "%s acknowledged by %s in %s\n", step, clusterList(st), roundDuration(time.Since(start)))
	if st.GetNext() != "" {
		fmt.Fprintf(r.out, "next: %s\n", st.GetNext())
	}
	return nil
}

// refused explains a step the control plane refused (FailedPrecondition):
// its message names who is behind; the hints fit why it was refused.
func (r *rotator) refused(ctx context.Context, step, msg string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%s refused: %s", step, msg)
	st, err := r.fetchStatus(ctx)
	switch {
	case err == nil && st.GetAuto().GetRunning():
		b.WriteString("\n  an automatic rotation is running: follow it with `strait ca rotate status`, or stop it with `strait ca rotate --auto --cancel`")
	case err != nil || !st.GetReady():
		b.WriteString("\n  see who is behind and what they wait for: strait ca rotate status")
		if step == "prepare" || step == "activate" || step == "retire" {
			b.WriteString("\n  or take the step anyway with --force (the clusters that are behind may refuse the others' traffic until they catch up)")
		}
	default:
		fmt.Fprintf(&b, "\n  the rotation's state: strait ca rotate status (next: %s)", dash(st.GetNext()))
	}
	return errors.New(b.String())
}

var errInterrupted = errors.New("interrupted")

// follow polls RotationStatus every r.poll until done says so, ctx ends or
// the control plane answers with an error other than being unreachable.
// While it is unreachable the command says so once and keeps polling: the
// rotation's state lives in the control plane, so nothing changes meanwhile.
func (r *rotator) follow(ctx context.Context, done func(*controlplanev1.RotationStatusResponse) (bool, error)) (*controlplanev1.RotationStatusResponse, error) {
	var downSince time.Time
	tick := time.NewTicker(r.poll)
	defer tick.Stop()
	redialed := false
	for {
		st, err := r.fetchStatus(ctx)
		switch {
		case ctx.Err() != nil:
		case err != nil && status.Code(err) == codes.Unauthenticated && !redialed:
			// The rotation re-issued the admin credentials under the new
			// root and retired the old one: dial again with the ones on
			// disk (and the trust bundle as it is now).
			r.reset()
			redialed = true
			continue
		case err != nil && unreachable(err):
			r.reset()
			if downSince.IsZero() {
				downSince = time.Now()
				fmt.Fprintf(r.errOut, "root authority unreachable (%s); the rotation waits — nothing changes until it is back\n", unreachableReason(err))
			}
		case err != nil:
			return nil, rpcError(err)
		default:
			redialed = false
			if !downSince.IsZero() {
				fmt.Fprintf(r.errOut, "root authority is back after %s\n", roundDuration(time.Since(downSince)))
				downSince = time.Time{}
			}
			ok, err := done(st)
			if err != nil || ok {
				return st, err
			}
		}
		if ctx.Err() == nil {
			select {
			case <-ctx.Done():
			case <-tick.C:
				continue
			}
		}
		if ctx.Err() == context.Canceled {
			fmt.Fprintln(r.errOut, "interrupted: the rotation continues in the control plane; follow it with `strait ca rotate status`")
			return nil, errInterrupted
		}
		return nil, ctx.Err()
	}
}

// waiter tracks one step's progress across polls and prints what changed.
type waiter struct {
	r      *rotator
	step   string
	minSeq uint64
	// last line printed per cluster ("" once it caught up).
	last   map[string]string
	behind []string // clusters behind at the last poll, with why
}

func newWaiter(r *rotator, step string) *waiter {
	return &waiter{r: r, step: step, last: map[string]string{}}
}

// acknowledged is the gate for the next step open on a status at least as
// new as the step taken.
func (w *waiter) acknowledged(st *controlplanev1.RotationStatusResponse) bool {
	return st.GetReady() && st.GetBundleSequence() >= w.minSeq
}

// progress prints one line per cluster whose progress changed.
func (w *waiter) progress(st *controlplanev1.RotationStatusResponse) {
	w.behind = w.behind[:0]
	for _, c := range st.GetClusters() {
		name := clusterName(c)
		why := lagReason(st, c)
		prev, seen := w.last[name]
		if why != "" {
			w.behind = append(w.behind, name+" ("+why+")")
		}
		if why == prev {
			continue
		}
		w.last[name] = why
		switch {
		case why != "":
			fmt.Fprintf(w.r.errOut, "%s: waiting for %s (%s)\n", w.step, name, why)
		case seen:
			fmt.Fprintf(w.r.errOut, "%s: %s caught up\n", w.step, name)
		}
	}
	if len(w.behind) == 0 && !w.acknowledged(st) && w.last[""] != st.GetNext() {
		// Nobody is behind by the reports yet the gate is closed: say what
		// the control plane waits for.
		w.last[""] = st.GetNext()
		fmt.Fprintf(w.r.errOut, "%s: waiting: %s\n", w.step, dash(st.GetNext()))
	}
}

func (w *waiter) behindSummary() string {
	if len(w.behind) == 0 {
		return "the control plane has not opened the gate yet"
	}
	return "waiting for " + strings.Join(w.behind, ", ")
}

func clusterName(c *controlplanev1.ClusterRotation) string {
	if n := c.GetReport().GetCluster(); n != "" {
		return n
	}
	return "?"
}

// lagReason says why a cluster is behind the root authority's bundle and
// active root, or "" when it is not: the control plane's own words
// (waiting), else what the cluster's report shows.
func lagReason(st *controlplanev1.RotationStatusResponse, c *controlplanev1.ClusterRotation) string {
	if c.GetWaiting() != "" {
		return c.GetWaiting()
	}
	rep := c.GetReport()
	if rep.GetBundleDigest() == "" {
		if c.GetBundleInSync() && c.GetSvidsOnActiveRoot() {
			return ""
		}
		return "no rotation report yet"
	}
	var parts []string
	switch {
	case rep.GetBundleDigest() != st.GetBundleDigest():
		parts = append(parts, fmt.Sprintf("its control plane holds bundle sequence %d, not %d", rep.GetBundleSequence(), st.GetBundleSequence()))
	case rep.GetNodesBundleCurrent() < rep.GetNodes():
		parts = append(parts, fmt.Sprintf("%d of %d nodes hold bundle %s", rep.GetNodesBundleCurrent(), rep.GetNodes(), shortDigest(st.GetBundleDigest())))
	case !c.GetBundleInSync():
		parts = append(parts, "bundle not in sync")
	}
	active := activeRootOf(st).GetFingerprint()
	switch {
	case active != "" && rep.GetIntermediateRoot() != "" && rep.GetIntermediateRoot() != active:
		parts = append(parts, "its intermediate is not signed by the active root yet")
	case rep.GetNodesSvidCurrent() < rep.GetNodes():
		parts = append(parts, fmt.Sprintf("%d of %d nodes present an SVID from the current intermediate", rep.GetNodesSvidCurrent(), rep.GetNodes()))
	case !c.GetSvidsOnActiveRoot():
		parts = append(parts, "its intermediate is not signed by the active root yet")
	}
	return strings.Join(parts, "; ")
}

func clusterList(st *controlplanev1.RotationStatusResponse) string {
	var names []string
	for _, c := range st.GetClusters() {
		names = append(names, clusterName(c))
	}
	noun := "clusters"
	if len(names) == 1 {
		noun = "cluster"
	}
	return fmt.Sprintf("%d %s (%s)", len(names), noun, strings.Join(names, ", "))
}

// shortDigest shortens "sha256:<hex>" to its first 12 hex digits.
func shortDigest(d string) string {
	algo, hex, ok := strings.Cut(d, ":")
	if !ok {
		algo, hex = "", d
	} else {
		algo += ":"
	}
	if len(hex) <= 12 {
		return d
	}
	return algo + hex[:12] + "…"
}

func roundDuration(d time.Duration) time.Duration {
	switch {
	case d >= time.Minute:
		return d.Round(time.Second)
	case d >= time.Second:
		return d.Round(100 * time.Millisecond)
	default:
		return d.Round(time.Millisecond)
	}
}

func describeRootInfos(roots []*controlplanev1.RootInfo) string {
	var parts []string
	for _, r := range roots {
		if r.GetInBundle() {
			parts = append(parts, r.GetId()+" ("+r.GetState()+")")
		}
	}
	return dash(strings.Join(parts, ", "))
}

func printRotationStatus(w io.Writer, st *controlplanev1.RotationStatusResponse) {
	role := "root authority"
	if !st.GetRootAuthority() {
		role = "not the root authority: its own progress only"
	}
	fmt.Fprintf(w, "cluster %s (%s)\n", st.GetCluster(), role)
	fmt.Fprintf(w, "bundle sequence %d, digest %s\n", st.GetBundleSequence(), dash(st.GetBundleDigest()))

	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nROOT\tSTATE\tIN BUNDLE\tFINGERPRINT\tNOT AFTER")
	for _, r := range st.GetRoots() {
		notAfter := "-"
		if r.GetNotAfter() != nil {
			notAfter = day(r.GetNotAfter().AsTime())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.GetId(), r.GetState(), yesNo(r.GetInBundle()), dash(shortDigest(r.GetFingerprint())), notAfter)
	}
	tw.Flush()

	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nCLUSTER\tBUNDLE\tSVIDS\tWAITING")
	active := activeRootOf(st).GetFingerprint()
	for _, c := range st.GetClusters() {
		rep := c.GetReport()
		bundleState, svids := "behind", "-"
		if c.GetBundleInSync() {
			bundleState = "in sync"
		}
		switch {
		case rep.GetBundleDigest() == "":
			bundleState = "unknown"
		case !c.GetSvidsOnActiveRoot() && rep.GetIntermediateRoot() != "" && active != "" && rep.GetIntermediateRoot() != active:
			svids = fmt.Sprintf("0/%d (intermediate not yet under the active root)", rep.GetNodes())
		default:
			// Nodes presenting an SVID from the cluster's intermediate,
			// which the active root signed.
			svids = fmt.Sprintf("%d/%d on active root", rep.GetNodesSvidCurrent(), rep.GetNodes())
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", clusterName(c), bundleState, svids, dash(lagReason(st, c)))
	}
	tw.Flush()
	if len(st.GetClusters()) == 0 {
		fmt.Fprintln(w, "  no cluster reports yet")
	}

	gate := "waiting"
	if st.GetReady() {
		gate = "ready"
	}
	fmt.Fprintf(w, "\nnext: %s (%s)\n", dash(st.GetNext()), gate)
	if a := st.GetAuto(); a.GetRunning() {
		line := "auto rotation: running"
		if a.GetStep() != "" {
			line += ", last step " + a.GetStep()
		} else {
			line += ", no step taken yet"
		}
		if a.GetStarted() != nil {
			line += ", started " + a.GetStarted().AsTime().UTC().Format(time.RFC3339)
		}
		if a.GetLastError() != "" {
			line += "; last error: " + a.GetLastError()
		}
		fmt.Fprintln(w, line)
	}
}

func (r *rotator) cancelAuto(ctx context.Context) error {
	resp, err := call(ctx, r, controlplanev1.RotationServiceClient.AutoRotate, &controlplanev1.AutoRotateRequest{Cancel: true})
	if err != nil {
		return rpcError(err)
	}
	last := resp.GetAuto().GetStep()
	if last == "" {
		fmt.Fprintln(r.out, "auto rotation cancelled before any step was taken")
		return nil
	}
	fmt.Fprintf(r.out, "auto rotation cancelled; the steps taken stay taken (the last: %s); continue by hand, see `strait ca rotate status`\n", last)
	return nil
}

// auto starts the control plane's automatic rotation and follows it.
func (r *rotator) auto(ctx context.Context, o *rotateOpts) error {
	if err := r.checkRootAuthority(ctx); err != nil {
		return err
	}
	req := &controlplanev1.AutoRotateRequest{}
	if o.rootTTL > 0 {
		req.RootTtl = durationpb.New(o.rootTTL)
	}
	resp, err := call(ctx, r, controlplanev1.RotationServiceClient.AutoRotate, req)
	if err != nil {
		return rpcError(err)
	}
	if a := resp.GetAuto(); a.GetRunning() && len(a.GetSteps()) > 0 {
		fmt.Fprintf(r.out, "an automatic rotation is already under way (last step %s); following it\n", a.GetStep())
	} else {
		fmt.Fprintln(r.out, "auto rotation started: prepare, activate and retire, each once the previous step is acknowledged everywhere")
	}
	if !o.wait {
		fmt.Fprintln(r.out, "follow it with `strait ca rotate status`")
		return nil
	}
	if a := resp.GetAuto(); !a.GetRunning() && !a.GetDone() {
		return fmt.Errorf("the control plane did not start the auto rotation: %s", dash(a.GetLastError()))
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	f := &autoFollower{r: r, printed: map[string]int{}}
	st, err := r.follow(ctx, f.observe)
	if err != nil {
		if ctx.Err() == context.DeadlineExceeded {
			where := "no step taken yet"
			if f.waiter != nil {
				where = f.waiter.step + " " + f.waiter.behindSummary()
			}
			return fmt.Errorf("auto rotation not done after %s (%s); it continues in the control plane: follow it with `strait ca rotate status`", o.timeout, where)
		}
		return err
	}
	printAutoSummary(r.out, st.GetAuto())
	return nil
}

// autoFollower prints an automatic rotation's steps as the control plane
// takes them and as every cluster acknowledges them.
type autoFollower struct {
	r       *rotator
	printed map[string]int // step: 1 taken printed, 2 acknowledged printed
	waiter  *waiter        // progress of the step taken and not yet acknowledged
	errText string
	errAt   time.Time
}

func (f *autoFollower) observe(st *controlplanev1.RotationStatusResponse) (bool, error) {
	a := st.GetAuto()
	for _, s := range a.GetSteps() {
		name := s.GetStep()
		if s.GetTaken() != nil && f.printed[name] < 1 {
			f.printed[name] = 1
			fmt.Fprintf(f.r.out, "%s: taken at %s\n", name, clockTime(s.GetTaken().AsTime()))
			f.waiter = newWaiter(f.r, name)
		}
		if s.GetTaken() != nil && s.GetAcknowledged() != nil && f.printed[name] < 2 {
			f.printed[name] = 2
			took := s.GetAcknowledged().AsTime().Sub(s.GetTaken().AsTime())
			fmt.Fprintf(f.r.out, "%s acknowledged by %s in %s\n", name, clusterList(st), roundDuration(took))
			if f.waiter != nil && f.waiter.step == name {
				f.waiter = nil
			}
		}
	}
	if a.GetDone() {
		return true, nil
	}
	if f.waiter != nil {
		f.waiter.progress(st)
	}
	switch e := a.GetLastError(); {
	case !a.GetRunning() && e != "":
		return false, fmt.Errorf("auto rotation stopped: %s", e)
	case !a.GetRunning():
		return false, errors.New("auto rotation stopped before it was done (cancelled?); see `strait ca rotate status`")
	case e == "":
		if f.errText != "" {
			fmt.Fprintln(f.r.errOut, "auto rotation: the error cleared")
		}
		f.errText = ""
	case e != f.errText:
		f.errText, f.errAt = e, time.Now()
		fmt.Fprintf(f.r.errOut, "auto rotation: %s (the control plane retries)\n", e)
	case time.Since(f.errAt) >= autoErrorGrace:
		return false, fmt.Errorf("auto rotation failing for %s: %s; it keeps retrying in the control plane (stop it with `strait ca rotate --auto --cancel`)", roundDuration(time.Since(f.errAt)), e)
	}
	return false, nil
}

func clockTime(t time.Time) string { return t.UTC().Format("15:04:05Z") }

func printAutoSummary(w io.Writer, a *controlplanev1.AutoRotation) {
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STEP\tTAKEN\tACKNOWLEDGED\tTOOK")
	var first, last time.Time
	if a.GetStarted() != nil {
		first = a.GetStarted().AsTime()
	}
	for _, s := range a.GetSteps() {
		taken, acked, took := "-", "-", "-"
		if s.GetTaken() != nil {
			t := s.GetTaken().AsTime()
			taken = clockTime(t)
			if first.IsZero() || t.Before(first) {
				first = t
			}
		}
		if s.GetAcknowledged() != nil {
			t := s.GetAcknowledged().AsTime()
			acked = clockTime(t)
			if t.After(last) {
				last = t
			}
			if s.GetTaken() != nil {
				took = roundDuration(t.Sub(s.GetTaken().AsTime())).String()
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", s.GetStep(), taken, acked, took)
	}
	total := "-"
	if !first.IsZero() && !last.IsZero() {
		total = roundDuration(last.Sub(first)).String()
	}
	fmt.Fprintf(tw, "total\t\t\t%s\n", total)
	tw.Flush()
	fmt.Fprintln(w, "auto rotation done")
}

// activeRootOf is the active root in st, or nil.
func activeRootOf(st *controlplanev1.RotationStatusResponse) *controlplanev1.RootInfo {
	for _, r := range st.GetRoots() {
		if r.GetState() == "active" {
			return r
		}
	}
	return nil
}
