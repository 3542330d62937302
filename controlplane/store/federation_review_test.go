package store

import (
	"errors"
	"testing"
)

// Check does the expensive and consequential part of a redemption (the
// server signs the joiner's intermediate in it). A redemption that the
// store refuses anyway, because the joiner is already linked, must not
// run it: else an intermediate is signed for a join that did not happen.
func TestRedeemJoinTokenChecksLinkBeforeCheck(t *testing.T) {
	s, clk := openTest(t)
	now := clk.Now()
	for _, id := range []string{"a", "b"} {
		if err := s.PutJoinToken(joinRec(id, "", now)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.RedeemJoinToken(redemption("a", "west")); err != nil {
		t.Fatal(err)
	}
	called := false
	r := redemption("b", "west")
	r.Check = func(JoinTokenRecord) error { called = true; return nil }
	if _, err := s.RedeemJoinToken(r); !errors.Is(err, ErrLinkExists) {
		t.Fatalf("second link: %v", err)
	}
	if called {
		t.Fatal("Check (which signs an intermediate) ran for a redemption refused because the joiner is already linked")
	}
}
