package token

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/straitmesh/strait/ca/identity"
)

func TestCheck(t *testing.T) {
	forWest := mustNew(t, testParams()) // issued testNow, expires testNow+15m, for west
	p := testParams()
	p.ForCluster = ""
	forAny := mustNew(t, p)
	issued, expires := testNow, testNow.Add(15*time.Minute)

	tests := []struct {
		name    string
		tok     *Token
		now     time.Time
		joiner  string
		skew    time.Duration
		reason  Reason // "" for no error
		wantMsg string
	}{
		{"valid at issue", forWest, issued, "west", 0, "", ""},
		{"valid just before expiry", forWest, expires.Add(-time.Nanosecond), "west", 0, "", ""},
		{"any cluster", forAny, issued.Add(time.Minute), "south", 0, "", ""},
		{"expired at expiry", forWest, expires, "west", 0, ReasonExpired,
			`it expired at 2026-03-01T12:15:00Z (now 2026-03-01T12:15:00Z): create a new one on cluster "east"`},
		{"expired long ago", forWest, expires.Add(48 * time.Hour), "west", time.Minute, ReasonExpired, "expired at"},
		{"expired within skew", forWest, expires.Add(59 * time.Second), "west", time.Minute, "", ""},
		{"expired beyond skew", forWest, expires.Add(time.Minute), "west", time.Minute, ReasonExpired, "expired at"},
		{"skew is capped", forWest, expires.Add(MaxClockSkew), "west", time.Hour, ReasonExpired, "expired at"},
		{"negative skew is none", forWest, expires.Add(-time.Second), "west", -time.Hour, "", ""},
		{"not yet valid", forWest, issued.Add(-time.Second), "west", 0, ReasonNotYetValid,
			`it was issued at 2026-03-01T12:00:00Z, 1s after this host's time 2026-03-01T11:59:59Z: check the clocks of "east" and "west"`},
		{"early within skew", forWest, issued.Add(-time.Minute), "west", time.Minute, "", ""},
		{"early beyond skew", forWest, issued.Add(-time.Minute - time.Second), "west", time.Minute, ReasonNotYetValid, "1m1s after"},
		{"clock in another zone", forWest, issued.Add(time.Minute).In(time.FixedZone("x", -7*3600)), "west", 0, "", ""},
		{"for another cluster", forWest, issued, "south", 0, ReasonWrongCluster,
			`is for another cluster: it was issued for cluster "west", and this is "south"`},
		{"wrong cluster wins over expiry", forWest, expires.Add(time.Hour), "south", 0, ReasonWrongCluster, `"west"`},
		{"issuer joins itself", forAny, issued, "east", 0, ReasonWrongCluster, `cluster "east" issued it and cannot join itself`},
		{"empty joiner", forAny, issued, "", 0, ReasonWrongCluster, "the joining cluster's name is invalid"},
		{"invalid joiner", forWest, issued, "West", 0, ReasonWrongCluster, `cluster name "West" must be lower-case`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.tok.Check(tc.now, tc.joiner, tc.skew)
			if tc.reason == "" {
				if err != nil {
					t.Fatalf("Check(%s, %q, %s): got %v, want no error", tc.now, tc.joiner, tc.skew, err)
				}
				return
			}
			if got := ReasonOf(err); got != tc.reason {
				t.Fatalf("Check(%s, %q, %s): got reason %q (%v), want %q", tc.now, tc.joiner, tc.skew, got, err, tc.reason)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Fatalf("Check: got error %q, want one containing %q", err, tc.wantMsg)
			}
			if !errors.Is(err, sentinels[tc.reason]) {
				t.Errorf("Check: errors.Is(%q, sentinel of %s) is false", err, tc.reason)
			}
		})
	}
	t.Run("invalid joiner wraps identity.ErrInvalid", func(t *testing.T) {
		if err := forAny.Check(issued, "-x", 0); !errors.Is(err, identity.ErrInvalid) {
			t.Errorf("Check: got %v, want an error wrapping identity.ErrInvalid", err)
		}
	})
}

