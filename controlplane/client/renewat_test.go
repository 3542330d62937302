package client

import (
	"crypto/x509"
	"testing"
	"time"
)

// TestRenewAtSpreads: renewals fall between 40% and 50% of the SVID's
// life, not all at half life, and never within a second from now.
func TestRenewAtSpreads(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	leaf := &x509.Certificate{NotBefore: now, NotAfter: now.Add(time.Hour)}
	seen := map[time.Time]bool{}
	for range 200 {
		at := renewAt(leaf, now)
		if at.Before(now.Add(24*time.Minute)) || at.After(now.Add(30*time.Minute)) {
			t.Fatalf("renewal at %s into the SVID's life, want between 24m and 30m", at.Sub(now))
		}
		seen[at] = true
	}
	if len(seen) < 100 {
		t.Errorf("200 renewals fell on %d moments: not spread", len(seen))
	}
	late := now.Add(59*time.Minute + 30*time.Second)
	if at := renewAt(leaf, late); at.Before(late.Add(time.Second)) {
		t.Errorf("renewal %s from now, want at least a second", at.Sub(late))
	}
}
