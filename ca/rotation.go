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
// in the bundle as old. Every recorded, unexpired intermediate is re-signed
// under the new root with the same public key, for the same cluster and with
// the same expiry (capped at the new root's), so leaves it issued keep
// chaining: those whose keys are held here and those of clusters that sent a
// CSR alike. Re-signing needs only the public key, taken from the
// intermediate's current certificate (the cluster proved possession of the
// key when it was first signed). Clusters held elsewhere fetch their new
// certificate through Intermediate.
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
			if im.RootID == next.ID || !im.cert.NotAfter.After(now) {
				continue
			}
			cert, _, err := a.signIntermediate(st, now, im.Cluster, im.cert.PublicKey, im.cert.NotAfter.Sub(now))
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
	// old root (their clusters will fail verification elsewhere), and
	// before leaves issued under it may have expired.
	Force bool
	// Acknowledged says the caller has checked that every node of every
	// cluster presents a chain to the active root (the root authority's
	// control plane does, from the clusters' rotation reports). It skips the
	// wait for leaves issued under the old root to expire, but not the
	// refusal while recorded intermediates still chain to it.
	Acknowledged bool
}

// Retire removes the old root from the bundle (sequence+1) and deletes its
// key, once no recorded, unexpired intermediate chains to it and every leaf
// issued under it has expired (LastInUse + MaxSVIDTTL) or the caller
// acknowledged that no node presents one any more.
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
		if until := r.retirableAt(); now.Before(until) && !opts.Force && !opts.Acknowledged {
			return fmt.Errorf("%w: SVIDs issued with a chain to root %s may be in use until %s (%s after it last signed); retire then, or run 'strait ca rotate retire' through the root authority's control plane, which checks that every node of every cluster acknowledged the active root, or pass --force", ErrTransition, r.ID, until.UTC().Format(time.RFC3339), MaxSVIDTTL)
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
	a.log.Info("retired root", "root_id", old.ID, "bundle_sequence", a.Bundle().Sequence(), "acknowledged", opts.Acknowledged, "forced", opts.Force)
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
