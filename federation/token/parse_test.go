package token

import (
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"

	"github.com/straitmesh/strait/ca/identity"
)

const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

func b64(p []byte) string { return base64.RawURLEncoding.EncodeToString(p) }

func unb64(s string) ([]byte, error) { return base64.RawURLEncoding.DecodeString(s) }

// raw is a payload written from the package documentation's table, apart
// from the implementation, so tests can build every kind of wrong payload.
type raw struct {
	version, flags  byte
	id              [16]byte
	secret          [32]byte
	issued, expires uint64
	digest          [32]byte
	issuer, td      string
	count           int      // -1: len(addrs)
	addrs           [][]byte // type, address, port
	forCluster      string   // written when flags bit 0 is set
	extra           []byte   // after the last field
}

func validRaw() raw {
	r := raw{
		version: 1, flags: 1,
		issued: uint64(testNow.Unix()), expires: uint64(testNow.Unix() + 900),
		digest: testDigest, issuer: "east", td: "strait.example", count: -1,
		addrs: [][]byte{
			{1, 10, 0, 0, 10, 0x3c, 0x53}, {1, 10, 0, 0, 11, 0x3c, 0x53}, {1, 10, 0, 0, 12, 0x3c, 0x53},
		},
		forCluster: "west",
	}
	for i := range r.id {
		r.id[i] = byte(i + 1)
	}
	for i := range r.secret {
		r.secret[i] = byte(i + 17)
	}
	return r
}

func (r raw) body() []byte {
	b := []byte{r.version, r.flags, 0, 0}
	b = append(b, r.id[:]...)
	b = append(b, r.secret[:]...)
	b = binary.BigEndian.AppendUint64(b, r.issued)
	b = binary.BigEndian.AppendUint64(b, r.expires)
	b = append(b, r.digest[:]...)
	b = append(append(b, byte(len(r.issuer))), r.issuer...)
	b = append(append(b, byte(len(r.td))), r.td...)
	if r.count < 0 {
		r.count = len(r.addrs)
	}
	b = append(b, byte(r.count))
	for _, a := range r.addrs {
		b = append(b, a...)
	}
	if r.flags&1 != 0 {
		b = append(append(b, byte(len(r.forCluster))), r.forCluster...)
	}
	return append(b, r.extra...)
}

func (r raw) token() string { return retag(r.body()) }

func nameAddr(host string, port uint16) []byte {
	b := append([]byte{3, byte(len(host))}, host...)
	return binary.BigEndian.AppendUint16(b, port)
}

func TestRawMatchesImplementation(t *testing.T) {
	if got := validRaw().token(); got != goldenToken {
		t.Fatalf("the documented layout encodes to\n%s\nbut New makes\n%s", got, goldenToken)
	}
}

func TestParseAcceptsWhitespace(t *testing.T) {
	for _, in := range []string{
		goldenToken,
		"  " + goldenToken,
		goldenToken + "\n",
		"\t\r\n" + goldenToken + " \r\n",
		"\u00a0" + goldenToken + "\u2003", // pasted from a web page
	} {
		tok, err := Parse(in)
		if err != nil {
			t.Errorf("Parse(%q): %v", in, err)
			continue
		}
		if tok.String() != goldenToken {
			t.Errorf("Parse(%q).String(): got %s, want the golden token", in, tok)
		}
	}
}

