package token

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/identity"
)

var (
	testTD     = spiffeid.RequireTrustDomainFromString("strait.example")
	testNow    = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	testDigest = [DigestLength]byte{0xd1, 0x9e, 0x57, 31: 0x01}
)

// counter is a deterministic Rand: bytes seed, seed+1, seed+2, ...
type counter struct{ next byte }

func (c *counter) Read(p []byte) (int, error) {
	for i := range p {
		c.next++
		p[i] = c.next
	}
	return len(p), nil
}

// testParams returns realistic Params with a fixed clock and randomness.
func testParams() Params {
	return Params{
		Issuer:       "east",
		TrustDomain:  testTD,
		GatewayAddrs: []string{"10.0.0.10:15443", "10.0.0.11:15443", "10.0.0.12:15443"},
		BundleDigest: testDigest,
		TTL:          15 * time.Minute,
		ForCluster:   "west",
		Rand:         &counter{},
		Now:          func() time.Time { return testNow },
	}
}

func mustNew(t testing.TB, p Params) *Token {
	t.Helper()
	tok, err := New(p)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return tok
}

// retag re-encodes a payload after fixing its length field and tag, so that
// a test can reach the checks behind the integrity check.
func retag(body []byte) string {
	p := slices.Clone(body)
	binary.BigEndian.PutUint16(p[2:4], uint16(len(p)+tagLength))
	p = append(p, integrityTag((*[SecretLength]byte)(p[4+IDLength:4+IDLength+SecretLength]), p)...)
	return encodePayload(p)
}

func encodePayload(p []byte) string {
	return Prefix + b64(p)
}

// bodyOf returns the payload of a valid token without its tag.
func bodyOf(t testing.TB, s string) []byte {
	t.Helper()
	p, err := unb64(strings.TrimPrefix(s, Prefix))
	if err != nil {
		t.Fatal(err)
	}
	return p[:len(p)-tagLength]
}

// goldenToken is testParams' token. It pins the version 1 wire format: if it
// changes, tokens issued by older binaries stop parsing.
const goldenToken = "strait-join-v1.AQEAowECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMAAAAABppCpAAAAAAGmkLcTRnlcAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAQRlYXN0DnN0cmFpdC5leGFtcGxlAwEKAAAKPFMBCgAACzxTAQoAAAw8UwR3ZXN0rdNvWyUH9mgnNvdI_AO3Tw"

func TestGoldenToken(t *testing.T) {
	tok := mustNew(t, testParams())
	if got := tok.String(); got != goldenToken {
		t.Fatalf("New(testParams()).String() =\n%s\nwant the golden token\n%s\n(the version 1 format must not change)", got, goldenToken)
	}
	got, err := Parse(goldenToken)
	if err != nil {
		t.Fatalf("Parse(golden): %v", err)
	}
	wantID := ID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}
	checks := []struct {
		name      string
		got, want any
	}{
		{"ID", got.ID(), wantID},
		{"Issuer", got.Issuer(), "east"},
		{"TrustDomain", got.TrustDomain(), testTD},
		{"GatewayAddrs", fmt.Sprint(got.GatewayAddrs()), "[10.0.0.10:15443 10.0.0.11:15443 10.0.0.12:15443]"},
		{"BundleDigest", got.BundleDigest(), testDigest},
		{"IssuedAt", got.IssuedAt(), testNow},
		{"ExpiresAt", got.ExpiresAt(), testNow.Add(15 * time.Minute)},
		{"ForCluster", got.ForCluster(), "west"},
		{"SecretHash", got.SecretHash(), tok.SecretHash()},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: got %v, want %v", c.name, c.got, c.want)
		}
	}
}

