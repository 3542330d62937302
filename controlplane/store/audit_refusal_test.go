package store

import (
	"errors"
	"strings"
	"testing"
)

// Refusals audited before a redemption reaches the store carry what an
// unauthenticated caller sent: they are cut short, and kept with the other
// refusals (apart from the record of tokens, joins and links).
func TestAuditJoinRefusalBounded(t *testing.T) {
	s, _ := openTest(t)
	big := strings.Repeat("x", 70000)
	if err := s.AuditJoinRefusal(Redemption{TokenID: big, Joiner: big, Remote: big}, errors.New(big)); err != nil {
		t.Fatal(err)
	}
	events, err := s.AuditLog(10)
	if err != nil || len(events) != 1 {
		t.Fatalf("AuditLog: %+v, %v", events, err)
	}
	e := events[0]
	if e.Event != "join-refused" {
		t.Errorf("event %q, want join-refused", e.Event)
	}
	if n := len(e.TokenID) + len(e.Peer) + len(e.Remote) + len(e.Detail); n > 1024 {
		t.Errorf("audited refusal holds %d bytes of the caller's input", n)
	}
}