func TestParseErrors(t *testing.T) {
	valid := goldenToken
	body := strings.TrimPrefix(valid, Prefix)
	mid := len(valid) / 2
	flip := func(s string, i int) string {
		c := byte('A')
		if s[i] == 'A' {
			c = 'B'
		}
		return s[:i] + string(c) + s[i+1:]
	}
	edit := func(f func(*raw)) string {
		r := validRaw()
		f(&r)
		return r.token()
	}
	withLen := func(n int) string {
		p := append(bodyOf(t, valid), make([]byte, tagLength)...)
		binary.BigEndian.PutUint16(p[2:4], uint16(n))
		return encodePayload(p)
	}

	tests := []struct {
		name    string
		in      string
		reason  Reason
		wantMsg string
	}{
		// The string and its encoding.
		{"empty", "", ReasonMalformed, "it is empty"},
		{"white space only", " \n\t", ReasonMalformed, "it is empty"},
		{"too long", Prefix + strings.Repeat("A", MaxLength), ReasonMalformed, "more than the limit of 2048"},
		{"far too long", strings.Repeat("A", 1<<20), ReasonMalformed, "input is 1048576 bytes"},
		{"no prefix", body, ReasonMalformed, `does not start with "strait-join-v1."`},
		{"prefix without dot", "strait-join-v1" + body, ReasonMalformed, "does not start with"},
		{"upper-case prefix", strings.ToUpper(Prefix) + body, ReasonMalformed, "does not start with"},
		{"other product", "strait-link-v1." + body, ReasonMalformed, "does not start with"},
		{"version 0", "strait-join-v0." + body, ReasonMalformed, "does not start with"},
		{"version with leading zero", "strait-join-v02." + body, ReasonMalformed, "does not start with"},
		{"newer version", "strait-join-v2." + body, ReasonUnsupportedVersion, "made by a newer strait: it is in format v2, and this strait reads only v1: upgrade strait"},
		{"much newer version", "strait-join-v17.xyz", ReasonUnsupportedVersion, "format v17"},
		{"prefix only", Prefix, ReasonTruncated, `nothing follows "strait-join-v1."`},
		{"padding", valid + "==", ReasonMalformed, "character '=' at position"},
		{"standard base64 alphabet", Prefix + strings.ReplaceAll(strings.ReplaceAll(body, "-", "+"), "_", "/"), ReasonMalformed, "is not allowed"},
		{"line break inside", valid[:mid] + "\n" + valid[mid:], ReasonMalformed, "character 0x0a at position 117"},
		{"space inside", valid[:mid] + " " + valid[mid:], ReasonMalformed, "character ' ' at position 117"},
		{"non-ASCII inside", valid[:mid] + "é" + valid[mid:], ReasonMalformed, "character 0xc3"},
		{"non-canonical last character", nonCanonical(t), ReasonMalformed, "not canonical base64url"},
		{"stray character at the end", strayChar(valid), ReasonMalformed, "not canonical base64url"},

		// Length and integrity.
		{"one byte", Prefix + "AQ", ReasonTruncated, "it ends inside its header"},
		{"one character", Prefix + "A", ReasonTruncated, "it ends inside its header"},
		{"half", valid[:mid], ReasonTruncated, "of its 163 bytes are present"},
		{"tag cut short", valid[:len(valid)-4], ReasonTruncated, "160 of its 163 bytes are present"},
		{"last character missing", valid[:len(valid)-1], ReasonTruncated, ""},
		{"trailing bytes", valid + "AAAA", ReasonMalformed, "stray data (3 bytes) follow it"},
		{"declared length too small", withLen(minPayload - 1), ReasonTampered, "impossible length of 127 bytes"},
		{"declared length too large", withLen(maxPayload + 1), ReasonTampered, "impossible length"},
		{"declared length wrong", withLen(170), ReasonTruncated, "163 of its 170 bytes"},
		{"character flipped in the middle", flip(valid, mid), ReasonTampered, "integrity check failed"},
		{"character flipped in the tag", flip(valid, len(valid)-3), ReasonTampered, "integrity check failed"},
		{"trailing bytes and tampered", flip(valid, mid) + "AAAA", ReasonTampered, "integrity check failed"},
		{"two tokens pasted together", valid + valid, ReasonMalformed, "is not allowed"},

		// Correctly tagged payloads with wrong content.
		{"payload version 2", edit(func(r *raw) { r.version = 2 }), ReasonMalformed, `payload version 2 does not match its "strait-join-v1." prefix`},
		{"unknown flag", edit(func(r *raw) { r.flags |= 0x80 }), ReasonMalformed, "unknown flags 0x81"},
		{"zero ID", edit(func(r *raw) { r.id = ID{} }), ReasonMalformed, "token ID is all zeros"},
		{"zero secret", edit(func(r *raw) { r.secret = [32]byte{} }), ReasonMalformed, "secret is all zeros"},
		{"zero digest", edit(func(r *raw) { r.digest = [32]byte{} }), ReasonMalformed, "trust bundle digest is missing"},
		{"empty issuer", edit(func(r *raw) { r.issuer = "" }), ReasonMalformed, "issuer: identity: invalid SPIFFE ID: cluster name is empty"},
		{"upper-case issuer", edit(func(r *raw) { r.issuer = "East" }), ReasonMalformed, `cluster name "East" must be lower-case`},
		{"issuer with a dot", edit(func(r *raw) { r.issuer = "ea.st" }), ReasonMalformed, "issuer: "},
		{"issuer too long", edit(func(r *raw) { r.issuer = strings.Repeat("e", 64) }), ReasonMalformed, "64 bytes, more than the limit of 63"},
		{"empty trust domain", edit(func(r *raw) { r.td = "" }), ReasonMalformed, "trust domain is empty"},
		{"upper-case trust domain", edit(func(r *raw) { r.td = "Strait.example" }), ReasonMalformed, "trust domain"},
		{"trust domain as an ID", edit(func(r *raw) { r.td = "spiffe://strait.example" }), ReasonMalformed, `trust domain "spiffe://strait.example" is not in canonical form`},
		{"trust domain with a port", edit(func(r *raw) { r.td = "strait.example:443" }), ReasonMalformed, "trust domain"},
		{"no addresses", edit(func(r *raw) { r.addrs = nil }), ReasonMalformed, "0 gateway addresses, want 1 to 8"},
		{"nine addresses", edit(func(r *raw) {
			for i := range 6 {
				r.addrs = append(r.addrs, []byte{1, 10, 0, 1, byte(i), 0, 1})
			}
		}), ReasonMalformed, "9 gateway addresses, want 1 to 8"},
		{"count above entries", edit(func(r *raw) { r.count = 4 }), ReasonMalformed, "gateway address 4: unknown address type 4"},
		{"count below entries", edit(func(r *raw) { r.count = 2 }), ReasonMalformed, "unexpected bytes follow its last field"},
		{"unknown address type", edit(func(r *raw) { r.addrs[1][0] = 9 }), ReasonMalformed, "gateway address 2: unknown address type 9"},
		{"unspecified IPv4", edit(func(r *raw) { r.addrs[0] = []byte{1, 0, 0, 0, 0, 0, 1} }), ReasonMalformed, "gateway address 1: unspecified address 0.0.0.0"},
		{"port 0", edit(func(r *raw) { r.addrs[0][5], r.addrs[0][6] = 0, 0 }), ReasonMalformed, "gateway address 1: port is 0"},
		{"IPv4-mapped IPv6", edit(func(r *raw) {
			r.addrs[0] = []byte{2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1, 0, 1}
		}), ReasonMalformed, "IPv4-mapped IPv6 address ::ffff:10.0.0.1: write it as 10.0.0.1"},
		{"IPv6 multicast", edit(func(r *raw) {
			r.addrs[0] = []byte{2, 0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1}
		}), ReasonMalformed, "ff02::1 is not a unicast address"},
		{"empty hostname", edit(func(r *raw) { r.addrs[0] = nameAddr("", 1) }), ReasonMalformed, "gateway address 1: empty hostname"},
		{"upper-case hostname", edit(func(r *raw) { r.addrs[0] = nameAddr("GW.example", 1) }), ReasonMalformed, "only lower-case letters"},
		{"hostname that is an IP", edit(func(r *raw) { r.addrs[0] = nameAddr("10.0.0.1", 1) }), ReasonMalformed, "ends in a number"},
		{"hostname with a port", edit(func(r *raw) { r.addrs[0] = nameAddr("gw.example:443", 1) }), ReasonMalformed, "only lower-case letters"},
		{"hostname with a trailing dot", edit(func(r *raw) { r.addrs[0] = nameAddr("gw.example.", 1) }), ReasonMalformed, "label must be"},
		{"hostname with NUL", edit(func(r *raw) { r.addrs[0] = nameAddr("gw\x00", 1) }), ReasonMalformed, "only lower-case letters"},
		{"duplicate address", edit(func(r *raw) { r.addrs[2] = r.addrs[0] }), ReasonMalformed, "gateway address 10.0.0.10:15443 is listed twice"},
		{"address cut short", edit(func(r *raw) { r.addrs = [][]byte{{1, 10, 0}}; r.flags = 0 }), ReasonMalformed, "its fields run past its end"},
		{"for-cluster flag without name", edit(func(r *raw) { r.forCluster = "" }), ReasonMalformed, "for-cluster flag is set but the name is empty"},
		{"for-cluster invalid", edit(func(r *raw) { r.forCluster = "West" }), ReasonMalformed, "for-cluster: identity: invalid"},
		{"for-cluster is the issuer", edit(func(r *raw) { r.forCluster = "east" }), ReasonMalformed, `for-cluster "east" is the issuer itself`},
		{"bytes after the last field", edit(func(r *raw) { r.extra = []byte{0} }), ReasonMalformed, "1 unexpected bytes follow its last field"},
		{"expiry before issue", edit(func(r *raw) { r.expires = r.issued - 1 }), ReasonMalformed, "expires at 2026-03-01T11:59:59Z, not after it was issued at 2026-03-01T12:00:00Z"},
		{"expiry at issue", edit(func(r *raw) { r.expires = r.issued }), ReasonMalformed, "not after it was issued"},
		{"lifetime above maximum", edit(func(r *raw) { r.expires = r.issued + 24*3600 + 1 }), ReasonMalformed, "lifetime of 24h0m1s is more than the maximum of 24h0m0s"},
		{"issue time out of range", edit(func(r *raw) { r.issued, r.expires = 1<<63, 1<<63+1 }), ReasonMalformed, "issue time 253402300800 is out of range"},
		{"expiry out of range", edit(func(r *raw) { r.expires = 1<<64 - 1 }), ReasonMalformed, "expiry time 253402300800 is out of range"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := Parse(tc.in)
			if err == nil {
				t.Fatalf("Parse: got token %s, want a %s error", tok.Redacted(), tc.reason)
			}
			if got := ReasonOf(err); got != tc.reason {
				t.Fatalf("Parse: got reason %q (%v), want %q", got, err, tc.reason)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Fatalf("Parse: got error %q, want one containing %q", err, tc.wantMsg)
			}
			if !strings.HasPrefix(err.Error(), "federation: join token ") {
				t.Errorf("Parse: error %q lacks the package prefix", err)
			}
			if !errors.Is(err, sentinels[tc.reason]) {
				t.Errorf("Parse: errors.Is(%q, sentinel of %s) is false", err, tc.reason)
			}
		})
	}
}