func TestNewDefaults(t *testing.T) {
	p := testParams()
	p.TTL, p.ForCluster = 0, ""
	tok := mustNew(t, p)
	if got, want := tok.ExpiresAt().Sub(tok.IssuedAt()), DefaultTTL; got != want {
		t.Errorf("TTL: got %s, want the default %s", got, want)
	}
	if got := tok.ForCluster(); got != "" {
		t.Errorf("ForCluster: got %q, want empty", got)
	}

	// Nil Rand and Now: crypto/rand and time.Now.
	p.Rand, p.Now = nil, nil
	before := time.Now().Truncate(time.Second)
	a, b := mustNew(t, p), mustNew(t, p)
	after := time.Now()
	if a.ID() == b.ID() || a.SecretHash() == b.SecretHash() {
		t.Error("two tokens from crypto/rand share an ID or secret")
	}
	if at := a.IssuedAt(); at.Before(before) || at.After(after) {
		t.Errorf("IssuedAt with the real clock: got %s, want between %s and %s", at, before, after)
	}
}

func TestNewClockInjection(t *testing.T) {
	tests := []struct {
		name       string
		now        time.Time
		ttl        time.Duration
		wantIssued time.Time
		wantTTL    time.Duration
	}{
		{"whole seconds", testNow, time.Hour, testNow, time.Hour},
		{"issue time rounded down", testNow.Add(999 * time.Millisecond), time.Minute, testNow, time.Minute},
		{"TTL rounded down", testNow, 90*time.Second + 900*time.Millisecond, testNow, 90 * time.Second},
		{"maximum TTL", testNow, MaxTTL, testNow, MaxTTL},
		{"other time zone", testNow.In(time.FixedZone("x", 3600)), time.Minute, testNow, time.Minute},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := testParams()
			p.Now = func() time.Time { return tc.now }
			p.TTL = tc.ttl
			tok := mustNew(t, p)
			if got := tok.IssuedAt(); !got.Equal(tc.wantIssued) || got.Location() != time.UTC {
				t.Errorf("IssuedAt: got %s, want %s in UTC", got, tc.wantIssued)
			}
			if got := tok.ExpiresAt().Sub(tok.IssuedAt()); got != tc.wantTTL {
				t.Errorf("lifetime: got %s, want %s", got, tc.wantTTL)
			}
		})
	}
}

func TestNewCanonicalAddresses(t *testing.T) {
	p := testParams()
	p.GatewayAddrs = []string{
		"GW.East.Example.com:15443",
		"[2001:DB8:0:0::1]:443",
		"[fe80::1]:8443",
		"127.0.0.1:15443",
		"localhost:1",
		"[::1]:65535",
		"xn--bcher-kva.example:443",
		"[2001:db8::1]:444",
	}
	tok := mustNew(t, p)
	want := []string{
		"gw.east.example.com:15443",
		"[2001:db8::1]:443",
		"[fe80::1]:8443",
		"127.0.0.1:15443",
		"localhost:1",
		"[::1]:65535",
		"xn--bcher-kva.example:443",
		"[2001:db8::1]:444",
	}
	if got := tok.GatewayAddrs(); !slices.Equal(got, want) {
		t.Fatalf("GatewayAddrs:\ngot  %q\nwant %q", got, want)
	}
	again, err := Parse(tok.String())
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if got := again.GatewayAddrs(); !slices.Equal(got, want) {
		t.Fatalf("GatewayAddrs after Parse:\ngot  %q\nwant %q", got, want)
	}
	tok.GatewayAddrs()[0] = "changed"
	if got := tok.GatewayAddrs()[0]; got != want[0] {
		t.Errorf("GatewayAddrs shares its slice: got %q after the caller changed it", got)
	}
}

