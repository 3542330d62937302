package ca

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// PrepareOptions tunes Prepare.
type PrepareOptions struct {
	// TTL of the new root. Zero means the active root's lifetime.
	TTL time.Duration
}

// Prepare creates a new root in the next slot and adds it to the bundle
// (sequence+1). The active root keeps signing.
func (a *Authority) Prepare(ctx context.Context, opts PrepareOptions) (RootStatus, error) {
	var created *rootRecord
	err := a.mutate(func(st *state, now time.Time) error {
		if r := st.rootIn(RootPrepared, RootOld, RootTainted); r != nil {
			return fmt.Errorf("%w: the next slot holds root %s (%s); %s it first", ErrTransition, r.ID, r.State, nextStep(r.State))
		}
		ttl := opts.TTL
		if ttl <= 0 {
			cur := st.rootIn(RootActive).cert
			ttl = cur.NotAfter.Sub(cur.NotBefore) - caBackdate
		}
		r, err := a.newRoot(st, now, ttl, RootPrepared)
		if err != nil {
			return err
		}
		st.Roots = append(st.Roots, r)
		st.Sequence++
		created = r
		return nil
	})
	if err != nil {
		return RootStatus{}, err
	}
	a.log.Info("prepared new root", "root_id", created.ID, "bundle_sequence", a.Bundle().Sequence())
	return rootStatus(created), nil
}

func nextStep(s RootState) string {
	switch s {
	case RootPrepared:
		return "activate"
	case RootTainted:
		return "revoke"
	default:
		return "retire"
	}
}

// Activate makes the prepared root the signing root. The previous root stays
// in the bundle as old. Intermediates whose keys are held here are re-signed
// under the new root with the same key, so leaves they issued keep chaining.
// Intermediates held elsewhere must be re-signed through SignIntermediate.
func (a *Authority) Activate(ctx context.Context) error {
	var resigned []string
	var newID string
	err := a.mutate(func(st *state, now time.Time) error {
		next := st.rootIn(RootPrepared)
		if next == nil {
			return fmt.Errorf("%w: no prepared root; run prepare first", ErrTransition)
		}
		cur := st.rootIn(RootActive)
		cur.State, cur.Changed, cur.LastInUse = RootOld, now, now
		next.State, next.Changed = RootActive, now
		newID = next.ID
		for _, im := range st.Intermediates {
			// Expired intermediates stay expired; the others keep their
			// expiry (capped at the new root's).
			if im.Key == "" || im.RootID == next.ID || !im.cert.NotAfter.After(now) {
				continue
			}
			signer, err := a.keys.signer(im.Key)
			if err != nil {
				return fmt.Errorf("ca: intermediate of %s: %w", im.Cluster, err)
			}
			cert, _, err := a.signIntermediate(st, now, im.Cluster, signer.Public(), im.cert.NotAfter.Sub(now))
			if err != nil {
				return err
			}
			im.RootID, im.Cert, im.Issued, im.cert = next.ID, encodeCertPEM(cert), now, cert
			resigned = append(resigned, im.Cluster)
		}
		return nil
	})
	if err != nil {
		return err
	}
	a.log.Info("activated root", "root_id", newID, "resigned_intermediates", resigned)
	return nil
}

// RetireOptions tunes Retire.
type RetireOptions struct {
	// Force retires even while recorded intermediates still chain to the
	// old root (their clusters will fail verification elsewhere).
	Force bool
}

// Retire removes the old root from the bundle (sequence+1) once no recorded,
// unexpired intermediate chains to it, and deletes its key.
func (a *Authority) Retire(ctx context.Context, opts RetireOptions) error {
	var old rootRecord
	err := a.mutate(func(st *state, now time.Time) error {
		r := st.rootIn(RootOld)
		if r == nil {
			if t := st.rootIn(RootTainted); t != nil {
				return fmt.Errorf("%w: root %s is tainted; revoke it instead", ErrTransition, t.ID)
			}
			return fmt.Errorf("%w: no old root to retire (activate a prepared root first)", ErrTransition)
		}
		if pending := st.chainingTo(r.ID, now); len(pending) > 0 && !opts.Force {
			return fmt.Errorf("%w: intermediates of %s still chain to root %s; re-sign them under the active root or pass --force", ErrTransition, strings.Join(pending, ", "), r.ID)
		}
		if until := r.retirableAt(); now.Before(until) && !opts.Force {
			return fmt.Errorf("%w: SVIDs issued with a chain to root %s may be in use until %s (%s after it last signed); retire then, or pass --force", ErrTransition, r.ID, until.UTC().Format(time.RFC3339), MaxSVIDTTL)
		}
		old = *r
		r.State, r.Changed, r.Key = RootRetired, now, ""
		st.Sequence++
		return nil
	})
	if err != nil {
		return err
	}
	a.destroyKey(old.Key)
	a.log.Info("retired root", "root_id", old.ID, "bundle_sequence", a.Bundle().Sequence())
	return nil
}

// retirableAt is when every leaf issued under a chain to r has expired.
func (r *rootRecord) retirableAt() time.Time {
	if r.LastInUse.IsZero() {
		return time.Time{}
	}
	return r.LastInUse.Add(MaxSVIDTTL)
}

func (st *state) chainingTo(rootID string, now time.Time) []string {
	var out []string
	for _, im := range st.Intermediates {
		if im.RootID == rootID && im.cert.NotAfter.After(now) {
			out = append(out, im.Cluster)
		}
	}
	return out
}

// Taint marks a root that is not active as compromised. It stays in the
// bundle (so nothing breaks yet) until Revoke; everything under it must be
// re-issued. An active root cannot be tainted: prepare and activate a
// replacement first.
func (a *Authority) Taint(ctx context.Context, rootID string) error {
	err := a.mutate(func(st *state, now time.Time) error {
		r := st.root(rootID)
		switch {
		case r == nil:
			return fmt.Errorf("%w: no root %q", ErrTransition, rootID)
		case r.State == RootActive:
			return fmt.Errorf("%w: root %s is active; prepare and activate a new root, then taint %s", ErrTransition, r.ID, r.ID)
		case r.State != RootOld && r.State != RootPrepared:
			return fmt.Errorf("%w: root %s is %s; only an old or prepared root can be tainted", ErrTransition, r.ID, r.State)
		}
		r.State, r.Changed = RootTainted, now
		return nil
	})
	if err == nil {
		a.log.Warn("tainted root", "root_id", rootID)
	}
	return err
}

// Revoke removes a tainted root from the bundle at once (sequence+1) and
// deletes its key. Verifiers reading the new bundle refuse everything that
// chains to it, on open connections' next handshake and on new ones.
func (a *Authority) Revoke(ctx context.Context, rootID string) error {
	var old rootRecord
	err := a.mutate(func(st *state, now time.Time) error {
		r := st.root(rootID)
		switch {
		case r == nil:
			return fmt.Errorf("%w: no root %q", ErrTransition, rootID)
		case r.State != RootTainted:
			return fmt.Errorf("%w: root %s is %s; taint it before revoking", ErrTransition, r.ID, r.State)
		}
		old = *r
		r.State, r.Changed, r.Key = RootRevoked, now, ""
		st.Sequence++
		return nil
	})
	if err != nil {
		return err
	}
	a.destroyKey(old.Key)
	a.log.Warn("revoked root", "root_id", rootID, "bundle_sequence", a.Bundle().Sequence())
	return nil
}