func TestParseBadNamesWrapIdentityErrors(t *testing.T) {
	r := validRaw()
	r.issuer = "East"
	if _, err := Parse(r.token()); !errors.Is(err, identity.ErrInvalid) || !errors.Is(err, ErrMalformed) {
		t.Errorf("Parse: got %v, want an error that is both ErrMalformed and identity.ErrInvalid", err)
	}
}

// nonCanonical returns a token whose last base64 character has non-zero
// spare bits, which lenient decoders accept and Parse must not.
func nonCanonical(t *testing.T) string {
	t.Helper()
	for n := 1; n <= 4; n++ {
		p := testParams()
		p.ForCluster = strings.Repeat("w", n)
		s := mustNew(t, p).String()
		if body := strings.TrimPrefix(s, Prefix); len(body)%4 == 2 || len(body)%4 == 3 {
			last := strings.IndexByte(alphabet, s[len(s)-1])
			return s[:len(s)-1] + string(alphabet[last|1])
		}
	}
	t.Fatal("no token length with spare bits")
	return ""
}

// strayChar appends a character that leaves the body one character over a
// group boundary, or two if that is what makes it non-canonical.
func strayChar(s string) string {
	body := strings.TrimPrefix(s, Prefix)
	switch len(body) % 4 {
	case 0:
		return s + "B"
	default:
		return s + strings.Repeat("B", 5-len(body)%4)
	}
}

