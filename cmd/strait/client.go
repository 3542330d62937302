package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"sigs.k8s.io/yaml"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/internal/atomicfile"
	"github.com/straitmesh/strait/internal/svidfile"
)

const configEnv = "STRAIT_CONFIG"

// clientConfig is strait.config: one context per cluster, as kubeconfig
// has. Paths are relative to the file's directory unless absolute.
type clientConfig struct {
	APIVersion     string          `json:"apiVersion"`
	Kind           string          `json:"kind"`
	CurrentContext string          `json:"currentContext,omitempty"`
	Contexts       []clientContext `json:"contexts"`
}

type clientContext struct {
	Name              string `json:"name"`
	Cluster           string `json:"cluster"`
	Server            string `json:"server"`
	TrustDomain       string `json:"trustDomain"`
	TrustBundle       string `json:"trustBundle"`
	ClientCertificate string `json:"clientCertificate"`
	ClientKey         string `json:"clientKey"`
}

// configHint says where a client config comes from, for errors about one.
const configHint = "`strait dev up --dir DIR` writes one to DIR/strait.config"

func loadClientConfig(path string) (*clientConfig, error) {
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		if _, err := os.Stat(filepath.Join(path, "strait.config")); err == nil {
			return nil, fmt.Errorf("config %s is a directory; did you mean --config %s?", path, filepath.Join(path, "strait.config"))
		}
		return nil, fmt.Errorf("config %s is a directory, not a client config file (%s)", path, configHint)
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("config %s: no such file (%s)", path, configHint)
	}
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	// Another file given by mistake (dev.json, a resource) is named as
	// such, before its fields are checked one by one.
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(data, &head); err != nil || head.Kind != "Config" || head.APIVersion != "strait.dev/v1alpha1" {
		return nil, fmt.Errorf("config %s is not a strait client config (apiVersion strait.dev/v1alpha1, kind Config; %s)", path, configHint)
	}
	var c clientConfig
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	for i := range c.Contexts {
		cx := &c.Contexts[i]
		for _, p := range []*string{&cx.TrustBundle, &cx.ClientCertificate, &cx.ClientKey} {
			if *p != "" && !filepath.IsAbs(*p) {
				*p = filepath.Join(dir, *p)
			}
		}
	}
	return &c, nil
}

func writeClientConfig(path string, c *clientConfig) error {
	c.APIVersion, c.Kind = "strait.dev/v1alpha1", "Config"
	data, err := yaml.Marshal(c)
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, data, 0o600)
}

// clientFlags are --config and --context, shared by commands that talk to a
// running control plane.
type clientFlags struct {
	g       *globals
	config  string
	context string
}

func (f *clientFlags) register(cmd *cobra.Command) {
	cmd.PersistentFlags().StringVar(&f.config, "config", os.Getenv(configEnv), "client config file, e.g. DIR/strait.config from strait dev up (default $"+configEnv+")")
	cmd.PersistentFlags().StringVar(&f.context, "context", "", "context (cluster) in the config (default: its currentContext)")
}

func (f *clientFlags) resolve(cmd *cobra.Command) (*clientContext, error) {
	if f.config == "" {
		return nil, usageError{cmd: cmd.CommandPath(), err: errors.New("--config is required (or set $" + configEnv + ")")}
	}
	c, err := loadClientConfig(f.config)
	if err != nil {
		return nil, err
	}
	name := f.context
	if name == "" {
		name = c.CurrentContext
	}
	var names []string
	for i := range c.Contexts {
		if c.Contexts[i].Name == name {
			return &c.Contexts[i], nil
		}
		names = append(names, c.Contexts[i].Name)
	}
	if name == "" {
		return nil, usageError{cmd: cmd.CommandPath(), err: fmt.Errorf("--context is required: %s has no currentContext (contexts: %v)", f.config, names)}
	}
	return nil, fmt.Errorf("context %q not found in %s (contexts: %v)", name, f.config, names)
}

// dial opens an mTLS connection to the context's control plane, verifying
// it is that cluster's control plane under the context's trust bundle.
func (f *clientFlags) dial(cmd *cobra.Command) (*grpc.ClientConn, *clientContext, error) {
	cx, err := f.resolve(cmd)
	if err != nil {
		return nil, nil, err
	}
	conn, err := dialContext(cx)
	return conn, cx, err
}

