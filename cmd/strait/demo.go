package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
)

func newDemoCmd(g *globals) *cobra.Command {
	var dir string
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
			d := &demo{g: g, cmd: cmd}
			return d.run(dir)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "working directory (default: a temporary directory, removed afterwards)")
	cmd.Flags().BoolVar(&keep, "keep", false, "keep the temporary directory")
	return cmd
}

type demo struct {
	g   *globals
	cmd *cobra.Command
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
	fmt.Fprintf(d.g.stdout, "\nDemo complete: mesh root, cluster intermediate and workload SVID created and verified; a foreign SVID was refused.\n")
	return nil
}
