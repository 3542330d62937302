package token

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var update = flag.Bool("update", false, "rewrite testdata/fuzz/FuzzParse from fuzzSeeds")

type fuzzSeed struct {
	name string
	in   string
	pos  uint16 // which character the flip property changes
	with byte   // and to what
}

// fuzzSeeds are valid tokens of every shape and the ways they go wrong.
func fuzzSeeds(tb testing.TB) []fuzzSeed {
	valid := goldenToken
	mk := func(edit func(*Params)) string {
		p := testParams()
		edit(&p)
		return mustNew(tb, p).String()
	}
	forge := func(edit func(*raw)) string {
		r := validRaw()
		edit(&r)
		return r.token()
	}
	mid := len(valid) / 2
	return []fuzzSeed{
		{"valid-ipv4-for-cluster", valid, 0, 'x'},
		{"valid-any-cluster", mk(func(p *Params) { p.ForCluster = "" }), 40, 'A'},
		{"valid-ipv6-and-names", mk(func(p *Params) {
			p.GatewayAddrs = []string{"[2001:db8::1]:15443", "gw-2.east.example.com:443", "localhost:1"}
		}), 130, '-'},
		{"valid-eight-addresses", mk(func(p *Params) {
			p.GatewayAddrs = nil
			for i := range 8 {
				p.GatewayAddrs = append(p.GatewayAddrs, fmt.Sprintf("10.1.0.%d:%d", i+1, 15000+i))
			}
		}), 200, '_'},
		{"valid-long-names", mk(func(p *Params) {
			p.Issuer, p.ForCluster = strings.Repeat("e", 63), strings.Repeat("w", 63)
			p.TrustDomain = spiffeid.RequireTrustDomainFromString(strings.Repeat("t", 200) + ".example")
			p.TTL = MaxTTL
		}), 300, '0'},
		{"whitespace-wrapped", " \t" + valid + "\r\n", 1, ' '},
		{"truncated-half", valid[:mid], 10, 'a'},
		{"truncated-last-character", valid[:len(valid)-1], 20, 'b'},
		{"tampered-middle", valid[:mid] + flipChar(valid[mid]) + valid[mid+1:], 30, 'c'},
		{"tampered-tag", valid[:len(valid)-2] + flipChar(valid[len(valid)-2]) + valid[len(valid)-1:], 50, 'd'},
		{"trailing-bytes", valid + "AAAA", 60, 'e'},
		{"newer-version", "strait-join-v2." + strings.TrimPrefix(valid, Prefix), 14, '2'},
		{"padding", valid + "=", 70, 'f'},
		{"forged-expiry-before-issue", forge(func(r *raw) { r.expires = r.issued - 1 }), 80, 'g'},
		{"forged-unknown-address-type", forge(func(r *raw) { r.addrs[0][0] = 9 }), 90, 'h'},
		{"forged-count-overrun", forge(func(r *raw) { r.count = 200 }), 100, 'i'},
		{"empty", "", 110, 0},
		{"prefix-only", Prefix, 120, 0xff},
	}
}

func flipChar(c byte) string {
	if c == 'A' {
		return "B"
	}
	return "A"
}

// FuzzParse checks that Parse never panics and refuses with a reason; that
// whatever it accepts is canonical (re-encodes to the same string) and
// within the format's limits; and that changing any single character of a
// valid token makes it unparseable.
func FuzzParse(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s.in, s.pos, s.with)
	}
	f.Fuzz(func(t *testing.T, in string, pos uint16, with byte) {
		base := goldenToken
		tok, err := Parse(in)
		if err != nil {
			if ReasonOf(err) == "" || !strings.HasPrefix(err.Error(), "federation: join token ") {
				t.Fatalf("Parse(%q): error %q has no reason or prefix", in, err)
			}
		} else {
			base = strings.TrimSpace(in)
			checkCanonical(t, base, tok)
		}
		i := int(pos) % len(base)
		if base[i] == with {
			return
		}
		changed := base[:i] + string([]byte{with}) + base[i+1:]
		if tok, err := Parse(changed); err == nil {
			t.Fatalf("Parse accepted %q, a one-character change (at %d) of the valid token %q: %s", changed, i, base, tok.Redacted())
		}
	})
}

