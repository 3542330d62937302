package store

import (
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func mint(t *testing.T, s *Store, req TokenRequest) (string, TokenRecord) {
	t.Helper()
	tok, rec, err := s.MintToken(req)
	if err != nil {
		t.Fatalf("MintToken(%+v): %v", req, err)
	}
	return tok, rec
}

func TestMintToken(t *testing.T) {
	s, clk := openTest(t)
	tests := []struct {
		name    string
		req     TokenRequest
		wantTTL time.Duration
		wantErr string
	}{
		{name: "default ttl", req: TokenRequest{Namespace: "shop", ServiceAccount: "web"}, wantTTL: 10 * time.Minute},
		{name: "explicit ttl", req: TokenRequest{Namespace: "shop", ServiceAccount: "web", Service: "web", TTL: time.Minute}, wantTTL: time.Minute},
		{name: "minimum ttl", req: TokenRequest{Namespace: "shop", ServiceAccount: "web", TTL: 10 * time.Second}, wantTTL: 10 * time.Second},
		{name: "capped ttl", req: TokenRequest{Namespace: "shop", ServiceAccount: "web", TTL: 5 * time.Hour}, wantTTL: time.Hour},
		{name: "ttl too short", req: TokenRequest{Namespace: "shop", ServiceAccount: "web", TTL: 9 * time.Second}, wantErr: "ttl"},
		{name: "negative ttl", req: TokenRequest{Namespace: "shop", ServiceAccount: "web", TTL: -time.Minute}, wantErr: "ttl"},
		{name: "no namespace", req: TokenRequest{ServiceAccount: "web"}, wantErr: "namespace is empty"},
		{name: "bad namespace", req: TokenRequest{Namespace: "Shop", ServiceAccount: "web"}, wantErr: "namespace"},
		{name: "dotted namespace", req: TokenRequest{Namespace: "a.b", ServiceAccount: "web"}, wantErr: "namespace"},
		{name: "no service account", req: TokenRequest{Namespace: "shop"}, wantErr: "service account is empty"},
		{name: "long service account", req: TokenRequest{Namespace: "shop", ServiceAccount: strings.Repeat("a", 64)}, wantErr: "service account"},
		{name: "bad service", req: TokenRequest{Namespace: "shop", ServiceAccount: "web", Service: "-x"}, wantErr: "service"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tok, rec, err := s.MintToken(tc.req)
			if tc.wantErr != "" {
				if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got error %v, want ErrInvalid mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := rec.Expires.Sub(rec.Created); got != tc.wantTTL {
				t.Errorf("ttl: got %s, want %s", got, tc.wantTTL)
			}
			if !rec.Created.Equal(clk.Now()) {
				t.Errorf("created: got %s, want %s", rec.Created, clk.Now())
			}
			if len(tok) != 72 || !strings.HasPrefix(tok, "strt1_"+rec.ID+"_") {
				t.Errorf("token: got %d bytes %q..., want 72 starting strt1_%s_", len(tok), tok[:min(len(tok), 30)], rec.ID)
			}
			if _, _, err := ParseToken(tok); err != nil {
				t.Errorf("ParseToken(minted): %v", err)
			}
		})
	}
}

func TestRedeemToken(t *testing.T) {
	s, clk := openTest(t)
	tok, rec := mint(t, s, TokenRequest{Namespace: "shop", ServiceAccount: "web", Service: "web", TTL: time.Minute})

	clk.Advance(30 * time.Second)
	got, err := s.RedeemToken(tok)
	if err != nil {
		t.Fatalf("first redeem: %v", err)
	}
	if got.ID != rec.ID || got.Namespace != "shop" || got.ServiceAccount != "web" || got.Service != "web" {
		t.Errorf("redeemed: got %+v, want the minted record", got)
	}
	if !got.UsedAt.Equal(clk.Now()) {
		t.Errorf("used at: got %s, want %s", got.UsedAt, clk.Now())
	}
	if _, err := s.RedeemToken(tok); !errors.Is(err, ErrTokenUsed) {
		t.Errorf("second redeem: got %v, want ErrTokenUsed", err)
	}
	list, err := s.ListTokens()
	if err != nil || len(list) != 1 || list[0].UsedAt.IsZero() {
		t.Errorf("ListTokens: got %+v, %v; want one used record", list, err)
	}
}

func TestRedeemTokenFailures(t *testing.T) {
	s, clk := openTest(t)
	expiring, _ := mint(t, s, TokenRequest{Namespace: "shop", ServiceAccount: "web", TTL: 10 * time.Second})
	good, _ := mint(t, s, TokenRequest{Namespace: "shop", ServiceAccount: "web", TTL: time.Hour})
	revoked, revokedRec := mint(t, s, TokenRequest{Namespace: "shop", ServiceAccount: "web"})
	if err := s.RevokeToken(revokedRec.ID); err != nil {
		t.Fatalf("RevokeToken: %v", err)
	}
	if err := s.RevokeToken(revokedRec.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("RevokeToken again: got %v, want ErrNotFound", err)
	}
	clk.Advance(10 * time.Second) // exactly the TTL: expired

	// The same id with another secret; the first secret character changed.
	wrongSecret := []byte(good)
	i := len(TokenPrefix) + 23
	wrongSecret[i] = map[bool]byte{true: 'B', false: 'A'}[wrongSecret[i] == 'A']
	var unknownID [16]byte
	var someSecret [32]byte

	tests := []struct {
		name  string
		token string
		want  error
	}{
		{"expired", expiring, ErrTokenExpired},
		{"wrong secret", string(wrongSecret), ErrTokenInvalid},
		{"unknown id", FormatToken(unknownID, someSecret), ErrTokenInvalid},
		{"revoked", revoked, ErrTokenInvalid},
		{"malformed", "strt1_nope", ErrTokenInvalid},
		{"empty", "", ErrTokenInvalid},
	}
	for _, tc := range tests {
		_, err := s.RedeemToken(tc.token)
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
			continue
		}
		if secret := tc.token[min(len(tc.token), 29):]; len(secret) >= 8 && strings.Contains(err.Error(), secret) {
			t.Errorf("%s: error %q contains the secret", tc.name, err)
		}
	}
	// The failures consumed nothing: the right secret still works once.
	if _, err := s.RedeemToken(good); err != nil {
		t.Fatalf("redeem good token after failures: %v", err)
	}
}