var sentinels = map[Reason]error{
	ReasonMalformed:          ErrMalformed,
	ReasonTruncated:          ErrTruncated,
	ReasonTampered:           ErrTampered,
	ReasonUnsupportedVersion: ErrUnsupportedVersion,
	ReasonExpired:            ErrExpired,
	ReasonNotYetValid:        ErrNotYetValid,
	ReasonWrongCluster:       ErrWrongCluster,
	ReasonRevoked:            ErrRevoked,
	ReasonSuperseded:         ErrSuperseded,
	ReasonAlreadyUsed:        ErrAlreadyUsed,
	ReasonUnknown:            ErrUnknown,
	ReasonBadProof:           ErrBadProof,
}

// TestEveryTruncationSaysSo cuts a valid token at every length: each must
// be refused, and from the first payload character on as truncated.
func TestEveryTruncationSaysSo(t *testing.T) {
	for _, s := range []string{goldenToken, nonCanonicalFree(t)} {
		for n := 0; n < len(s); n++ {
			_, err := Parse(s[:n])
			want := ReasonTruncated
			if n < len(Prefix) {
				want = ReasonMalformed
			}
			if got := ReasonOf(err); got != want {
				t.Errorf("Parse(first %d of %d characters): got %v (%q), want reason %s", n, len(s), err, got, want)
			}
		}
	}
}

