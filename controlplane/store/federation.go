package store

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Federation state: join tokens this cluster minted, its links to peer
// clusters, and an audit log of joins and link changes.
//
// Join tokens are not workload registration tokens: their text form and
// checks live in federation/token; the store keeps only what redemption
// needs (never the secret, only its hash) and makes redemption one
// transaction, so of concurrent redemptions of one token exactly one wins.

// Join token errors; RedeemJoinToken wraps exactly one of them.
var (
	ErrJoinTokenUnknown    = errors.New("join token unknown to this cluster")
	ErrJoinTokenUsed       = errors.New("join token already used")
	ErrJoinTokenRevoked    = errors.New("join token revoked")
	ErrJoinTokenSuperseded = errors.New("join token superseded by a newer one for the same cluster")
	ErrJoinTokenExpired    = errors.New("join token expired")
	// ErrLinkExists means the joiner is already linked to this cluster.
	ErrLinkExists = errors.New("clusters already linked")
)

// JoinTokenRecord is a minted join token. SecretHash is what proofs are
// checked against; it is never listed by the API.
type JoinTokenRecord struct {
	ID           string    `json:"id"`
	SecretHash   []byte    `json:"secretHash"`
	ForCluster   string    `json:"forCluster,omitempty"`
	BundleDigest string    `json:"bundleDigest,omitempty"`
	Created      time.Time `json:"created"`
	Expires      time.Time `json:"expires"`
	UsedAt       time.Time `json:"usedAt,omitzero"`
	UsedBy       string    `json:"usedBy,omitempty"`
	RevokedAt    time.Time `json:"revokedAt,omitzero"`
	SupersededAt time.Time `json:"supersededAt,omitzero"`
}

// State is "used", "revoked", "superseded", "expired" or "unused" at now.
func (r JoinTokenRecord) State(now time.Time) string {
	switch {
	case !r.UsedAt.IsZero():
		return "used"
	case !r.RevokedAt.IsZero():
		return "revoked"
	case !r.SupersededAt.IsZero():
		return "superseded"
	case !now.Before(r.Expires):
		return "expired"
	}
	return "unused"
}

func (r JoinTokenRecord) stateErr(now time.Time) error {
	switch r.State(now) {
	case "used":
		return fmt.Errorf("%w (by %s at %s)", ErrJoinTokenUsed, r.UsedBy, r.UsedAt.UTC().Format(time.RFC3339))
	case "revoked":
		return ErrJoinTokenRevoked
	case "superseded":
		return ErrJoinTokenSuperseded
	case "expired":
		return fmt.Errorf("%w at %s", ErrJoinTokenExpired, r.Expires.UTC().Format(time.RFC3339))
	}
	return nil
}

// Link is this cluster's durable record of a link to a peer.
type Link struct {
	ID           string    `json:"id"`
	Peer         string    `json:"peer"`
	PeerGateways []string  `json:"peerGateways"`
	Role         string    `json:"role"` // "issuer" or "joiner"
	Created      time.Time `json:"created"`
}

// AuditEvent is one entry of the federation audit log.
type AuditEvent struct {
	Time    time.Time `json:"time"`
	Event   string    `json:"event"` // "token-created", "token-revoked", "join", "join-refused", "link-removed", ...
	TokenID string    `json:"tokenId,omitempty"`
	Peer    string    `json:"peer,omitempty"`
	Remote  string    `json:"remote,omitempty"`
	Detail  string    `json:"detail,omitempty"`
	// Changes counts the address changes a link-addresses entry stands for.
	Changes int `json:"changes,omitempty"`
}

