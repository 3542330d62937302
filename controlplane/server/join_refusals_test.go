package server

import (
	"bytes"
	"context"
	"strings"
	"testing"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/store"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/federation/token"
)

// storedJoinToken makes a token of e's cluster and stores its record as
// CreateJoinToken does (which needs a live gateway for the addresses).
func storedJoinToken(t *testing.T, e *testEnv) *token.Token {
	t.Helper()
	b := e.bundle.Load()
	digest, err := token.ParseBundleDigest(b.Digest())
	if err != nil {
		t.Fatal(err)
	}
	tok, err := token.New(token.Params{Issuer: testCluster, TrustDomain: td, GatewayAddrs: []string{"127.0.0.1:15443"}, BundleDigest: digest})
	if err != nil {
		t.Fatal(err)
	}
	hash := tok.SecretHash()
	if err := e.store.PutJoinToken(store.JoinTokenRecord{ID: tok.ID().String(), SecretHash: hash[:], BundleDigest: b.Digest(), Created: tok.IssuedAt(), Expires: tok.ExpiresAt()}); err != nil {
		t.Fatal(err)
	}
	return tok
}

func redeemAs(t *testing.T, e *testEnv, ctx context.Context, tok *token.Token, joiner string) *federationv1.JoinResult {
	t.Helper()
	binding := bytes.Repeat([]byte{7}, token.ExporterLength)
	resp, err := federationServer{s: e.srv}.RedeemJoin(ctx, &controlplanev1.RedeemJoinRequest{
		Join:           &federationv1.JoinRequest{TokenId: tok.ID().String(), Proof: tok.Proof(binding, joiner), Cluster: joiner},
		ChannelBinding: binding, Remote: "192.0.2.1:4433",
	})
	if err != nil {
		t.Fatalf("RedeemJoin: %v", err)
	}
	return resp.GetResult()
}

// The issuer's gateway gives up on a redemption when the joiner's
// connection goes away (the RPC's context is that connection's) or after
// its own 20s bound, and then tells the joiner, if it is still there, that
// the issuer "could not process the join". A redemption whose caller is
// gone must therefore change nothing: before, the control plane went on
// and consumed the token and stored a link (and signed an intermediate)
// for a joiner that never learned of it, which then needed an unlink on
// the issuer before any new token could work.
func TestRedeemAbandonedChangesNothing(t *testing.T) {
	e := newTestEnv(t)
	tok := storedJoinToken(t, e)
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the joiner's connection closed while the request was on its way
	res := redeemAs(t, e, ctx, tok, "west")
	if res.GetError() == "" {
		t.Errorf("a redemption whose caller had gone away succeeded: link %s", res.GetLinkId())
	}
	recs, err := e.store.JoinTokens()
	if err != nil || len(recs) != 1 {
		t.Fatalf("tokens: %v, %v", recs, err)
	}
	if st := recs[0].State(e.srv.cfg.Clock()); st != "unused" {
		t.Errorf("token state after an abandoned redemption: %s, want unused", st)
	}
	if links, _ := e.store.Links(); len(links) != 0 {
		t.Errorf("links after an abandoned redemption: %v, want none", links)
	}
	// The joiner can still redeem it.
	if res := redeemAs(t, e, context.Background(), tok, "west"); res.GetError() != "" {
		t.Fatalf("redeeming again after the abandoned attempt: %s (%s)", res.GetError(), res.GetReason())
	}
}

// Every redemption attempt, refused or not, is in the store's audit log
// (docs/federation.md, The join exchange, step 5), including those the
// control plane refuses before it looks the token up.
func TestEarlyRefusalsAudited(t *testing.T) {
	e := newTestEnv(t)
	tok := storedJoinToken(t, e)
	binding := bytes.Repeat([]byte{7}, token.ExporterLength)
	for _, jr := range []*federationv1.JoinRequest{
		{TokenId: tok.ID().String(), Proof: tok.Proof(binding, testCluster), Cluster: testCluster},                                   // joins itself
		{TokenId: tok.ID().String(), Proof: tok.Proof(binding, "Bad_Name"), Cluster: "Bad_Name"},                                     // not a cluster name
		{TokenId: "not-a-token-id", Proof: tok.Proof(binding, "west"), Cluster: "west"},                                              // malformed ID
		{TokenId: tok.ID().String(), Proof: tok.Proof(binding, "west"), Cluster: "west", GatewayAddresses: []string{"no port here"}}, // bad address
	} {
		resp, err := federationServer{s: e.srv}.RedeemJoin(context.Background(), &controlplanev1.RedeemJoinRequest{Join: jr, ChannelBinding: binding, Remote: "192.0.2.1:4433"})
		if err != nil || resp.GetResult().GetError() == "" {
			t.Fatalf("RedeemJoin(%v): %v, %v; want a refusal", jr, resp, err)
		}
	}
	events, err := e.store.AuditLog(100)
	if err != nil {
		t.Fatal(err)
	}
	refused := 0
	for _, ev := range events {
		if ev.Event == "join-refused" {
			refused++
			if ev.Remote != "192.0.2.1:4433" || ev.Detail == "" {
				t.Errorf("refusal audited without its remote or reason: %+v", ev)
			}
		}
	}
	if refused != 4 {
		t.Errorf("%d of 4 refused redemption attempts in the audit log; events: %+v", refused, events)
	}
	if recs, _ := e.store.JoinTokens(); len(recs) != 1 || recs[0].State(e.srv.cfg.Clock()) != "unused" {
		t.Errorf("token after refused attempts: %+v, want unused", recs)
	}
}

// The token ID comes from an unauthenticated caller: ParseID trims it, so
// up to 64 KiB of white space around a valid ID used to be looked up (as
// "unknown") and written to the audit log as it came, 1000 refusals of it
// holding 64 MB. The store must get the canonical ID.
func TestRedeemUsesCanonicalTokenID(t *testing.T) {
	e := newTestEnv(t)
	tok := storedJoinToken(t, e)
	binding := bytes.Repeat([]byte{7}, token.ExporterLength)
	padded := strings.Repeat(" ", 60000) + tok.ID().String()
	resp, err := federationServer{s: e.srv}.RedeemJoin(context.Background(), &controlplanev1.RedeemJoinRequest{
		Join:           &federationv1.JoinRequest{TokenId: padded, Proof: make([]byte, token.ProofLength), Cluster: "west"},
		ChannelBinding: binding, Remote: "192.0.2.1:4433",
	})
	if err != nil {
		t.Fatal(err)
	}
	if r := resp.GetResult().GetReason(); r != string(token.ReasonBadProof) {
		t.Errorf("a bad proof for a padded ID: reason %q, want %q", r, token.ReasonBadProof)
	}
	events, err := e.store.AuditLog(100)
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range events {
		if ev.Event == "join-refused" && ev.TokenID != tok.ID().String() {
			t.Errorf("refusal audited under a token ID of %d bytes, want the canonical %s", len(ev.TokenID), tok.ID())
		}
	}
}