func TestNewErrors(t *testing.T) {
	long := strings.Repeat("a", 60)
	longHost := strings.Join([]string{long, long, long, long[:40]}, ".") // 223 bytes
	tests := []struct {
		name    string
		edit    func(*Params)
		wantErr string
	}{
		{"no issuer", func(p *Params) { p.Issuer = "" }, "cluster name is empty"},
		{"bad issuer", func(p *Params) { p.Issuer = "East" }, `cluster name "East" must be lower-case`},
		{"no trust domain", func(p *Params) { p.TrustDomain = spiffeid.TrustDomain{} }, "trust domain is required"},
		{"no addresses", func(p *Params) { p.GatewayAddrs = nil }, "at least one gateway address"},
		{"nine addresses", func(p *Params) {
			p.GatewayAddrs = nil
			for i := range 9 {
				p.GatewayAddrs = append(p.GatewayAddrs, fmt.Sprintf("10.0.0.%d:1", i+1))
			}
		}, "9 gateway addresses, more than the limit of 8"},
		{"duplicate address", func(p *Params) { p.GatewayAddrs = []string{"10.0.0.1:1", "10.0.0.1:1"} }, "listed twice"},
		{"duplicate after canonicalisation", func(p *Params) { p.GatewayAddrs = []string{"GW.example:1", "gw.example:1"} }, "listed twice"},
		{"no port", func(p *Params) { p.GatewayAddrs = []string{"10.0.0.1"} }, "want host:port"},
		{"port 0", func(p *Params) { p.GatewayAddrs = []string{"10.0.0.1:0"} }, "port must be a number from 1 to 65535"},
		{"port too big", func(p *Params) { p.GatewayAddrs = []string{"10.0.0.1:65536"} }, "port must be"},
		{"named port", func(p *Params) { p.GatewayAddrs = []string{"10.0.0.1:https"} }, "port must be"},
		{"empty host", func(p *Params) { p.GatewayAddrs = []string{":443"} }, "host is empty"},
		{"unbracketed IPv6", func(p *Params) { p.GatewayAddrs = []string{"::1:443"} }, "want host:port"},
		{"bracketed name", func(p *Params) { p.GatewayAddrs = []string{"[gw.example]:443"} }, "not a valid IP address"},
		{"IPv6 zone", func(p *Params) { p.GatewayAddrs = []string{"[fe80::1%eth0]:443"} }, `zone "eth0"`},
		{"IPv4-mapped", func(p *Params) { p.GatewayAddrs = []string{"[::ffff:10.0.0.1]:443"} }, "write it as 10.0.0.1"},
		{"unspecified IPv4", func(p *Params) { p.GatewayAddrs = []string{"0.0.0.0:443"} }, "cannot be dialled"},
		{"unspecified IPv6", func(p *Params) { p.GatewayAddrs = []string{"[::]:443"} }, "cannot be dialled"},
		{"multicast", func(p *Params) { p.GatewayAddrs = []string{"224.0.0.1:443"} }, "not a unicast address"},
		{"broadcast", func(p *Params) { p.GatewayAddrs = []string{"255.255.255.255:443"} }, "not a unicast address"},
		{"leading zeros", func(p *Params) { p.GatewayAddrs = []string{"010.0.0.1:443"} }, "ends in a number"},
		{"underscore", func(p *Params) { p.GatewayAddrs = []string{"gw_1.example:443"} }, "only lower-case letters"},
		{"trailing dot", func(p *Params) { p.GatewayAddrs = []string{"gw.example.:443"} }, "label must be 1 to 63"},
		{"hyphen edge", func(p *Params) { p.GatewayAddrs = []string{"-gw.example:443"} }, "may not start or end with '-'"},
		{"long label", func(p *Params) { p.GatewayAddrs = []string{strings.Repeat("a", 64) + ".example:443"} }, "label must be 1 to 63"},
		{"long hostname", func(p *Params) { p.GatewayAddrs = []string{longHost + "." + long + ":1"} }, "more than the limit of 253"},
		{"too long overall", func(p *Params) {
			p.GatewayAddrs = nil
			for i := range 8 {
				p.GatewayAddrs = append(p.GatewayAddrs, fmt.Sprintf("%s%d:443", longHost, i))
			}
		}, "more than the limit of 2048: give fewer or shorter gateway addresses"},
		{"no digest", func(p *Params) { p.BundleDigest = [DigestLength]byte{} }, "trust bundle digest is missing"},
		{"bad for-cluster", func(p *Params) { p.ForCluster = "we.st" }, "for-cluster: identity: invalid"},
		{"for the issuer", func(p *Params) { p.ForCluster = "east" }, `for-cluster "east" is the issuer itself`},
		{"negative TTL", func(p *Params) { p.TTL = -time.Minute }, "less than a second"},
		{"sub-second TTL", func(p *Params) { p.TTL = time.Millisecond }, "less than a second"},
		{"TTL above maximum", func(p *Params) { p.TTL = MaxTTL + time.Second }, "more than the maximum of 24h0m0s"},
		{"clock before 1970", func(p *Params) { p.Now = func() time.Time { return time.Unix(-10, 0) } }, "issue time -10 is out of range"},
		{"clock after 9999", func(p *Params) { p.Now = func() time.Time { return time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC) } }, "out of range"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := testParams()
			tc.edit(&p)
			tok, err := New(p)
			if err == nil {
				t.Fatalf("New: got token %s, want an error containing %q", tok.Redacted(), tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("New: got error %q, want one containing %q", err, tc.wantErr)
			}
			if !errors.Is(err, ErrInvalidParams) {
				t.Errorf("New: error %q does not wrap ErrInvalidParams", err)
			}
		})
	}
	t.Run("bad cluster name wraps identity.ErrInvalid", func(t *testing.T) {
		p := testParams()
		p.Issuer = "East"
		if _, err := New(p); !errors.Is(err, identity.ErrInvalid) {
			t.Errorf("New: got %v, want an error wrapping identity.ErrInvalid", err)
		}
	})
}

