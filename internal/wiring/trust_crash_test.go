package wiring

import (
	"context"
	"crypto/x509"
	"log/slog"
	"testing"
	"time"

	"github.com/straitmesh/strait/ca"
)

// TestRotationCutShortBeforeAdminHealsOnRestart: OfferIntermediate
// installs the re-signed intermediate, then re-issues the admin
// credentials under it. Killed between the two, the control plane
// restarts with the admin credentials on the old root's chain; once that
// root is retired, the CLI is refused. The restart must re-issue them.
func TestRotationCutShortBeforeAdminHealsOnRestart(t *testing.T) {
	r := newRotatingCluster(t)
	if _, err := r.dir.MintAdmin(r.trust.issuer, time.Hour); err != nil {
		t.Fatal(err)
	}
	resigned := r.prepareAndActivate(t)
	cert, err := x509.ParseCertificate(resigned)
	if err != nil {
		t.Fatal(err)
	}
	// The crash: the intermediate installed, the admin credentials not.
	if err := r.dir.InstallIntermediate(cert); err != nil {
		t.Fatal(err)
	}
	// The rotation goes on: the old root is retired, and the bundle
	// without it reaches west.
	r.clock.Advance(time.Hour)
	if err := r.ca.Retire(context.Background(), ca.RetireOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	jws, err := r.ca.SignedBundle()
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := r.trust.OfferBundle(jws); !ok || err != nil {
		t.Fatalf("retire bundle not installed: %v %v", ok, err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan error, 1)
	go func() {
		done <- RunControlPlane(ctx, ControlPlaneOptions{Dir: r.dir.Path, Listen: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler), Ready: func(a string) { ready <- a }})
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
	var lastErr error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if _, lastErr = adminStatus(t, r.dir.TrustDomain, r.dir.Path, "west", addr); lastErr == nil {
			return
		}
	}
	t.Fatalf("after the restart the admin cannot reach the control plane: %v", lastErr)
}