func TestRedeemTokenConcurrentSingleWinner(t *testing.T) {
	s, _ := openTest(t)
	tok, _ := mint(t, s, TokenRequest{Namespace: "shop", ServiceAccount: "web"})
	const n = 50
	var wins, used atomic.Int32
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range n {
		wg.Go(func() {
			<-start
			_, err := s.RedeemToken(tok)
			switch {
			case err == nil:
				wins.Add(1)
			case errors.Is(err, ErrTokenUsed):
				used.Add(1)
			default:
				t.Errorf("redeem: got %v, want nil or ErrTokenUsed", err)
			}
		})
	}
	close(start)
	wg.Wait()
	if wins.Load() != 1 || used.Load() != n-1 {
		t.Fatalf("got %d winners and %d used, want 1 and %d", wins.Load(), used.Load(), n-1)
	}
}

func TestPruneTokens(t *testing.T) {
	s, clk := openTest(t)
	old, _ := mint(t, s, TokenRequest{Namespace: "shop", ServiceAccount: "old", TTL: time.Minute})
	_, usedRec := mint(t, s, TokenRequest{Namespace: "shop", ServiceAccount: "used", TTL: time.Minute})
	clk.Advance(30 * time.Minute)
	_, keep := mint(t, s, TokenRequest{Namespace: "shop", ServiceAccount: "keep", TTL: time.Minute})
	_ = usedRec

	// t0+30m: old and used expired 29m ago: kept, so a late redemption says "expired".
	if n, err := s.PruneTokens(clk.Now()); err != nil || n != 0 {
		t.Fatalf("prune at +30m: got %d, %v; want 0", n, err)
	}
	if _, err := s.RedeemToken(old); !errors.Is(err, ErrTokenExpired) {
		t.Fatalf("redeem old at +30m: got %v, want ErrTokenExpired", err)
	}
	clk.Advance(32 * time.Minute) // t0+62m: old and used expired 61m ago; keep 31m ago
	n, err := s.PruneTokens(clk.Now())
	if err != nil || n != 2 {
		t.Fatalf("prune at +62m: got %d, %v; want 2", n, err)
	}
	list, err := s.ListTokens()
	if err != nil || len(list) != 1 || list[0].ID != keep.ID {
		t.Fatalf("after prune: got %+v, %v; want only %s", list, err, keep.ID)
	}
	if _, err := s.RedeemToken(old); !errors.Is(err, ErrTokenInvalid) {
		t.Fatalf("redeem pruned token: got %v, want ErrTokenInvalid", err)
	}
}

func TestRevokeTokenMalformedID(t *testing.T) {
	s, _ := openTest(t)
	for _, id := range []string{"", "abc", strings.Repeat("A", 22) + "=", strings.Repeat("A", 21) + "\n" + "A"} {
		if err := s.RevokeToken(id); !errors.Is(err, ErrNotFound) {
			t.Errorf("RevokeToken(%q): got %v, want ErrNotFound", id, err)
		}
	}
}

