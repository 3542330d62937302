package proxy

import (
	"crypto/tls"
	"encoding/hex"
	"slices"
	"sync"
	"sync/atomic"
)

// sessionCapacity bounds the TLS sessions a sidecar keeps for resumption:
// one per upstream endpoint and protocol it talked to recently, each a few
// KiB (the ticket and the peer's parsed chain). Past it, the least recently
// used go: a full handshake, nothing worse.
const sessionCapacity = 256

// instancesPerEndpoint bounds the instances behind a gateway a sidecar
// keeps a session with for one endpoint (see endpointSessions.instance):
// past it the one tagged longest ago goes, so that one endpoint (a large
// service, or a peer gateway tagging every reply anew) cannot push every
// other endpoint's session out of the cache.
const instancesPerEndpoint = 16

// sessionCache holds the TLS 1.3 session tickets of the sidecar's outbound
// connections to other sidecars, so that a connection dialled again (after
// the pools' idle timeout, say) resumes instead of doing a full handshake:
// no certificates sent, no signatures made or checked, and still a fresh
// key exchange (Go resumes with psk_dhe_ke only). Each side's
// VerifyConnection still runs on a resumed connection, on the chains of
// the first handshake, against the current bundle and policy: resumption
// changes what is sent, not what is authorized.
//
// A session holds the SVID this sidecar presented when it was made, so the
// cache starts a new generation whenever the SVID or the bundle changes,
// and a session from a handshake that began in an older generation is not
// kept (see bound): a resumed connection presents the same chain a full
// handshake would.
type sessionCache struct {
	cur atomic.Pointer[generation]
}

// generation is the cache between two changes of SVID or bundle.
type generation struct {
	tls.ClientSessionCache
	n uint64

	mu        sync.Mutex
	instances map[string][]string // endpoint key -> instance tags kept, oldest first
}

func newGeneration(n uint64) *generation {
	return &generation{ClientSessionCache: tls.NewLRUClientSessionCache(sessionCapacity), n: n, instances: map[string][]string{}}
}

// keep notes that key's endpoint has a session with instance, and forgets
// the session of the instance tagged longest ago past instancesPerEndpoint.
func (g *generation) keep(key, instance string) {
	g.mu.Lock()
	tags := slices.DeleteFunc(g.instances[key], func(t string) bool { return t == instance })
	tags = append(tags, instance)
	var old string
	if len(tags) > instancesPerEndpoint {
		old, tags = tags[0], tags[1:]
	}
	g.instances[key] = tags
	g.mu.Unlock()
	if old != "" {
		g.forget(slotKey(key, old))
	}
}

// forget removes slot's session, if it has one. (crypto/tls's LRU cache
// stores an empty entry when told to remove a key it does not hold,
// taking a place another session could have.)
func (g *generation) forget(slot string) {
	if _, ok := g.Get(slot); ok {
		g.Put(slot, nil)
	}
}

func (s *sessionCache) load() *generation {
	for {
		if g := s.cur.Load(); g != nil {
			return g
		}
		s.cur.CompareAndSwap(nil, newGeneration(1))
	}
}

// reset forgets every session. Credentials call it after installing the
// new SVID or bundle.
func (s *sessionCache) reset() {
	for {
		old := s.load()
		if s.cur.CompareAndSwap(old, newGeneration(old.n+1)) {
			return
		}
	}
}

// endpoint returns one endpoint's slot in the cache, named by key instead
// of by the address crypto/tls would use (through a gateway, every
// endpoint has the gateway's address).
func (s *sessionCache) endpoint(key string) endpointSessions {
	return endpointSessions{cache: s, key: key}
}

// endpointSessions is one endpoint's slot in a sessionCache, as a
// tls.ClientSessionCache.
type endpointSessions struct {
	cache *sessionCache
	key   string
	// gen, when not zero, binds the slot to one handshake: the generation
	// current when it began. A session is neither offered nor kept once
	// the SVID or bundle changed since.
	gen uint64
	// store only: offer no session (a retry in full).
	storeOnly bool
	// instance names the instance behind a tunnelled endpoint, as its
	// gateway tagged it (tunnel.Reply.Endpoint): each instance has its own
	// ticket keys, so each has its own session.
	instance string
}

var _ tls.ClientSessionCache = endpointSessions{}

// on returns the slot for the instance a tunnelled connection reached
// (empty: not tagged, or not tunnelled).
func (e endpointSessions) on(instance string) endpointSessions {
	e.instance = instance
	return e
}

// slot is the slot's key in the cache.
func (e endpointSessions) slot() string { return slotKey(e.key, e.instance) }

func slotKey(key, instance string) string {
	if instance == "" {
		return key
	}
	return key + " @" + hex.EncodeToString([]byte(instance))
}

// bound returns the slot for one handshake starting now.
func (e endpointSessions) bound() endpointSessions {
	e.gen = e.cache.load().n
	return e
}

// current returns the generation the slot may use, or nil.
func (e endpointSessions) current() *generation {
	g := e.cache.load()
	if e.gen != 0 && e.gen != g.n {
		return nil // the handshake may present the SVID replaced since
	}
	return g
}

// Get implements tls.ClientSessionCache.
func (e endpointSessions) Get(string) (*tls.ClientSessionState, bool) {
	g := e.current()
	if g == nil || e.storeOnly {
		return nil, false
	}
	cs, ok := g.Get(e.slot())
	return cs, ok && cs != nil
}

// Put implements tls.ClientSessionCache; a nil cs removes the session.
func (e endpointSessions) Put(_ string, cs *tls.ClientSessionState) {
	g := e.current()
	switch {
	case g == nil:
	case cs == nil:
		g.forget(e.slot())
	default:
		g.Put(e.slot(), cs)
		if e.instance != "" {
			g.keep(e.key, e.instance)
		}
	}
}

// held reports whether a session would be offered.
func (e endpointSessions) held() bool {
	_, ok := e.Get("")
	return ok
}

// drop forgets the endpoint's session.
func (e endpointSessions) drop() { e.Put("", nil) }

// full returns the slot for a full handshake: it offers no session, and
// keeps the one the handshake brings.
func (e endpointSessions) full() endpointSessions {
	e.storeOnly = true
	return e
}
