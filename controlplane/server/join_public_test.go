package server

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/store"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/federation/token"
)

// failingSigner fails the way a root authority's signer might, in its own
// terms.
type failingSigner struct{}

func (failingSigner) SignIntermediate(context.Context, string, []byte, time.Duration) (*x509.Certificate, error) {
	return nil, errors.New("ca: open /var/lib/strait/ca/root-key.pem: permission denied")
}

// The joiner is unauthenticated: a refused redemption tells it the reason
// in public terms, and the issuer's own account of it (the signer's error
// with its paths, who used a token and when) goes to the issuer's log and
// audit log only. Before, the Go error chain was sent to the joiner as it
// was.
func TestRedeemRefusalToldInPublicTerms(t *testing.T) {
	e := newTestEnv(t)
	e.srv.cfg.RootAuthority = failingSigner{}
	binding := bytes.Repeat([]byte{7}, token.ExporterLength)
	redeem := func(tok *token.Token, joiner string, csr []byte) *federationv1.JoinResult {
		t.Helper()
		resp, err := federationServer{s: e.srv}.RedeemJoin(context.Background(), &controlplanev1.RedeemJoinRequest{
			Join:           &federationv1.JoinRequest{TokenId: tok.ID().String(), Proof: tok.Proof(binding, joiner), Cluster: joiner, IntermediateCsr: csr},
			ChannelBinding: binding, Remote: "192.0.2.1:4433",
		})
		if err != nil {
			t.Fatalf("RedeemJoin: %v", err)
		}
		return resp.GetResult()
	}

	// The signer fails.
	tok := storedJoinToken(t, e)
	res := redeem(tok, "west", []byte("a CSR"))
	if res.GetError() == "" || res.GetReason() != "internal" {
		t.Fatalf("redemption with a failing signer: %q (%s), want an internal refusal", res.GetError(), res.GetReason())
	}
	for _, internal := range []string{"/var/lib", "permission denied", "ca:", "sign the intermediate"} {
		if strings.Contains(res.GetError(), internal) {
			t.Errorf("the joiner was told the issuer's internals (%q): %q", internal, res.GetError())
		}
	}

	// A replay: the token is used, by whom and when is the issuer's record.
	if res := redeem(tok, "west", nil); res.GetError() != "" {
		t.Fatalf("redeem: %s", res.GetError())
	}
	res = redeem(tok, "south", nil)
	if res.GetReason() != string(token.ReasonAlreadyUsed) || !strings.Contains(res.GetError(), "already used") {
		t.Errorf("replay told %q (%s), want already used", res.GetError(), res.GetReason())
	}
	if strings.Contains(res.GetError(), "west") || strings.Contains(res.GetError(), fmt.Sprint(time.Now().Year())) {
		t.Errorf("replay told who used the token and when: %q", res.GetError())
	}

	// The issuer's audit log has the details.
	events, err := e.store.AuditLog(100)
	if err != nil {
		t.Fatal(err)
	}
	var details []string
	for _, ev := range events {
		if ev.Event == "join-refused" {
			details = append(details, ev.Detail)
		}
	}
	if len(details) != 2 || !strings.Contains(details[0], "permission denied") || !strings.Contains(details[1], "west") {
		t.Errorf("audited refusals: %q, want the signer's error and who used the token", details)
	}
}

// A linked peer announces its gateway addresses on its control stream
// and this cluster's gateway reports them: each change used to store the
// link and add a "link-stored" entry to the audit log, so a peer that
// kept announcing other addresses (or reconnected with each of two in
// turn) pushed the record of tokens, joins and links out of the log, the
// latest 10,000 entries. Announcing what is stored adds nothing; frequent
// changes from one peer are one entry, which says what they came to.
func TestPeerAddressChangesDoNotFloodAudit(t *testing.T) {
	e := newTestEnv(t)
	storedJoinToken(t, e) // a token-created entry
	if err := e.store.PutLink(store.Link{ID: "l1", Peer: "west", PeerGateways: []string{"198.51.100.1:15443"}, Role: "issuer", Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	report(e.srv, "127.0.0.1:15443") // gw-0 has a WatchGateway stream
	before, err := e.store.AuditLog(10000)
	if err != nil {
		t.Fatal(err)
	}
	ctx := withCaller(context.Background(), "spiffe://"+testTD+"/cluster/"+testCluster+"/gateway")
	const announcements = 200
	var last []string
	for i := range announcements {
		last = []string{fmt.Sprintf("198.51.100.%d:15443", 2+i%2)}
		if i%5 == 4 {
			last = []string{"198.51.100.9:15443", "198.51.100.8:15443"}
		}
		if _, err := (federationServer{s: e.srv}).ReportPeers(ctx, &controlplanev1.ReportPeersRequest{Node: "gw-0",
			Peers: []*controlplanev1.PeerReport{{Peer: "west", GatewayAddresses: last}}}); err != nil {
			t.Fatalf("ReportPeers: %v", err)
		}
	}
	links, err := e.store.Links()
	if err != nil || len(links) != 1 || fmt.Sprint(links[0].PeerGateways) != fmt.Sprint(last) {
		t.Fatalf("links: %v, %v; want west's latest addresses %v stored", links, err, last)
	}
	after, err := e.store.AuditLog(10000)
	if err != nil {
		t.Fatal(err)
	}
	if added := len(after) - len(before); added > 1 {
		t.Errorf("%d announcements of changed addresses by one peer added %d audit entries, want at most 1", announcements, added)
	}
	if got := after[len(after)-1]; got.Peer != "west" || !strings.Contains(got.Detail, strings.Join(last, ",")) {
		t.Errorf("the latest entry %+v does not say what west's addresses came to (%v)", got, last)
	}
}
