// Package token defines Strait's federation join tokens: their wire format,
// strict decoding, and the pure checks and proofs built on them.
//
// A cluster that wants a peer runs `strait federation token create`, which
// calls New and prints Token.String; the peer runs `strait federation join
// TOKEN`, which calls Parse, Check, and then proves possession of the token
// over the TLS channel it dials (Proof). The package does no I/O and keeps no
// state: the issuer's control plane stores what it needs (the ID, SecretHash,
// expiry and intended cluster) and enforces one-time use, revocation and
// supersession itself, reporting them with this package's Error reasons so
// that both sides speak of a token's fate in the same words. It must not know
// about storage, transport, gRPC or the CA; it uses only ca/identity for the
// naming rules of clusters and trust domains.
//
// # What a token carries
//
// The format version; the issuing cluster; the trust domain; 1 to 8 addresses
// of the issuer's east-west gateways (host:port, with an IPv4 or IPv6 address
// or a DNS name); the SHA-256 digest of the issuer's trust bundle, which the
// joiner pins when it first dials a gateway (there is no trust on first use);
// a 16-byte random ID; a 32-byte random one-time secret; issue and expiry
// times in Unix seconds (at most MaxTTL apart); and, optionally, the name of
// the only cluster that may redeem it. Nothing else: no Kubernetes or other
// credentials.
//
// # Wire format, version 1
//
// A token is Prefix ("strait-join-v1.") followed by the unpadded base64url
// encoding (RFC 4648 §5) of a binary payload. All integers are big-endian;
// "str8" is a one-byte length followed by that many bytes.
//
//	offset  size  field
//	0       1     version, 1 (must agree with the prefix)
//	1       1     flags: bit 0 set when the for-cluster field is present;
//	              every other bit must be zero
//	2       2     total payload length in bytes, tag included
//	4       16    token ID
//	20      32    secret
//	52      8     issued-at, Unix seconds
//	60      8     expires-at, Unix seconds
//	68      32    SHA-256 digest of the issuer's trust bundle
//	100     str8  issuer cluster name (a DNS label, ca/identity rules)
//	        str8  trust domain name
//	        1     gateway address count, 1 to 8; then each address as
//	              1 type: 1 IPv4 (4 bytes), 2 IPv6 (16 bytes), 3 DNS name (str8)
//	              then the address, then a 2-byte port (1 to 65535)
//	        str8  for-cluster name, only when flag bit 0 is set
//	end-16  16    integrity tag
//
// The tag is the first 16 bytes of HMAC-SHA256(K, Prefix || payload-before-
// tag), where K = HMAC-SHA256(key: secret, "strait-join-v1 integrity") is a
// key derived from the secret for this one purpose (the secret is uniformly
// random, so this is HKDF-Expand's single step without its counter byte).
// It makes any corruption or edit of the token (an
// address, the digest, the expiry, a truncation) fail to decode. Note what it
// is not: anyone who holds the token holds the secret, so the tag cannot
// authenticate the issuer. A token must travel from issuer to joiner over a
// channel the operator trusts, as a password would; what the tag guarantees
// is that the joiner acts on exactly the bytes the issuer printed or on none.
//
// Parse is strict: surrounding white space is trimmed (tokens are pasted),
// and nothing else is tolerated. The base64 must be canonical (no padding, no
// line breaks, zero trailing bits), so exactly one string encodes a token,
// and Parse(s).String() == strings.TrimSpace(s) for every s that parses. Names,
// addresses and times must be in their canonical, valid form; hostnames are
// lower case; IPv4 addresses are never written as IPv4-mapped IPv6 ones.
// Inputs longer than MaxLength are refused before decoding, so decoding
// allocates at most a few kilobytes whatever the input. A newer format has a
// different prefix ("strait-join-v2."), which Parse recognises and reports
// as ReasonUnsupportedVersion rather than as garbage.
//
// A typical token (three IPv4 gateway addresses and a for-cluster) is about
// 235 characters.
//
// # Errors
//
// Every error about a token is an *Error whose Reason says which problem it
// is, in a word suitable for a metric label or an audit log, and whose message
// says it in the operator's terms. errors.Is matches an *Error against the
// sentinel of its reason (ErrTampered, ErrExpired, ...), and ReasonOf extracts
// the reason. The issuer's store produces the reasons this package cannot see
// (ReasonAlreadyUsed, ReasonRevoked, ReasonSuperseded, ReasonUnknown,
// ReasonBadProof) with Errorf.
//
// # Redemption proof and channel binding
//
// The issuer never stores the secret, only
//
//	SecretHash = SHA-256("strait-join-v1 secret hash" || 0x00 || secret)
//
// The joiner dials an issuer gateway over TLS 1.3 (pinning the bundle digest)
// and reads the channel's exporter value with ChannelBinding, that is
// ExportKeyingMaterial(ExporterLabel, no context, 32) per RFC 8446 §7.5.
// Both ends of one TLS connection get the same value; no other connection
// does. The joiner then sends the token ID, its cluster name and
//
//	proof = HMAC-SHA256(key: SecretHash,
//	                    "strait-join-v1 proof" || 0x00 ||
//	                    uint32 len(exporter) || exporter ||
//	                    uint32 len(joiner) || joiner)
//
// and the issuer, which looks the ID up to find SecretHash, recomputes it
// from its own exporter value with VerifyProof (a constant-time comparison).
// A proof therefore shows that the sender knew the token and is the TLS peer
// of this very connection, under this joiner name: a proof captured or
// relayed by a man in the middle, or replayed on another connection, does not
// verify, and the joiner name cannot be swapped. One-time use is the
// store's part: it must consume the ID in the same transaction that accepts
// the proof.
//
// SecretHash is a verifier, not a public key: whoever reads it can compute
// proofs. It keeps the secret itself out of the issuer's storage, listings and
// backups, but while a token is live its stored hash must be as confidential
// as the token; it becomes worthless when the token is used, revoked or
// expires (at most MaxTTL later).
package token