// PutJoinToken stores a newly minted token. An unused token for the same
// ForCluster is superseded by it: only the latest token for a cluster works.
func (s *Store) PutJoinToken(rec JoinTokenRecord) error {
	if rec.ID == "" || len(rec.ID) > 64 || len(rec.SecretHash) != sha256.Size || rec.Expires.IsZero() {
		return fmt.Errorf("%w: join token record incomplete", ErrInvalid)
	}
	now := s.clock().UTC()
	return s.mutate(func(tx *bolt.Tx) (bool, error) {
		b := tx.Bucket(bucketJoin)
		if b.Get([]byte(rec.ID)) != nil {
			return false, fmt.Errorf("%w: join token %s exists", ErrInvalid, rec.ID)
		}
		if rec.ForCluster != "" {
			err := b.ForEach(func(k, v []byte) error {
				old, err := decodeJoin(k, v)
				if err != nil {
					return err
				}
				if old.ForCluster != rec.ForCluster || old.State(now) != "unused" {
					return nil
				}
				old.SupersededAt = now
				return putJSON(b, k, old)
			})
			if err != nil {
				return false, err
			}
		}
		if err := putJSON(b, []byte(rec.ID), rec); err != nil {
			return false, err
		}
		return false, appendAudit(tx, AuditEvent{Time: now, Event: "token-created", TokenID: rec.ID, Peer: rec.ForCluster})
	})
}

func decodeJoin(k, v []byte) (JoinTokenRecord, error) {
	var r JoinTokenRecord
	if err := json.Unmarshal(v, &r); err != nil {
		return r, fmt.Errorf("%w: join token %s: %v", ErrCorrupt, trunc(string(k)), err)
	}
	if len(r.SecretHash) != sha256.Size {
		return r, fmt.Errorf("%w: join token %s: hash is %d bytes", ErrCorrupt, trunc(string(k)), len(r.SecretHash))
	}
	return r, nil
}

func putJSON(b *bolt.Bucket, k []byte, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(k, data)
}

