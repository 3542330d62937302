// Command strait is the Strait CLI: the mesh CA today, and the control of
// clusters, federation and rotation as they arrive.
//
// This is a composition root: it parses flags, wires packages together and
// prints; the work is done in ca/ and the other domain packages.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/straitmesh/strait/internal/sysmonwake"
)

// version is set with -ldflags "-X main.version=..."; otherwise build info.
var version = ""

// startOver is called by long-running commands with --keep-sysmon-awake
// before they start anything. Only main sets it: commands run in tests
// must not replace the test binary.
var startOver func() error

func main() {
	startOver = sysmonwake.Reexec
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// run executes the CLI with args and returns the process exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRootCmd(stdout, stderr)
	root.SetArgs(args)
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintf(stderr, "strait: %v\n", err)
		var ue usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", ue.cmd)
			return 2
		}
		return 1
	}
	return 0
}

type usageError struct {
	cmd string
	err error
}

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// globals are the flags every command shares.
type globals struct {
	verbose bool
	stdout  io.Writer
	stderr  io.Writer
}

func (g *globals) logger() *slog.Logger {
	level := slog.LevelWarn
	if g.verbose {
		level = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(g.stderr, &slog.HandlerOptions{Level: level}))
}

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	g := &globals{stdout: stdout, stderr: stderr}
	root := &cobra.Command{
		Use:   "strait",
		Short: "Strait links clusters into one SPIFFE service mesh",
		Long:  "Strait links Kubernetes clusters (or plain hosts) into one service mesh under one SPIFFE trust domain.",
		Example: `  strait dev up --dir ./dev             # a cluster on this machine: control plane, gateway, sample app
  strait status --config dev/strait.config
  strait apply -f policy.yaml --config dev/strait.config
  strait dev down --dir ./dev`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.PersistentFlags().BoolVarP(&g.verbose, "verbose", "v", false, "log progress (info level) to stderr")
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usageError{cmd: c.CommandPath(), err: err}
	})
	root.AddCommand(newVersionCmd(g), newCACmd(g), newControlPlaneCmd(g), newWorkloadCmd(g), newApplyCmd(g), newGetCmd(g), newDeleteCmd(g), newStatusCmd(g), newDevCmd(g), newDemoCmd(g), newFederationCmd(g), newGatewayCmd(g), newExplainCmd(g))
	strictTree(root)
	return root
}

// strictTree makes every command report misuse as a usage error (exit 2):
// a group command given an unknown subcommand, and positional arguments
// that do not fit, instead of printing help and exiting 0 or 1.
func strictTree(cmd *cobra.Command) {
	for _, c := range cmd.Commands() {
		strictTree(c)
	}
	if cmd.HasSubCommands() && cmd.Run == nil && cmd.RunE == nil {
		cmd.Args = cobra.ArbitraryArgs
		// A mistyped subcommand followed by its flags ("federation stauts
		// --config C") is reported as the unknown command it is, not as
		// an unknown flag of the group.
		cmd.FParseErrWhitelist.UnknownFlags = true
		cmd.RunE = func(c *cobra.Command, args []string) error {
			if len(args) == 0 {
				return c.Help()
			}
			return usageError{cmd: c.CommandPath(), err: unknownCommand(c, args[0])}
		}
		return
	}
	if validate := cmd.Args; validate != nil {
		cmd.Args = func(c *cobra.Command, args []string) error {
			if err := validate(c, args); err != nil {
				if !c.HasSubCommands() && len(args) > 0 && strings.HasPrefix(err.Error(), "unknown command") {
					err = fmt.Errorf("%s takes no arguments, got %q", c.CommandPath(), args[0])
				}
				return usageError{cmd: c.CommandPath(), err: err}
			}
			return nil
		}
	}
}

// unknownCommand says that name is not a subcommand of c, with cobra's
// suggestions of the nearest ones.
func unknownCommand(c *cobra.Command, name string) error {
	msg := fmt.Sprintf("unknown command %q for %q", name, c.CommandPath())
	if c.SuggestionsMinimumDistance <= 0 {
		c.SuggestionsMinimumDistance = 2 // as cobra's root has it
	}
	if s := c.SuggestionsFor(name); len(s) > 0 {
		msg += "; did you mean " + strings.Join(s, " or ") + "?"
	}
	return errors.New(msg)
}

func newVersionCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version of strait",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(g.stdout, "strait %s\n", buildVersion())
			return nil
		},
	}
}

func buildVersion() string {
	if version != "" {
		return version
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "(unknown)"
	}
	v := info.Main.Version
	for _, s := range info.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += " " + s.Value[:12]
		}
	}
	return v + " " + info.GoVersion
}

// durationValue is a pflag.Value accepting Go durations plus a "d" (day) suffix.
type durationValue struct{ d *time.Duration }

func (v durationValue) String() string {
	if v.d == nil || *v.d == 0 {
		return "0"
	}
	if *v.d%(24*time.Hour) == 0 {
		return strconv.FormatInt(int64(*v.d/(24*time.Hour)), 10) + "d"
	}
	return v.d.String()
}

func (v durationValue) Set(s string) error {
	d, err := parseDuration(s)
	if err != nil {
		return err
	}
	*v.d = d
	return nil
}

func (v durationValue) Type() string { return "duration" }

func parseDuration(s string) (time.Duration, error) {
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.ParseUint(days, 10, 32)
		if err != nil || n > 100*365 {
			return 0, fmt.Errorf("invalid duration %q: want e.g. 90d, 24h or 15m", s)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("invalid duration %q: want e.g. 90d, 24h or 15m", s)
	}
	if d < 0 {
		return 0, fmt.Errorf("invalid duration %q: must not be negative", s)
	}
	return d, nil
}
