package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/straitmesh/strait/controlplane/client"
	"github.com/straitmesh/strait/proxy"
)

// A sidecar that redeemed its registration token but died before saving
// the SVID (or lost the answer) starts again with the same token and data
// directory: it kept the key the token was redeemed for, and the control
// plane takes the spent token again for that key. The same token from a
// sidecar without that key is refused, as it always was.
func TestTokenRedeemedBeforeACrashStillStartsTheSidecar(t *testing.T) {
	c := newCluster(t, "east", clusterOptions{})
	token := c.token("backend")

	// The first life: the token is redeemed, the key was on disk, and the
	// SVID never made it there.
	creds, err := proxy.NewCredentials(c.td, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := creds.SetBundle(c.dir.Bundle); err != nil {
		t.Fatal(err)
	}
	first := &client.Identity{ControlPlane: c.addr, Creds: creds}
	conn, err := first.Dial(false)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := first.Certify(ctx, conn, token); err != nil {
		t.Fatalf("first redemption: %v", err)
	}
	conn.Close()
	dir := t.TempDir()
	der, err := x509.MarshalPKCS8PrivateKey(creds.SVID().PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "token-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}

	// The second life, same token and directory: ready.
	w := c.workload("backend-0", "backend", workloadOptions{dataDir: dir, token: token})
	if got := w.sc.Credentials().SVID().Certificates[0].PublicKey; !creds.SVID().Certificates[0].PublicKey.(*ecdsa.PublicKey).Equal(got) {
		t.Error("the SVID is not for the kept key")
	}
	if _, err := os.Stat(filepath.Join(dir, "token-key.pem")); !os.IsNotExist(err) {
		t.Errorf("the redemption key is still on disk once the SVID is saved: %v", err)
	}

	// Anyone else with the spent token: refused.
	other, err := proxy.New(proxy.Config{TrustDomain: c.td, ControlPlane: c.addr, TrustBundle: c.dir.Bundle, Token: token,
		Instance: "backend-1", Service: "backend", Namespace: "default", Inbound: "127.0.0.1:0", App: "127.0.0.1:1",
		DataDir: t.TempDir(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer rcancel()
	if err := other.Run(rctx); err == nil || !strings.Contains(err.Error(), "refused the registration token") {
		t.Errorf("a sidecar without the key, with the spent token: %v, want the token refused", err)
	}
}