func checkCanonical(t *testing.T, s string, tok *Token) {
	t.Helper()
	if got := tok.String(); got != s {
		t.Fatalf("Parse(%q) re-encodes as %q", s, got)
	}
	if len(s) > MaxLength {
		t.Fatalf("Parse accepted %d characters, more than MaxLength", len(s))
	}
	again, err := Parse(tok.String())
	if err != nil || again.Redacted() != tok.Redacted() || again.SecretHash() != tok.SecretHash() {
		t.Fatalf("re-parse of %q: %v", s, err)
	}
	if n := len(tok.GatewayAddrs()); n < 1 || n > MaxGatewayAddrs {
		t.Fatalf("Parse accepted %d gateway addresses", n)
	}
	if life := tok.ExpiresAt().Sub(tok.IssuedAt()); life <= 0 || life > MaxTTL {
		t.Fatalf("Parse accepted a lifetime of %s", life)
	}
	for _, a := range tok.GatewayAddrs() {
		if _, err := parseGateway(a); err != nil {
			t.Fatalf("Parse accepted gateway %q that New refuses: %v", a, err)
		}
	}
	p := Params{
		Issuer: tok.Issuer(), TrustDomain: tok.TrustDomain(), GatewayAddrs: tok.GatewayAddrs(),
		BundleDigest: tok.BundleDigest(), ForCluster: tok.ForCluster(),
		TTL: tok.ExpiresAt().Sub(tok.IssuedAt()), Now: tok.IssuedAt,
		Rand: strings.NewReader(string(tok.id[:]) + string(tok.secret[:])),
	}
	if made, err := New(p); err != nil || made.String() != s {
		t.Fatalf("New with the fields of %q: %v", s, err)
	}
}

// TestFuzzCorpus keeps testdata/fuzz/FuzzParse in step with fuzzSeeds, so
// that `go test` (without -fuzz) replays every seed as a file too. Run with
// -update to rewrite it.
func TestFuzzCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzParse")
	if *update {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range fuzzSeeds(t) {
		want := fmt.Sprintf("go test fuzz v1\nstring(%s)\nuint16(%d)\nbyte(%s)\n", strconv.Quote(s.in), s.pos, strconv.QuoteRune(rune(s.with)))
		path := filepath.Join(dir, s.name)
		if *update {
			if err := os.WriteFile(path, []byte(want), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Errorf("seed corpus file missing (run go test -run TestFuzzCorpus -update): %v", err)
			continue
		}
		if string(got) != want {
			t.Errorf("seed corpus file %s is stale (run go test -run TestFuzzCorpus -update)", path)
		}
	}
}

// FuzzParseRetagged fuzzes what lies behind the integrity check, which random
// changes to a token almost never get past: it gives each input payload
// (without its tag) a correct length and tag before parsing it. Whatever
// parses must be canonical, as in FuzzParse.
func FuzzParseRetagged(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		if p, err := unb64(strings.TrimPrefix(strings.TrimSpace(s.in), Prefix)); err == nil && len(p) > tagLength {
			f.Add(p[:len(p)-tagLength])
		}
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		if len(body) < 4+IDLength+SecretLength || len(body)+tagLength > maxPayload {
			return
		}
		s := retag(body)
		tok, err := Parse(s)
		if err != nil {
			if r := ReasonOf(err); r != ReasonMalformed && r != ReasonTampered {
				t.Fatalf("Parse(retagged %x): got reason %s (%v), want malformed or tampered", body, r, err)
			}
			return
		}
		checkCanonical(t, s, tok)
	})
}