// dialContext opens an mTLS connection to the context's control plane.
func dialContext(cx *clientContext) (*grpc.ClientConn, error) {
	td, err := identity.ParseTrustDomain(cx.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("context %s: trustDomain: %w", cx.Name, err)
	}
	pemBytes, err := os.ReadFile(cx.TrustBundle)
	if err != nil {
		return nil, fmt.Errorf("context %s: trustBundle: %w", cx.Name, err)
	}
	b, err := bundle.ParsePEM(td, 0, pemBytes)
	if err != nil {
		return nil, fmt.Errorf("context %s: trustBundle: %w", cx.Name, err)
	}
	admin, err := svidfile.Load(cx.ClientCertificate, cx.ClientKey)
	if err != nil {
		return nil, fmt.Errorf("context %s: admin credentials: %w", cx.Name, err)
	}
	if exp := admin.Certificates[0].NotAfter; time.Now().After(exp) {
		return nil, fmt.Errorf("context %s: admin credentials expired at %s; re-issue them with `strait controlplane admin-credentials --dir <control-plane dir>`", cx.Name, exp.UTC().Format(time.RFC3339))
	}
	want, err := identity.ControlPlane(td, cx.Cluster)
	if err != nil {
		return nil, fmt.Errorf("context %s: cluster: %w", cx.Name, err)
	}
	v, err := svid.NewVerifier(svid.VerifierConfig{TrustDomain: td, Bundles: b})
	if err != nil {
		return nil, err
	}
	chain := make([][]byte, 0, len(admin.Certificates))
	for _, c := range admin.Certificates {
		chain = append(chain, c.Raw)
	}
	tc := &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // replaced by the SPIFFE verification below
		Certificates:       []tls.Certificate{{Certificate: chain, PrivateKey: admin.PrivateKey}},
		VerifyConnection: v.VerifyConnection(svid.RoleServer, func(id spiffeid.ID) error {
			if id != want {
				return fmt.Errorf("server is %s, want %s", id, want)
			}
			return nil
		}),
	}
	conn, err := grpc.NewClient(cx.Server, grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			return explainCallError(cx, method, invoker(ctx, method, req, reply, cc, opts...))
		}))
	if err != nil {
		return nil, err
	}
	return conn, nil
}

// callError is a failed call to a control plane that the client, not the
// control plane, explains: it could not be reached, it is not the control
// plane the context names, or it does not serve the method. It keeps the
// gRPC code (callers test it), with a message short enough to quote, and
// says on Error what to check.
type callError struct {
	st   *status.Status
	hint string
}

func (e *callError) Error() string              { return e.st.Message() + "; " + e.hint }
func (e *callError) GRPCStatus() *status.Status { return e.st }

// explainCallError turns gRPC's own account of a call that never reached
// the control plane's API ("connection error: desc = \"transport: Error
// while dialing: ...\"", "method X not implemented") into a callError that
// names the context and its address.
func explainCallError(cx *clientContext, method string, err error) error {
	s, ok := status.FromError(err)
	if !ok {
		return err
	}
	where := fmt.Sprintf("the control plane of context %q at %s", cx.Name, cx.Server)
	switch s.Code() {
	case codes.Unavailable:
		msg := s.Message()
		desc, isConn := strings.CutPrefix(msg, "connection error: desc = ")
		switch {
		case isConn:
			if d, err := strconv.Unquote(desc); err == nil {
				desc = d
			}
			desc = strings.TrimPrefix(desc, "transport: ")
		case strings.HasPrefix(msg, "name resolver error"):
			desc = "cannot resolve its host name"
		case strings.Contains(msg, "server preface"):
			desc = msg
		default:
			return err // the control plane's own answer
		}
		if tlsErr, ok := strings.CutPrefix(desc, "authentication handshake failed: "); ok {
			return &callError{st: status.New(codes.Unavailable, fmt.Sprintf("TLS handshake with %s (the server of context %q) failed: %s", cx.Server, cx.Name, tlsErr)),
				hint: fmt.Sprintf("is %s the address of cluster %s's control plane, and are the context's trustBundle and credentials that cluster's?", cx.Server, cx.Cluster)}
		}
		// "Error while dialing: dial tcp ADDR: connect: connection refused":
		// the last part says why.
		if i := strings.LastIndex(desc, ": "); i >= 0 {
			desc = desc[i+2:]
		}
		return &callError{st: status.New(codes.Unavailable, fmt.Sprintf("cannot reach %s: %s", where, desc)),
			hint: "is it running, and is that its address? (clusters that `strait dev down --dir DIR` stopped start again with `strait dev up --dir DIR`)"}
	case codes.DeadlineExceeded:
		if s.Message() != context.DeadlineExceeded.Error() {
			return err
		}
		return &callError{st: status.New(codes.DeadlineExceeded, fmt.Sprintf("no answer from %s in time", where)),
			hint: "is that its address, and is it running and not overloaded? (its log says more)"}
	case codes.Unimplemented:
		return &callError{st: status.New(codes.Unimplemented, fmt.Sprintf("%s does not serve %s", where, method[strings.LastIndex(method, "/")+1:])),
			hint: fmt.Sprintf("a cluster installed pending serves only the join, `strait status` and `strait federation status` until it joins (`strait federation join TOKEN --context %s`); otherwise it runs another version of strait", cx.Name)}
	}
	return err
}

// admin connects to the context's admin API and returns a context for the
// calls (bounded to 15s); done closes both.
func (f *clientFlags) admin(cmd *cobra.Command) (context.Context, controlplanev1.AdminServiceClient, *clientContext, func(), error) {
	ctx, conn, cx, done, err := f.call(cmd, 15*time.Second)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	return ctx, controlplanev1.NewAdminServiceClient(conn), cx, done, nil
}

// call dials the context's control plane and returns a context for calls
// bounded by timeout; done closes both.
func (f *clientFlags) call(cmd *cobra.Command, timeout time.Duration) (context.Context, *grpc.ClientConn, *clientContext, func(), error) {
	conn, cx, err := f.dial(cmd)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
	return ctx, conn, cx, func() { cancel(); conn.Close() }, nil
}
