// Package ca is Strait's certificate authority: the mesh root (the root
// authority cluster holds it), one intermediate per cluster, and short-lived
// X.509-SVIDs for workloads and components.
//
// Issuance is built on smallstep: certificates are described with
// go.step.sm/crypto/x509util templates and signed through the soft CAS of
// github.com/smallstep/certificates (cas/softcas); keys are created and loaded
// through the smallstep KMS abstraction (go.step.sm/crypto/kms), by default as
// 0600 PEM files in the data directory. Identities, bundles and verification
// are go-spiffe types (see the identity, bundle and svid subpackages).
//
// The Authority keeps its state in a data directory and moves the mesh root
// through a SPIRE-style state machine with two slots (current and next):
//
//	prepare   a new root enters the next slot and the bundle (sequence+1)
//	activate  the prepared root becomes current; the previous root stays in
//	          the bundle as "old"; every recorded intermediate is re-signed
//	          (same key, same expiry), including those of remote clusters
//	retire    the old root leaves the bundle (sequence+1) once nothing
//	          recorded still chains to it and its leaves have expired (or
//	          every node acknowledged the active root)
//	taint     an old root is marked compromised: everything under it must be
//	          re-issued, and it may then be revoked
//	revoke    a tainted root leaves the bundle at once (sequence+1)
//
// The root authority's control plane distributes the bundle signed by the
// active root (SignedBundle; see package bundlesig for the format and how
// receivers verify it) and each cluster's re-signed intermediate
// (Intermediate, Intermediates).
//
// Every transition is written crash-safely (new key files first, then one
// atomic rename of state.json), so a kill at any instant leaves the previous
// or the next state, never a torn one.
//
// This package must not know about transport, the control plane or
// Kubernetes: callers hand it CSRs and identities they have already proved.
package ca