// nonCanonicalFree returns a valid token whose body length is not a
// multiple of 4, so truncation is tried across every group position.
func nonCanonicalFree(t *testing.T) string {
	p := testParams()
	p.ForCluster = "we"
	return mustNew(t, p).String()
}

// TestEverySingleCharacterChangeIsRefused is the exhaustive form of the
// fuzz property: no single-character change to a valid token parses.
func TestEverySingleCharacterChangeIsRefused(t *testing.T) {
	repl := alphabet + "=+/. \n\x00\xff"
	for _, s := range []string{goldenToken, nonCanonicalFree(t)} {
		counts := map[Reason]int{}
		for i := 0; i < len(s); i++ {
			for j := 0; j < len(repl); j++ {
				if repl[j] == s[i] {
					continue
				}
				in := s[:i] + repl[j:j+1] + s[i+1:]
				tok, err := Parse(in)
				if err == nil {
					t.Fatalf("Parse(token with character %d changed to %q) = %s, want an error", i, repl[j], tok.Redacted())
				}
				counts[ReasonOf(err)]++
			}
		}
		t.Logf("%d-character token: single-character changes refused as %v", len(s), counts)
	}
}

func TestParseAllocationIsBounded(t *testing.T) {
	huge := Prefix + strings.Repeat("A", 1<<20)
	inputs := map[string]string{
		"valid":         goldenToken,
		"huge":          huge,
		"huge spaces":   strings.Repeat(" ", 1<<20),
		"at the limit":  Prefix + strings.Repeat("A", MaxLength-len(Prefix)),
		"over a little": Prefix + strings.Repeat("A", MaxLength),
	}
	for name, in := range inputs {
		_, _ = Parse(in) // warm up
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		const runs = 200
		for range runs {
			_, _ = Parse(in)
		}
		runtime.ReadMemStats(&after)
		// About 2 KB for a valid token (ten times that under -race, whose
		// instrumented crypto allocates more), whatever the input's size.
		per := (after.TotalAlloc - before.TotalAlloc) / runs
		t.Logf("Parse(%s, %d bytes): %d bytes allocated per call", name, len(in), per)
		if per > 64<<10 {
			t.Errorf("Parse(%s, %d bytes) allocated %d bytes per call, want at most 64 KiB", name, len(in), per)
		}
	}
}

func ExampleParse() {
	_, err := Parse("strait-join-v2.AQEAowECAwQF")
	fmt.Println(err)
	fmt.Println(errors.Is(err, ErrUnsupportedVersion))
	// Output:
	// federation: join token was made by a newer strait: it is in format v2, and this strait reads only v1: upgrade strait on this cluster
	// true
}
