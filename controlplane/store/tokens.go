package store

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Workload registration tokens.
//
// A token proves one workload identity (namespace and service account) once,
// for a short time. Its text form is
//
//	strt1_<id>_<secret>
//
// where id is 16 random bytes and secret 32 random bytes, both base64url
// without padding (22 and 43 characters; 72 in all). The id is not secret:
// it names the record and may be logged and listed. Only sha256(secret) is
// stored, so a copy of the data file cannot be replayed.
const (
	TokenPrefix     = "strt1_"
	DefaultTokenTTL = 10 * time.Minute
	MinTokenTTL     = 10 * time.Second
	MaxTokenTTL     = time.Hour
	// TokenRetention is how long PruneTokens keeps a record after it expires,
	// so a late redemption is told "expired" rather than "invalid".
	TokenRetention = time.Hour

	tokenIDLen     = 16
	tokenSecretLen = 32
	tokenIDChars   = 22 // base64.RawURLEncoding.EncodedLen(16)
	tokenSecChars  = 43 // base64.RawURLEncoding.EncodedLen(32)
	tokenLen       = len(TokenPrefix) + tokenIDChars + 1 + tokenSecChars
)

// Token errors. None of them, nor what wraps them, contains the secret.
var (
	ErrTokenInvalid = errors.New("store: invalid registration token")
	ErrTokenExpired = errors.New("store: registration token expired")
	ErrTokenUsed    = errors.New("store: registration token already used")
)

var b64 = base64.RawURLEncoding.Strict()

// TokenRequest asks for a registration token.
type TokenRequest struct {
	// Namespace and ServiceAccount name the identity the token proves; both
	// are DNS labels and required.
	Namespace, ServiceAccount string
	// Service is the service the workload serves: informational, a DNS
	// label, optional.
	Service string
	// TTL is the token's lifetime. Zero means DefaultTokenTTL; more than
	// MaxTokenTTL is capped to it; less than MinTokenTTL is refused.
	TTL time.Duration
}

// TokenRecord is what the store knows of a token: everything but the secret.
type TokenRecord struct {
	// ID is the token's id in base64url, as in the token text.
	ID                                 string
	Namespace, ServiceAccount, Service string
	Created, Expires                   time.Time
	// UsedAt is when the token was redeemed; zero if it was not.
	UsedAt time.Time
	// Repeated is set on a redemption that repeated the first one, with
	// the same key (see RedeemTokenIf).
	Repeated bool
}

type tokenValue struct {
	Hash           []byte    `json:"hash"`
	Namespace      string    `json:"namespace"`
	ServiceAccount string    `json:"serviceAccount"`
	Service        string    `json:"service,omitempty"`
	Created        time.Time `json:"created"`
	Expires        time.Time `json:"expires"`
	UsedAt         time.Time `json:"usedAt"`
	// Key is the digest of the public key the token was redeemed for,
	// when the redeemer named one.
	Key []byte `json:"key,omitempty"`
}

func (v tokenValue) record(id []byte) TokenRecord {
	return TokenRecord{
		ID: b64.EncodeToString(id), Namespace: v.Namespace, ServiceAccount: v.ServiceAccount, Service: v.Service,
		Created: v.Created, Expires: v.Expires, UsedAt: v.UsedAt,
	}
}

func decodeToken(id, v []byte) (tokenValue, error) {
	var tv tokenValue
	if err := json.Unmarshal(v, &tv); err != nil {
		return tokenValue{}, fmt.Errorf("%w: token %s: %v", ErrCorrupt, b64.EncodeToString(id), err)
	}
	if len(tv.Hash) != sha256.Size {
		return tokenValue{}, fmt.Errorf("%w: token %s: hash is %d bytes", ErrCorrupt, b64.EncodeToString(id), len(tv.Hash))
	}
	return tv, nil
}

// FormatToken returns the text form of a token.
func FormatToken(id [16]byte, secret [32]byte) string {
	return TokenPrefix + b64.EncodeToString(id[:]) + "_" + b64.EncodeToString(secret[:])
}