func TestErrorIdentity(t *testing.T) {
	err := Errorf(ReasonAlreadyUsed, "token %s was redeemed by %q", ID{1}.String(), "west")
	want := `federation: join token already used: token aeaaaaaaaaaaaaaaaaaaaaaaaa was redeemed by "west"`
	if got := err.Error(); got != want {
		t.Errorf("Error(): got %q, want %q", got, want)
	}
	wrapped := fmt.Errorf("redeem: %w", err)
	for reason, sentinel := range sentinels {
		if got, want := errors.Is(wrapped, sentinel), reason == ReasonAlreadyUsed; got != want {
			t.Errorf("errors.Is(already-used error, sentinel of %s): got %v, want %v", reason, got, want)
		}
	}
	if got := ReasonOf(wrapped); got != ReasonAlreadyUsed {
		t.Errorf("ReasonOf: got %q, want %q", got, ReasonAlreadyUsed)
	}
	if got := ReasonOf(errors.New("other")); got != "" {
		t.Errorf("ReasonOf(unrelated error): got %q, want empty", got)
	}
	if got := ReasonOf(nil); got != "" {
		t.Errorf("ReasonOf(nil): got %q, want empty", got)
	}
	// A detailed error is not a sentinel for another detailed error.
	if errors.Is(err, Errorf(ReasonAlreadyUsed, "other detail")) {
		t.Error("errors.Is matched two distinct detailed errors")
	}
	// Sentinel messages name the package and the problem, and nothing else.
	sentinelMsgs := map[error]string{
		ErrAlreadyUsed:        "federation: join token already used",
		ErrTampered:           "federation: join token was tampered with or corrupted",
		ErrUnsupportedVersion: "federation: join token was made by a newer strait",
		ErrRevoked:            "federation: join token was revoked",
		ErrSuperseded:         "federation: join token was superseded by a newer token",
	}
	for e, want := range sentinelMsgs {
		if got := e.Error(); got != want {
			t.Errorf("sentinel message: got %q, want %q", got, want)
		}
	}
	for reason := range sentinels {
		if _, ok := phrases[reason]; !ok {
			t.Errorf("reason %s has no phrase", reason)
		}
	}
	if got := (&Error{Reason: "novel"}).Error(); got != "federation: join token refused (novel)" {
		t.Errorf("unknown reason message: got %q", got)
	}
	cause := errors.New("disk on fire")
	if e := Errorf(ReasonUnknown, "look up: %w", cause); !errors.Is(e, cause) || !errors.Is(e, ErrUnknown) {
		t.Errorf("Errorf with %%w: got %v, want it to wrap its cause and match ErrUnknown", e)
	}
}

func TestID(t *testing.T) {
	id := ID{0xde, 0xad, 0xbe, 0xef, 15: 0x01}
	s := id.String()
	if len(s) != IDStringLength || s != strings.ToLower(s) {
		t.Fatalf("String: got %q, want %d lower-case characters", s, IDStringLength)
	}
	for _, in := range []string{s, strings.ToUpper(s), " " + s + "\n"} {
		got, err := ParseID(in)
		if err != nil || got != id {
			t.Errorf("ParseID(%q): got %v, %v; want %v", in, got, err, id)
		}
	}
	text, _ := id.MarshalText()
	var back ID
	if err := back.UnmarshalText(text); err != nil || back != id {
		t.Errorf("text round trip: got %v, %v; want %v", back, err, id)
	}
	bad := []struct{ in, want string }{
		{"", "must be 26 characters, got 0"},
		{s[:25], "got 25"},
		{s + "a", "got 27"},
		{s[:25] + "1", "not 26 base32 characters"},               // '1' is not in the alphabet
		{s[:25] + "b", "not 26 base32 characters"},               // non-zero spare bits
		{s[:12] + "\n" + s[13:], "not 26 base32 characters"},     // line break inside
		{s[:25] + "=", "not 26 base32 characters"},               // padding
		{strings.Repeat("a", 26), "token ID is all zeros"},       // the zero ID
		{"strait-join-v1.AQEAowECAwQF", "must be 26 characters"}, // a token, not an ID
	}
	for _, tc := range bad {
		_, err := ParseID(tc.in)
		if ReasonOf(err) != ReasonMalformed || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseID(%q): got %v, want a malformed error containing %q", tc.in, err, tc.want)
		}
	}
	if err := back.UnmarshalText([]byte("nope")); err == nil {
		t.Error("UnmarshalText(nope): got no error")
	}
	if !(ID{}).IsZero() || id.IsZero() {
		t.Error("IsZero is wrong")
	}
}