// JoinTokens lists every join token, oldest first.
func (s *Store) JoinTokens() ([]JoinTokenRecord, error) {
	var out []JoinTokenRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketJoin).ForEach(func(k, v []byte) error {
			r, err := decodeJoin(k, v)
			out = append(out, r)
			return err
		})
	})
	slices.SortFunc(out, func(a, b JoinTokenRecord) int {
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, err
}

// RevokeJoinToken revokes an unused token. Revoking a used token is refused
// (remove the link instead); revoking twice is harmless.
func (s *Store) RevokeJoinToken(id string) error {
	now := s.clock().UTC()
	return s.mutate(func(tx *bolt.Tx) (bool, error) {
		b := tx.Bucket(bucketJoin)
		v := b.Get([]byte(id))
		if v == nil {
			return false, fmt.Errorf("%w: join token %q", ErrNotFound, trunc(id))
		}
		r, err := decodeJoin([]byte(id), v)
		if err != nil {
			return false, err
		}
		if !r.UsedAt.IsZero() {
			return false, fmt.Errorf("%w: join token %s was already used by %s; remove the link instead", ErrInvalid, id, r.UsedBy)
		}
		if !r.RevokedAt.IsZero() {
			return false, nil
		}
		r.RevokedAt = now
		if err := putJSON(b, []byte(id), r); err != nil {
			return false, err
		}
		return false, appendAudit(tx, AuditEvent{Time: now, Event: "token-revoked", TokenID: id})
	})
}

// Redemption is one attempt to redeem a join token.
type Redemption struct {
	TokenID string
	Joiner  string // the joining cluster's name
	Remote  string // where the attempt came from, for the audit log
	// Proof verifies that the caller holds the token's secret; it runs
	// inside the transaction, first, so that a token's state is told only
	// to its holder.
	Proof func(JoinTokenRecord) error
	// Check verifies anything else about the token (for whom it is); it
	// runs inside the transaction, after the state checks and the check
	// that the joiner is not linked already.
	Check func(JoinTokenRecord) error
	// Link is stored if the redemption succeeds.
	Link Link
}

// RedeemJoinToken checks and consumes a join token and stores the link, in
// one transaction. Every attempt, refused or not, is audit-logged.
func (s *Store) RedeemJoinToken(r Redemption) (JoinTokenRecord, error) {
	now := s.clock().UTC()
	var rec JoinTokenRecord
	var refused error
	_, err := s.update(func(tx *bolt.Tx) (bool, error) {
		refused = nil
		b := tx.Bucket(bucketJoin)
		v := b.Get([]byte(r.TokenID))
		if v == nil {
			refused = ErrJoinTokenUnknown
		} else if rec, refused = decodeJoin([]byte(r.TokenID), v); refused == nil {
			if r.Proof != nil {
				refused = r.Proof(rec)
			}
			if refused == nil {
				refused = rec.stateErr(now)
			}
			// The link before Check: Check may sign an intermediate, which
			// must not happen for a redemption refused anyway.
			if refused == nil && tx.Bucket(bucketLinks).Get([]byte(r.Joiner)) != nil {
				refused = fmt.Errorf("%w: %s already has a link with this cluster (remove it first)", ErrLinkExists, r.Joiner)
			}
			if refused == nil && r.Check != nil {
				refused = r.Check(rec)
			}
		}
		if refused != nil {
			return false, appendAudit(tx, AuditEvent{Time: now, Event: "join-refused", TokenID: r.TokenID, Peer: r.Joiner, Remote: r.Remote, Detail: refused.Error()})
		}
		rec.UsedAt, rec.UsedBy = now, r.Joiner
		if err := putJSON(b, []byte(r.TokenID), rec); err != nil {
			return false, err
		}
		if err := putLink(tx, r.Link); err != nil {
			return false, err
		}
		return true, appendAudit(tx, AuditEvent{Time: now, Event: "join", TokenID: r.TokenID, Peer: r.Joiner, Remote: r.Remote})
	})
	if err != nil {
		return JoinTokenRecord{}, err
	}
	if refused != nil {
		return rec, refused
	}
	return rec, nil
}

// AuditJoinRefusal records a redemption attempt refused before
// RedeemJoinToken was asked (a request that is not well-formed): every
// attempt, refused or not, is in the audit log. The fields come from an
// unauthenticated caller and are cut short.
func (s *Store) AuditJoinRefusal(r Redemption, refused error) error {
	now := s.clock().UTC()
	detail := truncTo(refused.Error(), maxAuditDetail)
	return s.mutate(func(tx *bolt.Tx) (bool, error) {
		return false, appendAudit(tx, AuditEvent{Time: now, Event: "join-refused", TokenID: trunc(r.TokenID), Peer: trunc(r.Joiner), Remote: trunc(r.Remote), Detail: detail})
	})
}

// maxAuditDetail bounds the detail of an audited refusal.
const maxAuditDetail = 512

func putLink(tx *bolt.Tx, l Link) error {
	if l.Peer == "" || l.ID == "" {
		return fmt.Errorf("%w: link needs a peer and an id", ErrInvalid)
	}
	return putJSON(tx.Bucket(bucketLinks), []byte(l.Peer), l)
}

// PutLink stores (or replaces) the link to l.Peer.
func (s *Store) PutLink(l Link) error {
	now := s.clock().UTC()
	_, err := s.update(func(tx *bolt.Tx) (bool, error) {
		if err := putLink(tx, l); err != nil {
			return false, err
		}
		return true, appendAudit(tx, AuditEvent{Time: now, Event: "link-stored", Peer: l.Peer, Detail: l.Role})
	})
	return err
}

// UpdateLinkGateways stores the gateway addresses peer announced in its
// link, if there is one (reporting whether it changed anything). The
// addresses come from the peer: an announcement of the addresses stored
// (in any order) is not audited, and the changes one peer announces
// within linkAddrsWindow of its last audited one update that entry
// instead of adding another, so that a peer announcing changes over and
// over cannot push the record of tokens, joins and links out of the log.
func (s *Store) UpdateLinkGateways(peer string, addrs []string) (bool, error) {
	now := s.clock().UTC()
	changed := false
	err := s.mutate(func(tx *bolt.Tx) (bool, error) {
		changed = false
		v := tx.Bucket(bucketLinks).Get([]byte(peer))
		if v == nil {
			return false, nil // unlinked meanwhile
		}
		var l Link
		if err := json.Unmarshal(v, &l); err != nil {
			return false, fmt.Errorf("%w: link %s: %v", ErrCorrupt, trunc(peer), err)
		}
		if slices.Equal(l.PeerGateways, addrs) {
			return false, nil
		}
		same := sameSet(l.PeerGateways, addrs)
		l.PeerGateways = slices.Clone(addrs)
		if err := putLink(tx, l); err != nil {
			return false, err
		}
		changed = true
		if same {
			return true, nil // reordered only: nothing worth a record
		}
		return true, auditLinkAddrs(tx, now, peer, addrs)
	})
	return changed, err
}

// sameSet reports whether a and b hold the same strings, in any order.
func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}

