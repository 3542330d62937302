package ca

import (
	"crypto/x509"
	"time"

	"go.step.sm/crypto/x509util"
)

// Status is a snapshot of the authority for operators (strait ca status).
type Status struct {
	TrustDomain   string               `json:"trust_domain"`
	Bundle        BundleStatus         `json:"bundle"`
	Roots         []RootStatus         `json:"roots"`
	Intermediates []IntermediateStatus `json:"intermediates"`
}

// BundleStatus describes the current trust bundle.
type BundleStatus struct {
	Sequence uint64   `json:"sequence"`
	Digest   string   `json:"digest"`
	Roots    []string `json:"root_ids"`
}

// RootStatus describes one root.
type RootStatus struct {
	ID          string    `json:"id"`
	State       RootState `json:"state"`
	InBundle    bool      `json:"in_bundle"`
	Subject     string    `json:"subject"`
	Fingerprint string    `json:"sha256_fingerprint"`
	NotBefore   time.Time `json:"not_before"`
	NotAfter    time.Time `json:"not_after"`
	Key         string    `json:"key"`
	Changed     time.Time `json:"changed"`
	// RetireAfter is when an old root's leaves have all expired.
	RetireAfter *time.Time `json:"retire_after,omitempty"`
}

// IntermediateStatus describes one cluster's current intermediate.
type IntermediateStatus struct {
	Cluster     string    `json:"cluster"`
	RootID      string    `json:"root_id"`
	State       string    `json:"state"` // valid, expired, or chains-to-<root state>
	Serial      string    `json:"serial"`
	Fingerprint string    `json:"sha256_fingerprint"`
	NotBefore   time.Time `json:"not_before"`
	NotAfter    time.Time `json:"not_after"`
	KeyHeldHere bool      `json:"key_held_here"`
}

// Status returns a snapshot of roots, bundle and intermediates.
func (a *Authority) Status() Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.cfg.Clock()
	s := Status{TrustDomain: a.st.TrustDomain, Bundle: BundleStatus{Sequence: a.bundle.Sequence(), Digest: a.bundle.Digest()}}
	for _, r := range a.st.Roots {
		s.Roots = append(s.Roots, rootStatus(r))
		if r.State.inBundle() {
			s.Bundle.Roots = append(s.Bundle.Roots, r.ID)
		}
	}
	for _, im := range a.st.Intermediates {
		state := "valid"
		switch root := a.st.root(im.RootID); {
		case now.After(im.cert.NotAfter):
			state = "expired"
		case root == nil:
			state = "chains-to-unknown-root"
		case root.State != RootActive:
			state = "chains-to-" + string(root.State) + "-root"
		}
		s.Intermediates = append(s.Intermediates, IntermediateStatus{
			Cluster: im.Cluster, RootID: im.RootID, State: state,
			Serial: im.cert.SerialNumber.Text(16), Fingerprint: fingerprint(im.cert),
			NotBefore: im.cert.NotBefore, NotAfter: im.cert.NotAfter, KeyHeldHere: im.Key != "",
		})
	}
	return s
}

func rootStatus(r *rootRecord) RootStatus {
	s := RootStatus{
		ID: r.ID, State: r.State, InBundle: r.State.inBundle(), Subject: r.cert.Subject.String(),
		Fingerprint: fingerprint(r.cert), NotBefore: r.cert.NotBefore, NotAfter: r.cert.NotAfter,
		Key: r.Key, Changed: r.Changed,
	}
	if r.State == RootOld {
		t := r.retirableAt()
		s.RetireAfter = &t
	}
	return s
}

func fingerprint(c *x509.Certificate) string { return x509util.Fingerprint(c) }
