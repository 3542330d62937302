package token

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/identity"
)

// Format constants.
const (
	// Version is the format version this package writes and reads.
	Version = 1
	// Prefix starts every version 1 token.
	Prefix = "strait-join-v1."
	// MaxLength is the longest token New makes and Parse reads (surrounding
	// white space aside).
	MaxLength = 2048

	// DefaultTTL is the lifetime of a token when Params.TTL is zero.
	DefaultTTL = 15 * time.Minute
	// MaxTTL is the longest lifetime a token may have.
	MaxTTL = 24 * time.Hour
	// MaxClockSkew caps the skew allowance Check accepts, so that the
	// allowance cannot stretch a token's life materially.
	MaxClockSkew = 5 * time.Minute
	// DefaultClockSkew is a reasonable allowance for Check on the joining
	// side, whose clock the issuer does not control.
	DefaultClockSkew = time.Minute

	// SecretLength and DigestLength are the sizes of the one-time secret and
	// of the trust bundle digest, in bytes.
	SecretLength = 32
	DigestLength = 32
)

const (
	tagLength      = 16
	headerLength   = 4 + IDLength + SecretLength + 8 + 8 + DigestLength // up to the issuer name
	minPayload     = headerLength + 2 + 2 + 1 + 7 + tagLength           // one-byte names, one IPv4 address
	maxPayload     = (MaxLength - len(Prefix)) * 6 / 8
	maxInput       = 2 * MaxLength // before trimming white space
	flagForCluster = 0x01
	maxUnix        = 253402300799 // 9999-12-31T23:59:59Z

	tagLabel        = "strait-join-v1 integrity"
	secretHashLabel = "strait-join-v1 secret hash"
)

// Token is a decoded join token. It is immutable; New and Parse return only
// valid tokens. Its String is the token itself, a credential: print it only
// for the operator who asked for it. Every fmt verb (%v, %s, %+v, %#v, %q)
// and slog print the Redacted form instead, so a token that ends up in a log
// line or an error message never reveals its secret.
type Token struct {
	id         ID
	secret     [SecretLength]byte
	issuedAt   int64
	expiresAt  int64
	digest     [DigestLength]byte
	issuer     string
	td         spiffeid.TrustDomain
	gateways   []gateway
	forCluster string
}

// Params says what token New makes.
type Params struct {
	// Issuer is the name of the issuing cluster (required; a DNS label, as
	// identity.ValidateClusterName checks).
	Issuer string
	// TrustDomain is the mesh's trust domain (required).
	TrustDomain spiffeid.TrustDomain
	// GatewayAddrs are the issuer's east-west gateway addresses as host:port,
	// in the order the joiner should try them (1 to MaxGatewayAddrs, no
	// duplicates). Hosts are IPv4 or IPv6 addresses or DNS names; New stores
	// them canonically (IP addresses as net/netip writes them, names in
	// lower case).
	GatewayAddrs []string
	// BundleDigest is the SHA-256 digest of the issuer's trust bundle, as
	// ca/bundle.Digest computes it (required). ParseBundleDigest converts
	// that function's "sha256:<hex>" form.
	BundleDigest [DigestLength]byte
	// TTL is how long the token may be redeemed. Zero means DefaultTTL; it
	// must be at least a second and at most MaxTTL, and is rounded down to a
	// whole number of seconds.
	TTL time.Duration
	// ForCluster, when set, names the only cluster that may redeem the token.
	// Empty means any cluster but the issuer.
	ForCluster string
	// Rand is the source of the token ID and secret. Nil means
	// crypto/rand.Reader.
	Rand io.Reader
	// Now is the clock. Nil means time.Now. The issue time is rounded down to
	// a whole second.
	Now func() time.Time
}

