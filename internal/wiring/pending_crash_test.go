package wiring

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/local"
	"github.com/straitmesh/strait/controlplane/store"
	"github.com/straitmesh/strait/internal/atomicfile"
	"github.com/straitmesh/strait/internal/svidfile"
)

// TestPendingJoinCutShortRecoversOnRestart: a pending cluster's Join is
// acknowledged by the issuer (token spent, link stored, intermediate
// signed) and the joiner is killed while it installs what it received
// (pendingServer.Join: PutLink, then Complete's writes, then MintAdmin).
// Restarted, the control plane must serve as the cluster that joined, to
// the admin credentials and trust bundle its CLI context names: the token
// cannot be redeemed again, and the issuer refuses a new one while it
// holds the link.
func TestPendingJoinCutShortRecoversOnRestart(t *testing.T) {
	for _, tc := range []struct {
		name string
		// crash leaves the data directory as a kill at that point would.
		crash func(t *testing.T, p *local.Pending, c *x509.Certificate, b *bundle.Bundle)
	}{
		{"after the bundle, before the cluster file", func(t *testing.T, p *local.Pending, c *x509.Certificate, b *bundle.Bundle) {
			// Complete writes the intermediate, then the bundle (JSON,
			// then the PEM the CLI context trusts), then the cluster file.
			if err := atomicfile.WriteFile(filepath.Join(p.Path, "intermediate.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := local.WriteBundle(p.Path, b); err != nil {
				t.Fatal(err)
			}
		}},
		{"after Complete, before the admin credentials", func(t *testing.T, p *local.Pending, c *x509.Certificate, b *bundle.Bundle) {
			if _, err := p.Complete([]*x509.Certificate{c}, b); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			td := spiffeid.RequireTrustDomainFromString("strait.example")
			root := catest.New(t, td.Name())
			dir := filepath.Join(t.TempDir(), "west")
			p, err := local.InitPending(dir, "west", td, false)
			if err != nil {
				t.Fatal(err)
			}
			// The issuer's side of the join: the intermediate signed.
			csr, err := p.CSR()
			if err != nil {
				t.Fatal(err)
			}
			cert, err := root.Authority.SignIntermediate(context.Background(), ca.IntermediateRequest{Cluster: "west", CSR: csr, Join: true})
			if err != nil {
				t.Fatal(err)
			}
			// The joiner's side, up to the crash: the link first.
			st, err := store.Open((&local.Dir{Path: dir}).StorePath(), store.Options{})
			if err != nil {
				t.Fatal(err)
			}
			if err := st.PutLink(store.Link{ID: "0102030405060708", Peer: "east", Role: "joiner", Created: time.Now()}); err != nil {
				t.Fatal(err)
			}
			st.Close()
			tc.crash(t, p, cert, root.Bundle())

			// Restart.
			ctx, cancel := context.WithCancel(context.Background())
			ready := make(chan string, 1)
			done := make(chan error, 1)
			go func() {
				done <- RunControlPlane(ctx, ControlPlaneOptions{Dir: dir, Listen: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler), Ready: func(a string) { ready <- a }})
			}()
			defer func() {
				cancel()
				select {
				case <-done:
				case <-time.After(10 * time.Second):
					t.Error("control plane did not stop")
				}
			}()
			var addr string
			select {
			case addr = <-ready:
			case err := <-done:
				t.Fatalf("control plane: %v", err)
			}

			// The CLI's view: the context's trust bundle and admin
			// credentials are the data directory's files.
			var resp *controlplanev1.StatusResponse
			deadline := time.Now().Add(10 * time.Second)
			for {
				resp, err = adminStatus(t, td, dir, "west", addr)
				if err == nil || time.Now().After(deadline) {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			if err != nil {
				t.Fatalf("after the restart the admin cannot reach the control plane with the directory's trust bundle and credentials: %v", err)
			}
			if resp.GetBundleDigest() != root.Bundle().Digest() {
				t.Fatalf("the control plane serves bundle %s, want the mesh's %s (still pending?)", resp.GetBundleDigest(), root.Bundle().Digest())
			}
			if _, err := local.Load(dir); err != nil {
				t.Fatalf("after the restart: %v", err)
			}
		})
	}
}

// adminStatus calls Status as `strait status` does with a context made
// from the data directory (its bundle.pem and admin credentials).
func adminStatus(t *testing.T, td spiffeid.TrustDomain, dir, cluster, addr string) (*controlplanev1.StatusResponse, error) {
	t.Helper()
	d := &local.Dir{Path: dir}
	raw, err := os.ReadFile(d.BundlePEMPath())
	if err != nil {
		return nil, err
	}
	b, err := bundle.ParsePEM(td, 0, raw)
	if err != nil {
		return nil, err
	}
	admin, err := svidfile.Load(d.AdminPaths())
	if err != nil {
		return nil, err
	}
	want, _ := identity.ControlPlane(td, cluster)
	v, err := svid.NewVerifier(svid.VerifierConfig{TrustDomain: td, Bundles: b})
	if err != nil {
		return nil, err
	}
	var chain [][]byte
	for _, c := range admin.Certificates {
		chain = append(chain, c.Raw)
	}
	tc := &tls.Config{
		MinVersion: tls.VersionTLS13, InsecureSkipVerify: true,
		Certificates: []tls.Certificate{{Certificate: chain, PrivateKey: admin.PrivateKey}},
		VerifyConnection: v.VerifyConnection(svid.RoleServer, func(id spiffeid.ID) error {
			if id != want {
				return fmt.Errorf("server is %s, want %s", id, want)
			}
			return nil
		}),
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	resp, err := controlplanev1.NewAdminServiceClient(conn).Status(ctx, &controlplanev1.StatusRequest{})
	if err == nil && resp.GetBundleDigest() == "" {
		return resp, errors.New("no bundle digest: the pending control plane answered")
	}
	return resp, err
}
