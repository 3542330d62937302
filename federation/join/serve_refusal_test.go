package join

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/federation/token"
)

// What Serve refuses itself reaches its Refuser with the joiner's claims
// cut short (they are unauthenticated, and end in the audit log), and the
// joiner is told a public reason that echoes none of it.
func TestServeRefusalBoundedAndPublic(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	long := strings.Repeat("w", 20000)
	got := make(chan Refusal, 1)
	done := make(chan error, 1)
	go func() {
		done <- Serve(context.Background(), b, tls.ConnectionState{}, &federationv1.JoinOffer{Cluster: "east"},
			func(context.Context, *federationv1.JoinRequest, []byte) (*federationv1.JoinResult, error) {
				t.Error("redeem asked for a request naming another cluster than its hello")
				return nil, errors.New("no")
			},
			func(_ context.Context, r Refusal) { got <- r })
	}()
	a.SetDeadline(time.Now().Add(10 * time.Second))
	if err := WriteMsg(a, &federationv1.JoinRequest{Cluster: "west"}); err != nil {
		t.Fatal(err)
	}
	var offer federationv1.JoinOffer
	if err := ReadMsg(a, &offer); err != nil {
		t.Fatal(err)
	}
	if err := WriteMsg(a, &federationv1.JoinRequest{TokenId: long, Cluster: long, Proof: []byte("p")}); err != nil {
		t.Fatal(err)
	}
	var res federationv1.JoinResult
	if err := ReadMsg(a, &res); err != nil {
		t.Fatal(err)
	}
	if res.GetReason() != string(token.ReasonMalformed) || res.GetError() == "" || strings.Contains(res.GetError(), "www") {
		t.Errorf("joiner told %q (%s), want a malformed refusal that echoes nothing", res.GetError(), res.GetReason())
	}
	if err := <-done; err == nil {
		t.Error("Serve returned no error for a refusal")
	}
	r := <-got
	if len(r.Cluster) > MaxClaim+3 || len(r.TokenID) > MaxClaim+3 || len(r.Err.Error()) > 4*MaxClaim || r.Reason != string(token.ReasonMalformed) {
		t.Errorf("refusal not bounded: cluster %d bytes, token %d bytes, detail %d bytes, reason %q", len(r.Cluster), len(r.TokenID), len(r.Err.Error()), r.Reason)
	}
}

// The public messages name the reason and nothing else.
func TestPublicMessages(t *testing.T) {
	for _, r := range []string{"malformed", "truncated", "tampered", "unsupported_version", "expired", "not_yet_valid", "wrong_cluster",
		"revoked", "superseded", "already_used", "unknown", "bad_proof", "conflict", "internal", "", "something new"} {
		m := PublicMessage(r)
		if m == "" || strings.Contains(m, "%!") {
			t.Errorf("PublicMessage(%q) = %q", r, m)
		}
		if tr := token.Reason(r); r != "" && r != "internal" && r != "conflict" && r != "something new" && r != "malformed" {
			if want := token.Errorf(tr, "x").Error(); !strings.HasPrefix(m, strings.TrimSuffix(want, ": x")) {
				t.Errorf("PublicMessage(%q) = %q, want the reason's phrase %q", r, m, want)
			}
		}
	}
}