// New makes a token from p, drawing its ID and secret from p.Rand. It does no
// other I/O; storing the token's ID and SecretHash is the caller's job.
func New(p Params) (*Token, error) {
	now, rnd, ttl := p.Now, p.Rand, p.TTL
	if now == nil {
		now = time.Now
	}
	if rnd == nil {
		rnd = rand.Reader
	}
	if ttl == 0 {
		ttl = DefaultTTL
	}
	switch {
	case ttl < time.Second:
		return nil, invalidParams("TTL %s is less than a second", ttl)
	case ttl > MaxTTL:
		return nil, invalidParams("TTL %s is more than the maximum of %s", ttl, MaxTTL)
	case p.TrustDomain.IsZero():
		return nil, invalidParams("trust domain is required")
	case len(p.GatewayAddrs) == 0:
		return nil, invalidParams("at least one gateway address is required")
	case len(p.GatewayAddrs) > MaxGatewayAddrs:
		return nil, invalidParams("%d gateway addresses, more than the limit of %d", len(p.GatewayAddrs), MaxGatewayAddrs)
	}
	t := &Token{
		digest:     p.BundleDigest,
		issuer:     p.Issuer,
		td:         p.TrustDomain,
		forCluster: p.ForCluster,
	}
	for _, a := range p.GatewayAddrs {
		g, err := parseGateway(a)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidParams, err)
		}
		t.gateways = append(t.gateways, g)
	}
	t.issuedAt = now().Unix()
	t.expiresAt = t.issuedAt + int64(ttl/time.Second)

	var buf [IDLength + SecretLength]byte
	if _, err := io.ReadFull(rnd, buf[:]); err != nil {
		return nil, fmt.Errorf("federation: new join token: read random bytes: %w", err)
	}
	copy(t.id[:], buf[:IDLength])
	copy(t.secret[:], buf[IDLength:])
	if t.id.IsZero() || t.secret == [SecretLength]byte{} {
		return nil, errors.New("federation: new join token: the random source returned zeros")
	}
	if err := t.validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidParams, err)
	}
	if n := len(t.String()); n > MaxLength {
		return nil, invalidParams("the token would be %d characters, more than the limit of %d: give fewer or shorter gateway addresses", n, MaxLength)
	}
	return t, nil
}

func invalidParams(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidParams, fmt.Sprintf(format, args...))
}

// validate checks every field of t for validity and canonical form. Parse
// and New share it, so New never makes a token Parse refuses.
func (t *Token) validate() error {
	switch {
	case t.id.IsZero():
		return errors.New("token ID is all zeros")
	case t.secret == [SecretLength]byte{}:
		return errors.New("secret is all zeros")
	case t.digest == [DigestLength]byte{}:
		return errors.New("trust bundle digest is missing (all zeros)")
	}
	if err := identity.ValidateClusterName(t.issuer); err != nil {
		return fmt.Errorf("issuer: %w", err)
	}
	if td, err := identity.ParseTrustDomain(t.td.Name()); err != nil {
		return err
	} else if td != t.td {
		return fmt.Errorf("trust domain %q is not in canonical form", t.td.Name())
	}
	if n := len(t.gateways); n == 0 || n > MaxGatewayAddrs {
		return fmt.Errorf("%d gateway addresses, want 1 to %d", n, MaxGatewayAddrs)
	}
	for i, g := range t.gateways {
		if err := g.check(); err != nil {
			return fmt.Errorf("gateway address %d: %v", i+1, err)
		}
		for _, h := range t.gateways[:i] {
			if h == g {
				return fmt.Errorf("gateway address %s is listed twice", g)
			}
		}
	}
	if t.forCluster != "" {
		if err := identity.ValidateClusterName(t.forCluster); err != nil {
			return fmt.Errorf("for-cluster: %w", err)
		}
		if t.forCluster == t.issuer {
			return fmt.Errorf("for-cluster %q is the issuer itself", t.forCluster)
		}
	}
	switch {
	case t.issuedAt < 0 || t.issuedAt > maxUnix:
		return fmt.Errorf("issue time %d is out of range", t.issuedAt)
	case t.expiresAt < 0 || t.expiresAt > maxUnix:
		return fmt.Errorf("expiry time %d is out of range", t.expiresAt)
	case t.expiresAt <= t.issuedAt:
		return fmt.Errorf("expires at %s, not after it was issued at %s", stamp(t.expiresAt), stamp(t.issuedAt))
	case t.expiresAt-t.issuedAt > int64(MaxTTL/time.Second):
		return fmt.Errorf("lifetime of %s is more than the maximum of %s", time.Duration(t.expiresAt-t.issuedAt)*time.Second, MaxTTL)
	}
	return nil
}