func TestNewRandomness(t *testing.T) {
	tests := []struct {
		name    string
		rand    io.Reader
		wantErr string
	}{
		{"short read", bytes.NewReader(make([]byte, 20)), "read random bytes: unexpected EOF"},
		{"failing reader", iotestErr{}, "read random bytes: entropy unavailable"},
		{"zeros", bytes.NewReader(make([]byte, 64)), "random source returned zeros"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := testParams()
			p.Rand = tc.rand
			if _, err := New(p); err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("New: got error %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

type iotestErr struct{}

func (iotestErr) Read([]byte) (int, error) { return 0, errors.New("entropy unavailable") }

func TestRoundTrip(t *testing.T) {
	edits := []struct {
		name string
		edit func(*Params)
	}{
		{"realistic", func(*Params) {}},
		{"any cluster", func(p *Params) { p.ForCluster = "" }},
		{"one IPv6 address", func(p *Params) { p.GatewayAddrs = []string{"[2001:db8::15]:15443"} }},
		{"hostnames", func(p *Params) { p.GatewayAddrs = []string{"gw-1.east.example.com:15443", "gw-2.east.example.com:443"} }},
		{"maximum TTL", func(p *Params) { p.TTL = MaxTTL }},
		{"long names", func(p *Params) {
			p.Issuer, p.ForCluster = strings.Repeat("e", 63), strings.Repeat("w", 63)
			p.TrustDomain = spiffeid.RequireTrustDomainFromString(strings.Repeat("t", 255))
		}},
		{"eight addresses", func(p *Params) {
			p.GatewayAddrs = nil
			for i := range 8 {
				p.GatewayAddrs = append(p.GatewayAddrs, fmt.Sprintf("[2001:db8::%x]:%d", i+1, 15443+i))
			}
		}},
	}
	for _, tc := range edits {
		t.Run(tc.name, func(t *testing.T) {
			p := testParams()
			tc.edit(&p)
			tok := mustNew(t, p)
			s := tok.String()
			if len(s) > MaxLength {
				t.Fatalf("token is %d characters, more than MaxLength", len(s))
			}
			got, err := Parse(s)
			if err != nil {
				t.Fatalf("Parse(String()): %v", err)
			}
			if got.String() != s {
				t.Fatalf("round trip changed the token:\ngot  %s\nwant %s", got, s)
			}
			if got.SecretHash() != tok.SecretHash() || got.Redacted() != tok.Redacted() {
				t.Fatalf("round trip changed the fields:\ngot  %s\nwant %s", got.Redacted(), tok.Redacted())
			}
		})
	}
}

func TestSize(t *testing.T) {
	tests := []struct {
		name  string
		addrs []string
		max   int
	}{
		{"three IPv4", []string{"10.0.0.10:15443", "10.0.0.11:15443", "10.0.0.12:15443"}, 240},
		{"two IPv4 and one IPv6", []string{"203.0.113.10:15443", "203.0.113.11:15443", "[2001:db8::12]:15443"}, 250},
		{"three hostnames", []string{"gw-1.east.example.com:15443", "gw-2.east.example.com:15443", "gw-3.east.example.com:15443"}, 310},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := testParams()
			p.GatewayAddrs = tc.addrs
			n := len(mustNew(t, p).String())
			t.Logf("%s with a for-cluster: %d characters", tc.name, n)
			if n > tc.max {
				t.Errorf("token is %d characters, want at most %d", n, tc.max)
			}
		})
	}
}

func TestRedaction(t *testing.T) {
	tok := mustNew(t, testParams())
	s := tok.String()
	body := strings.TrimPrefix(s, Prefix)
	secretB64 := b64(tok.secret[:])
	var logged bytes.Buffer
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("issued", "token", tok)
	slog.New(slog.NewTextHandler(&logged, nil)).Info("issued", "token", tok)

	outputs := map[string]string{
		"Redacted":  tok.Redacted(),
		"%v":        fmt.Sprintf("%v", tok),
		"%s":        fmt.Sprintf("%s", tok),
		"%+v":       fmt.Sprintf("%+v", tok),
		"%#v":       fmt.Sprintf("%#v", tok),
		"%q":        fmt.Sprintf("%q", tok),
		"%x":        fmt.Sprintf("%x", tok),
		"Sprint":    fmt.Sprint(tok),
		"Errorf %v": fmt.Errorf("join with %v: failed", tok).Error(),
		"slog":      logged.String(),
	}
	for name, out := range outputs {
		for _, leak := range []string{body[:40], secretB64[:20], fmt.Sprintf("%x", tok.secret[:8]), fmt.Sprint(tok.secret[:8])} {
			if strings.Contains(out, leak) {
				t.Errorf("%s output %q contains the token or its secret (%q)", name, out, leak)
			}
		}
		if !strings.Contains(out, tok.ID().String()) {
			t.Errorf("%s output %q lacks the token ID %s", name, out, tok.ID())
		}
	}
	want := "id=aebagbafaydqqcikbmga2dqpca issuer=east trust_domain=strait.example for_cluster=west " +
		"gateways=10.0.0.10:15443,10.0.0.11:15443,10.0.0.12:15443 " +
		"bundle=sha256:d19e570000000000000000000000000000000000000000000000000000000001 " +
		"issued=2026-03-01T12:00:00Z expires=2026-03-01T12:15:00Z"
	if got := tok.Redacted(); got != want {
		t.Errorf("Redacted:\ngot  %s\nwant %s", got, want)
	}
	if got := (*Token)(nil).Redacted(); got != "<nil>" {
		t.Errorf("nil Redacted: got %q, want <nil>", got)
	}
}

func TestBundleDigestStrings(t *testing.T) {
	s := FormatBundleDigest(testDigest)
	if want := "sha256:d19e570000000000000000000000000000000000000000000000000000000001"; s != want {
		t.Fatalf("FormatBundleDigest: got %s, want %s", s, want)
	}
	d, err := ParseBundleDigest(s)
	if err != nil || d != testDigest {
		t.Fatalf("ParseBundleDigest(%s): got %x, %v; want %x", s, d, err, testDigest)
	}
	for _, bad := range []string{
		"", "d19e57", "sha256:", "SHA256:" + s[7:], "sha256:" + strings.ToUpper(s[7:]),
		s + "00", s[:len(s)-1], "sha256:" + strings.Repeat("g", 64), "sha512:" + s[7:],
	} {
		if _, err := ParseBundleDigest(bad); err == nil {
			t.Errorf("ParseBundleDigest(%q): got no error", bad)
		}
	}
}