// A peer's address changes are audited at most once per linkAddrsWindow:
// later ones within it update that entry, if it is among the latest
// linkAddrsLookback entries (else others have been recorded since, and a
// new entry is added).
const (
	linkAddrsWindow   = time.Hour
	linkAddrsLookback = 64
	linkAddrsEvent    = "link-addresses"
)

func auditLinkAddrs(tx *bolt.Tx, now time.Time, peer string, addrs []string) error {
	list := truncTo(strings.Join(addrs, ","), maxAuditDetail/2)
	b := tx.Bucket(bucketAudit)
	c := b.Cursor()
	n := 0
	for k, v := c.Last(); k != nil && n < linkAddrsLookback; k, v = c.Prev() {
		n++
		var e AuditEvent
		if json.Unmarshal(v, &e) != nil || e.Event != linkAddrsEvent || e.Peer != peer {
			continue
		}
		if now.Sub(e.Time) >= linkAddrsWindow || now.Before(e.Time) {
			break
		}
		// Coalesce: the entry keeps its time (the first change of the
		// window) and says how many followed and what the addresses are now.
		e.Changes++
		e.Detail = fmt.Sprintf("%d changes since %s, the last at %s: %s", e.Changes, e.Time.Format(time.RFC3339), now.Format(time.RFC3339), list)
		return putJSON(b, k, e)
	}
	return appendAudit(tx, AuditEvent{Time: now, Event: linkAddrsEvent, Peer: peer, Detail: list, Changes: 1})
}

// DeleteLink removes the link to peer.
func (s *Store) DeleteLink(peer string) error {
	now := s.clock().UTC()
	_, err := s.update(func(tx *bolt.Tx) (bool, error) {
		b := tx.Bucket(bucketLinks)
		if b.Get([]byte(peer)) == nil {
			return false, fmt.Errorf("%w: no link to %q", ErrNotFound, trunc(peer))
		}
		if err := b.Delete([]byte(peer)); err != nil {
			return false, err
		}
		return true, appendAudit(tx, AuditEvent{Time: now, Event: "link-removed", Peer: peer})
	})
	return err
}

// Links returns every link, by peer name.
func (s *Store) Links() ([]Link, error) {
	var out []Link
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketLinks).ForEach(func(k, v []byte) error {
			var l Link
			if err := json.Unmarshal(v, &l); err != nil {
				return fmt.Errorf("%w: link %s: %v", ErrCorrupt, trunc(string(k)), err)
			}
			out = append(out, l)
			return nil
		})
	})
	return out, err
}

// maxAudit bounds the audit log; the oldest entries go first. Refused
// redemptions are kept apart, under maxRefusals: anyone who reaches the
// join port can make them, and they must not push the record of what did
// happen (tokens, joins, links) out of the log.
const (
	maxAudit    = 10000
	maxRefusals = 1000
)

func appendAudit(tx *bolt.Tx, e AuditEvent) error {
	b, max := tx.Bucket(bucketAudit), uint64(maxAudit)
	if e.Event == "join-refused" {
		b, max = tx.Bucket(bucketRefusals), maxRefusals
	}
	seq, err := b.NextSequence()
	if err != nil {
		return err
	}
	if err := putJSON(b, u64(seq), e); err != nil {
		return err
	}
	if seq > max {
		return b.Delete(u64(seq - max))
	}
	return nil
}

// AuditLog returns up to limit of the latest audit events, oldest first.
func (s *Store) AuditLog(limit int) ([]AuditEvent, error) {
	var out []AuditEvent
	err := s.db.View(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketAudit, bucketRefusals} {
			var latest []AuditEvent
			c := tx.Bucket(name).Cursor()
			for k, v := c.Last(); k != nil && len(latest) < limit; k, v = c.Prev() {
				var e AuditEvent
				if err := json.Unmarshal(v, &e); err != nil {
					return fmt.Errorf("%w: %s %d: %v", ErrCorrupt, name, binary.BigEndian.Uint64(k), err)
				}
				latest = append(latest, e)
			}
			slices.Reverse(latest)
			out = append(out, latest...)
		}
		return nil
	})
	// Merge the two by time (each is in order already), keep the latest.
	slices.SortStableFunc(out, func(a, b AuditEvent) int { return a.Time.Compare(b.Time) })
	return out[max(0, len(out)-limit):], err
}
