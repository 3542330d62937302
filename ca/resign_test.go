package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"strings"
	"testing"
	"time"
)

// withStaleIntermediate returns an authority after activate in which west's
// intermediate still chains to the old root, as a state written by a strait
// that re-signed only the intermediates whose keys it held would have it.
// West's intermediate under the old root expires after ttl.
func withStaleIntermediate(t *testing.T, ttl time.Duration) (*Authority, *time.Time) {
	t.Helper()
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	a := initTest(t, Config{Dir: t.TempDir(), Clock: func() time.Time { return now }}, InitOptions{})
	ctx := t.Context()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if _, err := a.SignIntermediate(ctx, IntermediateRequest{Cluster: "west", CSR: csr, TTL: ttl}); err != nil {
		t.Fatal(err)
	}
	stale := *a.st.intermediate("west")
	if _, err := a.Prepare(ctx, PrepareOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := a.Activate(ctx); err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	*a.st.intermediate("west") = stale
	a.mu.Unlock()
	return a, &now
}

func TestRetireAcknowledgedStillWaitsForIntermediates(t *testing.T) {
	a, _ := withStaleIntermediate(t, 30*24*time.Hour)
	ctx := t.Context()
	for _, opts := range []RetireOptions{{}, {Acknowledged: true}} {
		err := a.Retire(ctx, opts)
		if !errors.Is(err, ErrTransition) || !strings.Contains(err.Error(), "intermediates of west still chain") {
			t.Fatalf("Retire(%+v) with west under the old root: got %v, want a refusal naming west", opts, err)
		}
	}
	if err := a.Retire(ctx, RetireOptions{Force: true}); err != nil {
		t.Fatalf("retire --force: %v", err)
	}
	for _, im := range a.Status().Intermediates {
		if im.Cluster == "west" && im.State != "chains-to-retired-root" {
			t.Fatalf("west intermediate state: got %s, want chains-to-retired-root", im.State)
		}
	}
}

func TestRetireWaitsOnlyForUnexpiredIntermediates(t *testing.T) {
	a, now := withStaleIntermediate(t, 24*time.Hour)
	ctx := t.Context()
	if err := a.Retire(ctx, RetireOptions{Acknowledged: true}); err == nil || !strings.Contains(err.Error(), "west") {
		t.Fatalf("Retire: got %v, want a refusal naming west", err)
	}
	*now = now.Add(25 * time.Hour) // west's intermediate under the old root has expired
	if err := a.Retire(ctx, RetireOptions{}); err != nil {
		t.Fatalf("retire after the blocking intermediate expired: %v", err)
	}
}