func TestParseToken(t *testing.T) {
	var id [16]byte
	var secret [32]byte
	for i := range id {
		id[i] = byte(i)
	}
	for i := range secret {
		secret[i] = byte(0xff - i)
	}
	valid := FormatToken(id, secret)
	tests := []struct {
		name string
		in   string
		ok   bool
	}{
		{"valid", valid, true},
		{"truncated", valid[:len(valid)-1], false},
		{"extended", valid + "A", false},
		{"bad prefix", "strt2_" + valid[6:], false},
		{"upper prefix", "STRT1_" + valid[6:], false},
		{"padding", valid[:len(valid)-1] + "=", false},
		{"std alphabet", valid[:40] + "+" + valid[41:], false},
		{"newline", valid[:40] + "\n" + valid[41:], false},
		{"separator replaced", valid[:28] + "A" + valid[29:], false},
		{"non-canonical id", valid[:27] + "B" + valid[28:], false},
		{"space", valid[:40] + " " + valid[41:], false},
		{"empty", "", false},
	}
	for _, tc := range tests {
		gotID, gotSecret, err := ParseToken(tc.in)
		if tc.ok {
			if err != nil || gotID != id || gotSecret != secret {
				t.Errorf("%s: got %x %x %v, want the input back", tc.name, gotID, gotSecret, err)
			}
			continue
		}
		if !errors.Is(err, ErrTokenInvalid) {
			t.Errorf("%s: got %v, want ErrTokenInvalid", tc.name, err)
		}
		if len(tc.in) >= 29+8 && strings.Contains(err.Error(), tc.in[29:]) {
			t.Errorf("%s: error %q repeats the secret", tc.name, err)
		}
	}
}

func FuzzParseToken(f *testing.F) {
	var id [16]byte
	var secret [32]byte
	for i := range secret {
		secret[i] = byte(i * 7)
	}
	valid := FormatToken(id, secret)
	for _, seed := range []string{
		valid,
		valid[:len(valid)-5],
		"strt0_" + valid[6:],
		valid[:len(valid)-1] + "=",
		valid + "==",
		"strt1_" + strings.Repeat("A", 21) + "_" + strings.Repeat("A", 44),
		"strt1_" + strings.Repeat("A", 22) + "_" + strings.Repeat("A", 42),
		"strt1_" + strings.Repeat("!", 22) + "_" + strings.Repeat("*", 43),
		"strt1_" + strings.Repeat("A", 22) + "_" + strings.Repeat("A", 41) + "\r\n",
		"",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, secret, err := ParseToken(s)
		if err != nil {
			if !errors.Is(err, ErrTokenInvalid) {
				t.Fatalf("ParseToken: error %v does not wrap ErrTokenInvalid", err)
			}
			if len(s) >= 29+8 && strings.Contains(err.Error(), s[29:]) {
				t.Fatalf("ParseToken: error %q repeats the input", err)
			}
			return
		}
		if back := FormatToken(id, secret); back != s {
			t.Fatalf("ParseToken accepted %q, which formats back as %q", s, back)
		}
	})
}

// A spent token is taken again for the key it was spent for, until it
// expires, and for no other key; a redemption that named no key cannot
// be repeated.
func TestRedeemTokenRepeatsForTheSameKey(t *testing.T) {
	s, clk := openTest(t)
	tok, _ := mint(t, s, TokenRequest{Namespace: "shop", ServiceAccount: "web", TTL: time.Minute})
	key := []byte("0123456789abcdef0123456789abcdef")
	other := []byte("fedcba9876543210fedcba9876543210")
	first, err := s.RedeemTokenIf(tok, key, nil)
	if err != nil || first.Repeated {
		t.Fatalf("first redeem: %+v, %v", first, err)
	}
	if _, err := s.RedeemTokenIf(tok, other, nil); !errors.Is(err, ErrTokenUsed) {
		t.Errorf("redeem for another key: %v, want ErrTokenUsed", err)
	}
	if _, err := s.RedeemToken(tok); !errors.Is(err, ErrTokenUsed) {
		t.Errorf("redeem naming no key: %v, want ErrTokenUsed", err)
	}
	refused := errors.New("check says no")
	if _, err := s.RedeemTokenIf(tok, key, func(TokenRecord) error { return refused }); !errors.Is(err, refused) {
		t.Errorf("repeat refused by check: %v", err)
	}
	clk.Advance(30 * time.Second)
	again, err := s.RedeemTokenIf(tok, key, nil)
	if err != nil || !again.Repeated || !again.UsedAt.Equal(first.UsedAt) {
		t.Errorf("repeat for the same key: %+v, %v; want Repeated, first use kept", again, err)
	}
	clk.Advance(time.Minute)
	if _, err := s.RedeemTokenIf(tok, key, nil); !errors.Is(err, ErrTokenExpired) {
		t.Errorf("repeat after expiry: %v, want ErrTokenExpired", err)
	}

	// Spent without a key: never again.
	keyless, _ := mint(t, s, TokenRequest{Namespace: "shop", ServiceAccount: "web", TTL: time.Minute})
	if _, err := s.RedeemToken(keyless); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RedeemTokenIf(keyless, key, nil); !errors.Is(err, ErrTokenUsed) {
		t.Errorf("repeat of a token spent without a key: %v, want ErrTokenUsed", err)
	}
}
