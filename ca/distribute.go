package ca

import (
	"crypto/x509"
	"fmt"

	"github.com/straitmesh/strait/ca/bundlesig"
)

// signedBundle caches the signed form of one bundle by one root.
type signedBundle struct {
	key   string // bundle sequence, digest and signing root
	token string
}

// SignedBundle returns the current trust bundle signed by the active root,
// in the form of package bundlesig, for other clusters to verify under the
// bundle they hold even when it is relayed by untrusted gateways. The active
// root is in the bundle before and after every transition that changes the
// bundle, so each signed bundle verifies against the one before it.
//
// The token is cached per bundle (sequence and digest) and signing root:
// repeated calls are cheap and return the same string until a transition.
// Activate changes the signer but not the bundle, so the bundle it leaves is
// signed again, by the new active root, at the same sequence.
func (a *Authority) SignedBundle() (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	b, root, next := a.bundle, a.st.rootIn(RootActive), a.st.rootIn(RootPrepared)
	var nextCert *x509.Certificate
	nextID := ""
	if next != nil {
		nextCert, nextID = next.cert, next.ID
	}
	key := fmt.Sprintf("%d %s %s %s", b.Sequence(), b.Digest(), root.ID, nextID)
	if a.signed.key == key {
		return a.signed.token, nil
	}
	signer, err := a.keys.signer(root.Key)
	if err != nil {
		return "", fmt.Errorf("ca: sign the trust bundle: root %s: %w", root.ID, err)
	}
	token, err := bundlesig.SignWithSuccessor(b, root.cert, signer, nextCert)
	if err != nil {
		return "", fmt.Errorf("ca: sign the trust bundle with root %s: %w", root.ID, err)
	}
	a.signed = signedBundle{key: key, token: token}
	return token, nil
}

// Intermediate returns cluster's current recorded intermediate certificate,
// wherever its key is held, expired or not, and whether there is one. After
// Activate it is the certificate re-signed under the new root: the root
// authority's control plane hands it to the cluster.
func (a *Authority) Intermediate(cluster string) (*x509.Certificate, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	im := a.st.intermediate(cluster)
	if im == nil {
		return nil, false
	}
	return im.cert, true
}

// Intermediates returns the current recorded intermediate certificate of
// every cluster whose intermediate has not expired, by cluster name.
func (a *Authority) Intermediates() map[string]*x509.Certificate {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.cfg.Clock()
	out := make(map[string]*x509.Certificate, len(a.st.Intermediates))
	for _, im := range a.st.Intermediates {
		if im.cert.NotAfter.After(now) {
			out[im.Cluster] = im.cert
		}
	}
	return out
}
