package gateway

import (
	"crypto/tls"
	"crypto/x509"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/straitmesh/strait/ca/svid"
	"github.com/straitmesh/strait/gateway/tunnel"
)

// A root rotation moves every gateway to an SVID under the new root, and
// retire then closes every peer connection whose chains were presented
// under the old one (Recheck), with every stream on it. So that streams
// opened once the gateways moved survive retire, a dialed connection on
// which either side presented a chain the gateways have since moved on
// from is superseded: new streams go to a connection dialed again with
// the current credentials, and the old one is closed once the streams it
// carries end.
const (
	// replaceEvery bounds how often a superseded connection to one peer
	// is replaced (the peer may not have moved yet: the next dial then
	// gets its old chain again).
	replaceEvery = time.Second
	// maxDraining bounds the superseded connections to one peer kept open
	// for their streams (the peer accepts MaxConnsPerPeer at once).
	maxDraining = 2
)

// ownState is what this gateway presents now: the issuer of its SVID and
// the root that SVID chains to, by fingerprint.
type ownState struct {
	cert   *tls.Certificate
	issuer string
	root   string
}

// own returns the gateway's ownState, computed again when its SVID changed.
func (g *Gateway) own() *ownState {
	cert, err := g.cfg.Credentials.Certificate()
	if err != nil || cert == nil {
		return &ownState{}
	}
	return g.stateOf(cert)
}

// stateOf is the ownState of cert, an SVID this gateway holds or held
// (kept for the last one asked).
func (g *Gateway) stateOf(cert *tls.Certificate) *ownState {
	if cur := g.ownCache.Load(); cur != nil && cur.cert == cert {
		return cur
	}
	st := &ownState{cert: cert}
	chain := make([]*x509.Certificate, 0, len(cert.Certificate))
	for _, der := range cert.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return st
		}
		chain = append(chain, c)
	}
	st.issuer = svid.IssuerFingerprint(chain)
	st.root = g.rootOf(chain, svid.RoleClient)
	g.ownCache.Store(st)
	return st
}

// rootOf is the fingerprint of the root in the current bundle that chain
// verifies to, or "".
func (g *Gateway) rootOf(chain []*x509.Certificate, role svid.Role) string {
	_, chains, err := g.cfg.Credentials.Verifier().Verify(chain, role)
	if err != nil || len(chains) == 0 || len(chains[0]) == 0 {
		return ""
	}
	return svid.Fingerprint(chains[0][len(chains[0])-1])
}

// supersededBy says whether new streams to pc's peer should go to a
// connection dialed again: this gateway presented another SVID's issuer
// on it than it holds now, or the peer's chain on it is under another
// root than this gateway's SVID.
func (pc *peerConn) supersededBy(own *ownState) bool {
	if own.issuer == "" || pc.ownIssuer == "" {
		return false
	}
	return pc.ownIssuer != own.issuer || (own.root != "" && pc.peerRoot != "" && pc.peerRoot != own.root)
}

// retireLocked takes pc out of s for new streams if it is superseded and
// may be replaced now; it returns a connection to close (one with no
// stream left). The caller holds g.mu.
func (g *Gateway) retireLocked(s *dialSlot, own *ownState) *peerConn {
	pc := s.conn
	if pc == nil || !pc.supersededBy(own) || g.now().Sub(s.replaced) < replaceEvery {
		return nil
	}
	live := s.draining[:0]
	for _, d := range s.draining {
		if !d.dead() {
			live = append(live, d)
		}
	}
	s.draining = live
	if len(s.draining) >= maxDraining {
		return nil
	}
	s.conn, s.replaced = nil, g.now()
	pc.draining = true
	if pc.streams == 0 {
		return pc
	}
	s.draining = append(s.draining, pc)
	return nil
}

// releaseStream is called when a stream opened on pc ends.
func (g *Gateway) releaseStream(pc *peerConn) {
	g.mu.Lock()
	pc.streams--
	closeIt := pc.draining && pc.streams == 0
	g.mu.Unlock()
	if closeIt {
		closeSuperseded(pc)
	}
}

func closeSuperseded(pc *peerConn) {
	pc.conn.CloseWithError(quic.ApplicationErrorCode(tunnel.CloseNoError), "superseded by a connection with current credentials")
}
