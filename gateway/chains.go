package gateway

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"sync"
)

// chainTable shares one parsed copy of each certificate chain among the
// entry connections that presented it. A connection keeps its chain for as
// long as it is open, to judge it again when trust changes; a sidecar
// presents the same SVID on all its connections, and each parsed chain
// (with the handshake message its certificates point into) is about 7 KiB,
// a third of what a held tunnel costs the entry gateway.
type chainTable struct {
	mu sync.Mutex
	m  map[[sha256.Size]byte]*sharedChain
}

type sharedChain struct {
	chain []*x509.Certificate
	refs  int
}

// acquire returns the shared copy of chain, the same certificates, and a
// function to call once the connection no longer needs it.
func (t *chainTable) acquire(chain []*x509.Certificate) ([]*x509.Certificate, func()) {
	h := sha256.New()
	var n [4]byte
	for _, c := range chain {
		binary.BigEndian.PutUint32(n[:], uint32(len(c.Raw)))
		h.Write(n[:])
		h.Write(c.Raw)
	}
	var k [sha256.Size]byte
	h.Sum(k[:0])
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m = map[[sha256.Size]byte]*sharedChain{}
	}
	s := t.m[k]
	if s == nil {
		s = &sharedChain{chain: chain}
		t.m[k] = s
	}
	s.refs++
	var once sync.Once
	return s.chain, func() {
		once.Do(func() {
			t.mu.Lock()
			defer t.mu.Unlock()
			if s.refs--; s.refs == 0 {
				delete(t.m, k)
			}
		})
	}
}