// payload returns the binary payload, integrity tag included.
func (t *Token) payload() []byte {
	b := make([]byte, 0, 256)
	var flags byte
	if t.forCluster != "" {
		flags |= flagForCluster
	}
	b = append(b, Version, flags, 0, 0) // the length is filled in below
	b = append(b, t.id[:]...)
	b = append(b, t.secret[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(t.issuedAt))
	b = binary.BigEndian.AppendUint64(b, uint64(t.expiresAt))
	b = append(b, t.digest[:]...)
	b = appendStr8(b, t.issuer)
	b = appendStr8(b, t.td.Name())
	b = append(b, byte(len(t.gateways)))
	for _, g := range t.gateways {
		b = appendGateway(b, g)
	}
	if t.forCluster != "" {
		b = appendStr8(b, t.forCluster)
	}
	binary.BigEndian.PutUint16(b[2:4], uint16(len(b)+tagLength))
	return append(b, integrityTag(&t.secret, b)...)
}

func appendStr8(b []byte, s string) []byte {
	return append(append(b, byte(len(s))), s...)
}

// integrityTag computes the tag over body (the payload before the tag).
func integrityTag(secret *[SecretLength]byte, body []byte) []byte {
	k := hmac.New(sha256.New, secret[:])
	k.Write([]byte(tagLabel))
	m := hmac.New(sha256.New, k.Sum(nil))
	m.Write([]byte(Prefix))
	m.Write(body)
	return m.Sum(nil)[:tagLength]
}

// tagValid reports whether p (a payload with the tag at its end) carries the
// right tag for its secret. p must be at least minPayload bytes.
func tagValid(p []byte) bool {
	secret := (*[SecretLength]byte)(p[4+IDLength : 4+IDLength+SecretLength])
	body, tag := p[:len(p)-tagLength], p[len(p)-tagLength:]
	return hmac.Equal(integrityTag(secret, body), tag)
}

// String returns the token itself, Prefix followed by the base64url payload:
// what `strait federation token create` prints. It is a credential; log
// Redacted instead.
func (t *Token) String() string {
	return Prefix + base64.RawURLEncoding.EncodeToString(t.payload())
}

// Parse decodes a token strictly. Surrounding white space is ignored;
// anything else out of place is an *Error whose Reason says what: the wrong
// prefix, a newer format (ReasonUnsupportedVersion), characters outside
// base64url or a non-canonical encoding, a token cut short
// (ReasonTruncated), trailing data, a failed integrity check
// (ReasonTampered), or fields that are invalid or not in canonical form. It
// checks neither the time nor who redeems the token: see Check.
func Parse(s string) (*Token, error) {
	if len(s) > maxInput {
		return nil, fail(ReasonMalformed, "input is %d bytes, more than a token can be (%d)", len(s), MaxLength)
	}
	s = strings.TrimSpace(s)
	if len(s) > MaxLength {
		return nil, fail(ReasonMalformed, "it is %d characters, more than the limit of %d", len(s), MaxLength)
	}
	body, ok := strings.CutPrefix(s, Prefix)
	if !ok {
		return nil, badPrefix(s)
	}
	if body == "" {
		return nil, fail(ReasonTruncated, "nothing follows %q", Prefix)
	}
	for i := 0; i < len(body); i++ {
		if !isBase64URL(body[i]) {
			return nil, fail(ReasonMalformed, "character %s at position %d is not allowed: a token has only letters, digits, '-' and '_' after its prefix, and no padding", quoteByte(body[i]), len(Prefix)+i+1)
		}
	}
	p, err := base64.RawURLEncoding.Strict().DecodeString(body)
	if err != nil {
		// The alphabet is right, so only the end can be wrong: a last group
		// of one character, or one with non-zero spare bits. Decoded
		// leniently (without a lone last character), a token cut short holds
		// fewer bytes than its header says it has; anything else has a stray
		// or mistyped character at its end.
		cut := len(body)
		if cut%4 == 1 {
			cut--
		}
		q, _ := base64.RawURLEncoding.DecodeString(body[:cut])
		if len(q) < 4 || len(q) < int(binary.BigEndian.Uint16(q[2:4])) {
			return nil, truncated(q)
		}
		return nil, fail(ReasonMalformed, "its last characters are not canonical base64url (a stray or mistyped character at the end?)")
	}
	return decode(p)
}

// decode decodes a payload; see the package documentation for its layout.
func decode(p []byte) (*Token, error) {
	if len(p) < 4 {
		return nil, truncated(p)
	}
	n := int(binary.BigEndian.Uint16(p[2:4]))
	switch {
	case n < minPayload || n > maxPayload:
		return nil, fail(ReasonTampered, "it declares an impossible length of %d bytes", n)
	case len(p) < n:
		return nil, truncated(p)
	case len(p) > n:
		if tagValid(p[:n]) {
			return nil, fail(ReasonMalformed, "stray data (%d bytes) follow it", len(p)-n)
		}
		return nil, fail(ReasonTampered, "integrity check failed: it is not the token that was issued")
	case !tagValid(p):
		return nil, fail(ReasonTampered, "integrity check failed: it is not the token that was issued")
	}
	t, err := walk(p[:n-tagLength])
	if err != nil {
		return nil, Errorf(ReasonMalformed, "%w", err)
	}
	if err := t.validate(); err != nil {
		return nil, Errorf(ReasonMalformed, "%w", err)
	}
	return t, nil
}

// truncated explains a payload p that is shorter than it should be.
func truncated(p []byte) error {
	if len(p) < 4 {
		return fail(ReasonTruncated, "it ends inside its header")
	}
	return fail(ReasonTruncated, "only %d of its %d bytes are present", len(p), binary.BigEndian.Uint16(p[2:4]))
}

// walk reads the fields of a payload whose tag has been checked and removed.
func walk(body []byte) (*Token, error) {
	r := &reader{b: body}
	version, flags := r.byte(), r.byte()
	r.uint16()
	t := &Token{
		id:       ID(r.bytes(IDLength)),
		secret:   [SecretLength]byte(r.bytes(SecretLength)),
		issuedAt: int64(min(r.uint64(), maxUnix+1)),
	}
	t.expiresAt = int64(min(r.uint64(), maxUnix+1))
	t.digest = [DigestLength]byte(r.bytes(DigestLength))
	switch {
	case version != Version:
		return nil, fmt.Errorf("payload version %d does not match its %q prefix", version, Prefix)
	case flags&^flagForCluster != 0:
		return nil, fmt.Errorf("unknown flags %#02x", flags)
	}
	t.issuer = r.str8()
	tdName := r.str8()
	count := int(r.byte())
	if !r.short && (count == 0 || count > MaxGatewayAddrs) {
		return nil, fmt.Errorf("%d gateway addresses, want 1 to %d", count, MaxGatewayAddrs)
	}
	for i := 0; i < count && !r.short; i++ {
		g, err := readGateway(r)
		if err != nil {
			return nil, fmt.Errorf("gateway address %d: %v", i+1, err)
		}
		t.gateways = append(t.gateways, g)
	}
	if flags&flagForCluster != 0 {
		if t.forCluster = r.str8(); t.forCluster == "" && !r.short {
			return nil, errors.New("for-cluster flag is set but the name is empty")
		}
	}
	switch {
	case r.short:
		return nil, errors.New("its fields run past its end")
	case r.off != len(body):
		return nil, fmt.Errorf("%d unexpected bytes follow its last field", len(body)-r.off)
	}
	td, err := identity.ParseTrustDomain(tdName)
	if err != nil {
		return nil, err
	}
	if td.Name() != tdName {
		return nil, fmt.Errorf("trust domain %q is not in canonical form", tdName)
	}
	t.td = td
	return t, nil
}

// badPrefix explains a token that does not start with Prefix, recognising
// the prefixes of other format versions.
func badPrefix(s string) error {
	const stem = "strait-join-v"
	if rest, ok := strings.CutPrefix(s, stem); ok {
		digits := 0
		for digits < len(rest) && digits < 6 && rest[digits] >= '0' && rest[digits] <= '9' {
			digits++
		}
		if digits > 0 && digits < len(rest) && rest[digits] == '.' && rest[0] != '0' {
			return fail(ReasonUnsupportedVersion, "it is in format v%s, and this strait reads only v%d: upgrade strait on this cluster", rest[:digits], Version)
		}
	}
	if s == "" {
		return fail(ReasonMalformed, "it is empty")
	}
	return fail(ReasonMalformed, "it does not start with %q", Prefix)
}

func isBase64URL(c byte) bool {
	return c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_'
}

func quoteByte(c byte) string {
	if c >= 0x20 && c < 0x7f {
		return fmt.Sprintf("%q", rune(c))
	}
	return fmt.Sprintf("0x%02x", c)
}

// Check applies the checks that need no store: that joiner (the name of the
// redeeming cluster) may redeem the token, and that now lies between its issue
// time and its expiry, allowing for skew between the issuer's clock and
// now's in both directions. Skew is capped at MaxClockSkew; the issuer,
// whose clock issued the token, should pass 0; a joiner DefaultClockSkew.
// The token is valid up to, but not at, its expiry. Errors have
// ReasonWrongCluster, ReasonNotYetValid or ReasonExpired.
func (t *Token) Check(now time.Time, joiner string, skew time.Duration) error {
	skew = min(max(skew, 0), MaxClockSkew)
	if err := identity.ValidateClusterName(joiner); err != nil {
		return Errorf(ReasonWrongCluster, "the joining cluster's name is invalid: %w", err)
	}
	if joiner == t.issuer {
		return fail(ReasonWrongCluster, "cluster %q issued it and cannot join itself", joiner)
	}
	if t.forCluster != "" && joiner != t.forCluster {
		return fail(ReasonWrongCluster, "it was issued for cluster %q, and this is %q", t.forCluster, joiner)
	}
	if issued := t.IssuedAt(); now.Before(issued.Add(-skew)) {
		return fail(ReasonNotYetValid, "it was issued at %s, %s after this host's time %s: check the clocks of %q and %q",
			issued.Format(time.RFC3339), issued.Sub(now).Round(time.Second), now.UTC().Format(time.RFC3339), t.issuer, joiner)
	}
	if exp := t.ExpiresAt(); !now.Before(exp.Add(skew)) {
		return fail(ReasonExpired, "it expired at %s (now %s): create a new one on cluster %q",
			exp.Format(time.RFC3339), now.UTC().Format(time.RFC3339), t.issuer)
	}
	return nil
}

// ID returns the token's ID.
func (t *Token) ID() ID { return t.id }

// Issuer returns the name of the issuing cluster.
func (t *Token) Issuer() string { return t.issuer }

// TrustDomain returns the mesh's trust domain.
func (t *Token) TrustDomain() spiffeid.TrustDomain { return t.td }

// GatewayAddrs returns the issuer's gateway addresses (host:port), in order
// of preference. The slice is the caller's.
func (t *Token) GatewayAddrs() []string {
	out := make([]string, len(t.gateways))
	for i, g := range t.gateways {
		out[i] = g.String()
	}
	return out
}

// BundleDigest returns the SHA-256 digest of the issuer's trust bundle, which
// the joiner must find in the bundle the issuer's gateway presents.
func (t *Token) BundleDigest() [DigestLength]byte { return t.digest }

// BundleDigestString returns BundleDigest as ca/bundle.Digest writes
// digests: "sha256:" and 64 lower-case hex digits.
func (t *Token) BundleDigestString() string { return FormatBundleDigest(t.digest) }

// IssuedAt returns the issue time (UTC, whole seconds).
func (t *Token) IssuedAt() time.Time { return time.Unix(t.issuedAt, 0).UTC() }

// ExpiresAt returns the expiry (UTC, whole seconds); the token is valid
// before it.
func (t *Token) ExpiresAt() time.Time { return time.Unix(t.expiresAt, 0).UTC() }

// ForCluster returns the name of the only cluster that may redeem the token,
// or "" if any other cluster may.
func (t *Token) ForCluster() string { return t.forCluster }

// SecretHash returns what the issuer stores instead of the secret, and the key
// of the redemption proof: SHA-256 of a label, a zero byte and the secret.
func (t *Token) SecretHash() [sha256.Size]byte {
	h := sha256.New()
	h.Write([]byte(secretHashLabel))
	h.Write([]byte{0})
	h.Write(t.secret[:])
	return [sha256.Size]byte(h.Sum(nil))
}

// Redacted returns a one-line description of the token for logs and
// listings: everything but the secret (and so not the token itself).
func (t *Token) Redacted() string {
	if t == nil {
		return "<nil>"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "id=%s issuer=%s trust_domain=%s", t.id, t.issuer, t.td.Name())
	if t.forCluster != "" {
		fmt.Fprintf(&b, " for_cluster=%s", t.forCluster)
	}
	fmt.Fprintf(&b, " gateways=%s bundle=%s issued=%s expires=%s",
		strings.Join(t.GatewayAddrs(), ","), t.BundleDigestString(),
		t.IssuedAt().Format(time.RFC3339), t.ExpiresAt().Format(time.RFC3339))
	return b.String()
}

// Format implements fmt.Formatter: every verb prints Redacted (quoted for
// %q), never the secret. Use String to print the token itself.
func (t *Token) Format(f fmt.State, verb rune) {
	if verb == 'q' {
		fmt.Fprintf(f, "%q", t.Redacted())
		return
	}
	io.WriteString(f, t.Redacted())
}

// LogValue implements slog.LogValuer with the fields of Redacted.
func (t *Token) LogValue() slog.Value {
	if t == nil {
		return slog.StringValue("<nil>")
	}
	attrs := []slog.Attr{
		slog.String("id", t.id.String()),
		slog.String("issuer", t.issuer),
		slog.String("trust_domain", t.td.Name()),
	}
	if t.forCluster != "" {
		attrs = append(attrs, slog.String("for_cluster", t.forCluster))
	}
	attrs = append(attrs,
		slog.Any("gateways", t.GatewayAddrs()),
		slog.String("bundle", t.BundleDigestString()),
		slog.Time("expires", t.ExpiresAt()),
	)
	return slog.GroupValue(attrs...)
}

// FormatBundleDigest writes a digest as ca/bundle.Digest does.
func FormatBundleDigest(d [DigestLength]byte) string {
	return "sha256:" + hex.EncodeToString(d[:])
}

// ParseBundleDigest parses the "sha256:<64 lower-case hex digits>" form of
// ca/bundle.Digest.
func ParseBundleDigest(s string) ([DigestLength]byte, error) {
	var d [DigestLength]byte
	h, ok := strings.CutPrefix(s, "sha256:")
	if !ok || len(h) != 2*DigestLength || strings.ToLower(h) != h {
		return d, fmt.Errorf("federation: bundle digest %q: want sha256: and %d lower-case hex digits", s, 2*DigestLength)
	}
	if _, err := hex.Decode(d[:], []byte(h)); err != nil {
		return d, fmt.Errorf("federation: bundle digest %q: %v", s, err)
	}
	return d, nil
}

func stamp(unix int64) string { return time.Unix(unix, 0).UTC().Format(time.RFC3339) }
