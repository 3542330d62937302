package store

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

func joinRec(id, forCluster string, now time.Time) JoinTokenRecord {
	h := sha256.Sum256([]byte("secret-" + id))
	return JoinTokenRecord{ID: id, SecretHash: h[:], ForCluster: forCluster, Created: now, Expires: now.Add(15 * time.Minute)}
}

func redemption(id, joiner string) Redemption {
	return Redemption{TokenID: id, Joiner: joiner, Remote: "127.0.0.1:1", Link: Link{ID: "l-" + joiner, Peer: joiner, PeerGateways: []string{"127.0.0.1:9"}, Role: "issuer"}}
}

func TestJoinTokenLifecycle(t *testing.T) {
	s, clk := openTest(t)
	now := clk.Now()
	if err := s.PutJoinToken(joinRec("a", "", now)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RedeemJoinToken(redemption("nope", "west")); !errors.Is(err, ErrJoinTokenUnknown) {
		t.Fatalf("unknown token: %v", err)
	}
	// A failing check consumes nothing.
	bad := redemption("a", "west")
	bad.Check = func(JoinTokenRecord) error { return errors.New("proof does not match") }
	if _, err := s.RedeemJoinToken(bad); err == nil {
		t.Fatal("bad proof accepted")
	}
	rec, err := s.RedeemJoinToken(redemption("a", "west"))
	if err != nil {
		t.Fatal(err)
	}
	if rec.UsedBy != "west" || rec.State(clk.Now()) != "used" {
		t.Fatalf("record after redemption: %+v", rec)
	}
	if _, err := s.RedeemJoinToken(redemption("a", "south")); !errors.Is(err, ErrJoinTokenUsed) {
		t.Fatalf("replay: %v", err)
	}
	links, err := s.Links()
	if err != nil || len(links) != 1 || links[0].Peer != "west" {
		t.Fatalf("links: %v %v", links, err)
	}
	// Already linked: a second token for the same joiner is refused.
	if err := s.PutJoinToken(joinRec("b", "", now)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RedeemJoinToken(redemption("b", "west")); !errors.Is(err, ErrLinkExists) {
		t.Fatalf("second link: %v", err)
	}
	if err := s.DeleteLink("west"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RedeemJoinToken(redemption("b", "west")); err != nil {
		t.Fatalf("after removing the link: %v", err)
	}
	// Expired, revoked, superseded.
	if err := s.PutJoinToken(joinRec("c", "", now)); err != nil {
		t.Fatal(err)
	}
	clk.Advance(16 * time.Minute)
	if _, err := s.RedeemJoinToken(redemption("c", "south")); !errors.Is(err, ErrJoinTokenExpired) {
		t.Fatalf("expired: %v", err)
	}
	now = clk.Now()
	if err := s.PutJoinToken(joinRec("d", "", now)); err != nil {
		t.Fatal(err)
	}
	if err := s.RevokeJoinToken("d"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RedeemJoinToken(redemption("d", "south")); !errors.Is(err, ErrJoinTokenRevoked) {
		t.Fatalf("revoked: %v", err)
	}
	if err := s.RevokeJoinToken("b"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("revoking a used token: %v", err)
	}
	if err := s.PutJoinToken(joinRec("e", "south", now)); err != nil {
		t.Fatal(err)
	}
	if err := s.PutJoinToken(joinRec("f", "south", now)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RedeemJoinToken(redemption("e", "south")); !errors.Is(err, ErrJoinTokenSuperseded) {
		t.Fatalf("superseded: %v", err)
	}
	if _, err := s.RedeemJoinToken(redemption("f", "south")); err != nil {
		t.Fatalf("latest token: %v", err)
	}
	toks, err := s.JoinTokens()
	if err != nil || len(toks) != 6 {
		t.Fatalf("tokens: %d %v", len(toks), err)
	}
	log, err := s.AuditLog(100)
	if err != nil {
		t.Fatal(err)
	}
	var joins, refused int
	for _, e := range log {
		switch e.Event {
		case "join":
			joins++
		case "join-refused":
			refused++
		}
	}
	if joins != 3 || refused != 7 {
		t.Fatalf("audit: %d joins, %d refused, want 3 and 7: %+v", joins, refused, log)
	}
}

func TestJoinTokenConcurrentRedemptionOneWinner(t *testing.T) {
	s, clk := openTest(t)
	if err := s.PutJoinToken(joinRec("t", "", clk.Now())); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make([]error, 20)
	for i := range errs {
		wg.Go(func() { _, errs[i] = s.RedeemJoinToken(redemption("t", fmt.Sprintf("c%d", i))) })
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case !errors.Is(err, ErrJoinTokenUsed):
			t.Errorf("loser: %v", err)
		}
	}
	if ok != 1 {
		t.Fatalf("%d redemptions succeeded, want 1", ok)
	}
	if links, _ := s.Links(); len(links) != 1 {
		t.Fatalf("%d links stored, want 1", len(links))
	}
}

func TestLinksSurviveReopen(t *testing.T) {
	path := testPath(t)
	s := openAt(t, path, Options{})
	if err := s.PutLink(Link{ID: "x", Peer: "west", PeerGateways: []string{"127.0.0.1:1"}, Role: "joiner", Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = openAt(t, path, Options{})
	links, err := s.Links()
	if err != nil || len(links) != 1 || links[0].Role != "joiner" {
		t.Fatalf("after reopen: %v %v", links, err)
	}
}

// TestAuditRefusalsKeptApart: a flood of refused redemptions (anyone who
// reaches the join port can make them) keeps only the latest refusals and
// never pushes the record of tokens and joins out of the log; AuditLog
// merges the two in time order.
func TestAuditRefusalsKeptApart(t *testing.T) {
	s, clk := openTest(t)
	if err := s.PutJoinToken(joinRec("a", "", clk.Now())); err != nil {
		t.Fatal(err)
	}
	clk.Advance(time.Second)
	if _, err := s.RedeemJoinToken(redemption("a", "west")); err != nil {
		t.Fatal(err)
	}
	for i := range maxRefusals + 50 {
		clk.Advance(time.Millisecond)
		if _, err := s.RedeemJoinToken(redemption(fmt.Sprintf("unknown-%d", i), "mallory")); !errors.Is(err, ErrJoinTokenUnknown) {
			t.Fatalf("attempt %d: %v", i, err)
		}
	}
	clk.Advance(time.Second)
	if err := s.DeleteLink("west"); err != nil {
		t.Fatal(err)
	}
	log, err := s.AuditLog(maxAudit)
	if err != nil {
		t.Fatal(err)
	}
	var events []string
	refused := 0
	for i, e := range log {
		if i > 0 && e.Time.Before(log[i-1].Time) {
			t.Fatalf("audit event %d (%s at %v) is older than the one before (%v)", i, e.Event, e.Time, log[i-1].Time)
		}
		if e.Event == "join-refused" {
			refused++
			continue
		}
		events = append(events, e.Event)
	}
	if want := []string{"token-created", "join", "link-removed"}; fmt.Sprint(events) != fmt.Sprint(want) {
		t.Errorf("audit events other than refusals: %v, want %v", events, want)
	}
	if refused != maxRefusals {
		t.Errorf("%d refusals kept, want the latest %d", refused, maxRefusals)
	}
	if e := log[len(log)-2]; e.TokenID != fmt.Sprintf("unknown-%d", maxRefusals+49) {
		t.Errorf("latest refusal kept is for %s", e.TokenID)
	}
	// A limit keeps the latest events of both.
	if last, err := s.AuditLog(2); err != nil || len(last) != 2 || last[0].Event != "join-refused" || last[1].Event != "link-removed" {
		t.Errorf("AuditLog(2) = %+v, %v", last, err)
	}
}

// TestRedeemProofFirst: the proof is checked before the token's state, so
// only a holder of the secret learns that a token is used, expired or
// revoked; nothing changes either way.
func TestRedeemProofFirst(t *testing.T) {
	s, clk := openTest(t)
	if err := s.PutJoinToken(joinRec("a", "", clk.Now())); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RedeemJoinToken(redemption("a", "west")); err != nil {
		t.Fatal(err)
	}
	badProof := errors.New("the proof does not match")
	r := redemption("a", "south")
	r.Proof = func(JoinTokenRecord) error { return badProof }
	if _, err := s.RedeemJoinToken(r); !errors.Is(err, badProof) {
		t.Errorf("a used token without its secret: %v, want the proof refused", err)
	}
	r.Proof = func(JoinTokenRecord) error { return nil }
	if _, err := s.RedeemJoinToken(r); !errors.Is(err, ErrJoinTokenUsed) {
		t.Errorf("a used token with its secret: %v, want %v", err, ErrJoinTokenUsed)
	}
	if links, err := s.Links(); err != nil || len(links) != 1 {
		t.Errorf("links after refused redemptions: %v, %v; want west's alone", links, err)
	}
}
