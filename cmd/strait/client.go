package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
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

func loadClientConfig(path string) (*clientConfig, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	var c clientConfig
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if c.Kind != "Config" || c.APIVersion != "strait.dev/v1alpha1" {
		return nil, fmt.Errorf("config %s: want apiVersion strait.dev/v1alpha1 and kind Config", path)
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
	conn, err := grpc.NewClient(cx.Server, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		return nil, err
	}
	return conn, nil
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