// ParseToken parses the text form of a token strictly: exact prefix and
// lengths, the base64url alphabet only, no padding, canonical encoding (so
// each token has exactly one text form). Errors wrap ErrTokenInvalid and
// never repeat the input.
func ParseToken(s string) (id [16]byte, secret [32]byte, err error) {
	malformed := func(why string) error { return fmt.Errorf("%w: malformed: %s", ErrTokenInvalid, why) }
	if !strings.HasPrefix(s, TokenPrefix) {
		return id, secret, malformed("missing prefix " + TokenPrefix)
	}
	if len(s) != tokenLen {
		return id, secret, malformed(fmt.Sprintf("%d bytes, want %d", len(s), tokenLen))
	}
	body := s[len(TokenPrefix):]
	if body[tokenIDChars] != '_' {
		return id, secret, malformed("no separator after the id")
	}
	idText, secText := body[:tokenIDChars], body[tokenIDChars+1:]
	// The decoder skips CR and LF even in strict mode; refuse them (and
	// everything else outside the alphabet) first.
	for _, part := range []string{idText, secText} {
		for i := 0; i < len(part); i++ {
			if !isB64URL(part[i]) {
				return id, secret, malformed("character outside the base64url alphabet")
			}
		}
	}
	if n, err := b64.Decode(id[:], []byte(idText)); err != nil || n != tokenIDLen {
		return [16]byte{}, secret, malformed("bad id encoding")
	}
	if n, err := b64.Decode(secret[:], []byte(secText)); err != nil || n != tokenSecretLen {
		return [16]byte{}, [32]byte{}, malformed("bad secret encoding")
	}
	return id, secret, nil
}

func isB64URL(c byte) bool {
	return 'A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_'
}

// CheckTokenRequest checks the names in req as MintToken does: each a DNS
// label. The service comes first, as clients default the service account
// to it.
func CheckTokenRequest(req TokenRequest) error {
	if req.Service != "" {
		if err := checkLabel("service", req.Service); err != nil {
			return err
		}
	}
	if err := checkLabel("namespace", req.Namespace); err != nil {
		return err
	}
	return checkLabel("service account", req.ServiceAccount)
}

// MintToken creates a single-use token for req's identity. The token text is
// returned once and never stored.
func (s *Store) MintToken(req TokenRequest) (string, TokenRecord, error) {
	if err := CheckTokenRequest(req); err != nil {
		return "", TokenRecord{}, err
	}
	ttl := req.TTL
	switch {
	case ttl == 0:
		ttl = DefaultTokenTTL
	case ttl < MinTokenTTL:
		return "", TokenRecord{}, fmt.Errorf("%w: ttl %s is less than %s", ErrInvalid, ttl, MinTokenTTL)
	case ttl > MaxTokenTTL:
		ttl = MaxTokenTTL
	}
	var id [tokenIDLen]byte
	var secret [tokenSecretLen]byte
	if _, err := rand.Read(id[:]); err != nil {
		return "", TokenRecord{}, err
	}
	if _, err := rand.Read(secret[:]); err != nil {
		return "", TokenRecord{}, err
	}
	hash := sha256.Sum256(secret[:])
	now := s.clock().UTC()
	tv := tokenValue{
		Hash: hash[:], Namespace: req.Namespace, ServiceAccount: req.ServiceAccount, Service: req.Service,
		Created: now, Expires: now.Add(ttl),
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketTokens)
		if b.Get(id[:]) != nil {
			return errors.New("store: token id collision") // 2^-128; refuse rather than overwrite
		}
		v, err := json.Marshal(tv)
		if err != nil {
			return err
		}
		return b.Put(id[:], v)
	})
	if err != nil {
		return "", TokenRecord{}, fmt.Errorf("store: mint token: %w", err)
	}
	return FormatToken(id, secret), tv.record(id[:]), nil
}

// RedeemToken checks token and marks it used, in one transaction: of any
// number of concurrent redemptions of one token, exactly one succeeds
// (RedeemTokenIf with a key may repeat that one, for that key only). It
// returns the token's record, or an error wrapping ErrTokenInvalid (malformed,
// unknown, revoked or wrong secret), ErrTokenUsed or ErrTokenExpired. The
// secret is checked first, so only its holder learns whether a token was
// used or expired.
func (s *Store) RedeemToken(token string) (TokenRecord, error) {
	return s.RedeemTokenIf(token, nil, nil)
}

// RedeemTokenIf is RedeemToken, but the token is spent only if check (nil
// passes), run on its record inside the transaction once the token is
// known good, returns nil; check's error is returned as it is and nothing
// changes.
//
// key, when not nil, is a digest of the public key the token is redeemed
// for (the CSR's). It is stored with the spent token, and a later
// redemption naming the same key, before the token expires, succeeds
// again (the record has Repeated set): a redeemer whose answer was lost
// (a dropped connection, a crash before it saved its SVID) retries with
// the key it kept, while the token stays worthless to anyone without
// that key.
func (s *Store) RedeemTokenIf(token string, key []byte, check func(TokenRecord) error) (TokenRecord, error) {
	id, secret, err := ParseToken(token)
	if err != nil {
		return TokenRecord{}, err
	}
	hash := sha256.Sum256(secret[:])
	now := s.clock().UTC()
	var rec TokenRecord
	err = s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketTokens)
		v := b.Get(id[:])
		if v == nil {
			var dummy [sha256.Size]byte
			subtle.ConstantTimeCompare(hash[:], dummy[:]) // same work as a known id
			return ErrTokenInvalid
		}
		tv, err := decodeToken(id[:], v)
		if err != nil {
			return err
		}
		if subtle.ConstantTimeCompare(hash[:], tv.Hash) != 1 {
			return ErrTokenInvalid
		}
		repeat := !tv.UsedAt.IsZero() && key != nil && tv.Key != nil && subtle.ConstantTimeCompare(key, tv.Key) == 1
		if !tv.UsedAt.IsZero() && !repeat {
			return ErrTokenUsed
		}
		if !now.Before(tv.Expires) {
			return ErrTokenExpired
		}
		if check != nil {
			if err := check(tv.record(id[:])); err != nil {
				return err
			}
		}
		if repeat {
			rec = tv.record(id[:])
			rec.Repeated = true
			return nil
		}
		tv.UsedAt, tv.Key = now, key
		nv, err := json.Marshal(tv)
		if err != nil {
			return err
		}
		rec = tv.record(id[:])
		if rec.Service != "" {
			// The identity may now register instances of this service.
			if err := tx.Bucket(bucketBindings).Put(bindingKey(rec.Namespace, rec.ServiceAccount, rec.Service), []byte{1}); err != nil {
				return err
			}
		}
		return b.Put(id[:], nv)
	})
	if err != nil {
		return TokenRecord{}, fmt.Errorf("redeem token %s: %w", b64.EncodeToString(id[:]), err)
	}
	return rec, nil
}

// ListTokens returns every token record (no secrets, no hashes), oldest
// first.
func (s *Store) ListTokens() ([]TokenRecord, error) {
	var out []TokenRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketTokens).ForEach(func(k, v []byte) error {
			tv, err := decodeToken(k, v)
			if err != nil {
				return err
			}
			out = append(out, tv.record(k))
			return nil
		})
	})
	slices.SortFunc(out, func(a, b TokenRecord) int {
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, err
}

// RevokeToken deletes the token with the given id (TokenRecord.ID), so it can
// no longer be redeemed. Unknown or malformed ids give ErrNotFound.
func (s *Store) RevokeToken(id string) error {
	raw, err := b64.DecodeString(id)
	if err != nil || len(raw) != tokenIDLen || strings.ContainsAny(id, "\r\n") {
		return fmt.Errorf("%w: token id %q", ErrNotFound, trunc(id))
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketTokens)
		if b.Get(raw) == nil {
			return fmt.Errorf("%w: token %s", ErrNotFound, id)
		}
		return b.Delete(raw)
	})
}

// PruneTokens deletes the records of tokens that expired more than
// TokenRetention before now, used or not, and returns how many it deleted.
func (s *Store) PruneTokens(now time.Time) (int, error) {
	var n int
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketTokens)
		var dead [][]byte
		err := b.ForEach(func(k, v []byte) error {
			tv, err := decodeToken(k, v)
			if err != nil {
				return err
			}
			if now.Sub(tv.Expires) > TokenRetention {
				dead = append(dead, bytes.Clone(k))
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, k := range dead {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		n = len(dead)
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("store: prune tokens: %w", err)
	}
	if n > 0 {
		s.log.Info("pruned expired registration tokens", "count", n)
	}
	return n, nil
}

func bindingKey(ns, sa, service string) []byte {
	return []byte(ns + "\x00" + sa + "\x00" + service)
}

// ServiceBound reports whether the workload identity ns/sa was ever given a
// registration token for service: only then may it register instances of
// it (a workload cannot pose as an endpoint of another service).
func (s *Store) ServiceBound(ns, sa, service string) (bool, error) {
	var ok bool
	err := s.db.View(func(tx *bolt.Tx) error {
		ok = tx.Bucket(bucketBindings).Get(bindingKey(ns, sa, service)) != nil
		return nil
	})
	return ok, err
}
