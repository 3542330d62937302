package agent

import (
	"cmp"
	"fmt"
	"maps"
	"net"
	"slices"
	"sync"

	"google.golang.org/protobuf/proto"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	fedcatalog "github.com/straitmesh/strait/federation/catalog"
	"github.com/straitmesh/strait/gateway"
)

// catalog is the gateway's routing view: links and exports from the
// control plane, imports from the peers' control streams. It implements
// gateway.Catalog.
type catalog struct {
	mu       sync.RWMutex
	links    map[string]*controlplanev1.Link
	exports  map[string]*controlplanev1.GatewayExport // "namespace/name"
	imports  map[string]map[string]*federationv1.ExportedService
	versions map[string]uint64   // last catalog version applied, by peer
	addrs    map[string][]string // addresses peers announced
	changed  chan struct{}       // closed when exports change
}

func newCatalog() *catalog {
	return &catalog{links: map[string]*controlplanev1.Link{}, exports: map[string]*controlplanev1.GatewayExport{},
		imports: map[string]map[string]*federationv1.ExportedService{}, versions: map[string]uint64{}, addrs: map[string][]string{},
		changed: make(chan struct{})}
}

var _ gateway.Catalog = (*catalog)(nil)

func key(ns, name string) string { return ns + "/" + name }

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }

// setSnapshot installs the control plane's view; it reports whether the
// set of links (or their addresses) changed, and whether the exports
// (or their endpoints) did.
func (c *catalog) setSnapshot(s *controlplanev1.GatewaySnapshot) (linksChanged, exportsChanged bool) {
	links := map[string]*controlplanev1.Link{}
	for _, l := range s.GetLinks() {
		links[l.GetPeer()] = l
	}
	exports := map[string]*controlplanev1.GatewayExport{}
	for _, e := range s.GetExports() {
		exports[key(e.GetService().GetNamespace(), e.GetService().GetName())] = e
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	linksChanged = len(links) != len(c.links)
	for p, l := range links {
		if old := c.links[p]; old == nil || !proto.Equal(old, l) {
			linksChanged = true
		}
	}
	exportsChanged = len(exports) != len(c.exports)
	for k, e := range exports {
		if old := c.exports[k]; old == nil || !proto.Equal(old, e) {
			exportsChanged = true
		}
	}
	c.links, c.exports = links, exports
	for p := range c.imports {
		if links[p] == nil {
			delete(c.imports, p)
			delete(c.versions, p)
		}
	}
	if exportsChanged {
		close(c.changed)
		c.changed = make(chan struct{})
	}
	return linksChanged, exportsChanged
}

// resubscribe returns a channel closed at the next change of exports.
func (c *catalog) resubscribe() <-chan struct{} {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.changed
}

func (c *catalog) linkedPeers() []string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return sortedKeys(c.links)
}

func (c *catalog) dropImports(peer string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.imports, peer)
	delete(c.versions, peer)
}

// learnAddrs records the addresses a peer announced in its Hello. They
// come from the peer: an announcement with one that is not host:port (as
// the control plane requires of ReportPeers) is ignored, or it would make
// every report of this gateway be refused.
func (c *catalog) learnAddrs(peer string, addrs []string) {
	if len(addrs) == 0 || len(addrs) > 8 {
		return
	}
	for _, a := range addrs {
		host, port, err := net.SplitHostPort(a)
		if err != nil || host == "" || port == "" || len(a) > 262 {
			return
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.addrs[peer] = slices.Clone(addrs)
}

func (c *catalog) learned(peer string) []string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return slices.Clone(c.addrs[peer])
}

// Peer returns a linked peer; its addresses are the link's, else those it
// announced on its control stream.
func (c *catalog) Peer(cluster string) (gateway.Peer, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	l := c.links[cluster]
	if l == nil {
		return gateway.Peer{}, false
	}
	addrs := l.GetPeerGatewayAddresses()
	if len(addrs) == 0 {
		addrs = c.addrs[cluster]
	}
	return gateway.Peer{Cluster: cluster, Addrs: slices.Clone(addrs)}, true
}

func exportedTo(e *controlplanev1.GatewayExport, peer string) bool {
	return len(e.GetToClusters()) == 0 || slices.Contains(e.GetToClusters(), peer)
}

// LocalEndpoints answers a peer's stream for a local service.
func (c *catalog) LocalEndpoints(fromPeer, ns, service string, port uint16) ([]string, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.links[fromPeer] == nil {
		return nil, fmt.Errorf("%w: %s is not linked", gateway.ErrNotExported, fromPeer)
	}
	e := c.exports[key(ns, service)]
	if e == nil || !exportedTo(e, fromPeer) {
		return nil, fmt.Errorf("%w: %s/%s is not exported to %s", gateway.ErrNotExported, ns, service, fromPeer)
	}
	if !slices.Contains(e.GetService().GetPorts(), uint32(port)) {
		return nil, fmt.Errorf("%w: %s/%s has no port %d", gateway.ErrNotExported, ns, service, port)
	}
	if len(e.GetEndpoints()) == 0 {
		return nil, fmt.Errorf("%w: %s/%s", gateway.ErrNoEndpoints, ns, service)
	}
	return slices.Clone(e.GetEndpoints()), nil
}

// Imported says whether this cluster may send to a peer's service.
func (c *catalog) Imported(peer, ns, service string) error {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.links[peer] == nil {
		return fmt.Errorf("%w: %s is not a linked peer", gateway.ErrNotImported, peer)
	}
	if _, ok := c.imports[peer][key(ns, service)]; !ok {
		return fmt.Errorf("%w: %s does not export %s/%s to this cluster", gateway.ErrNotImported, peer, ns, service)
	}
	return nil
}

// exportsFor is what this cluster exports to peer, by key.
func (c *catalog) exportsFor(peer string) map[string]*federationv1.ExportedService {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := map[string]*federationv1.ExportedService{}
	for k, e := range c.exports {
		if exportedTo(e, peer) {
			out[k] = e.GetService()
		}
	}
	return out
}

// What one peer's catalog may hold here. Every gateway report carries
// every peer's imports and the control plane takes reports of at most 4
// MiB: without a bound, one peer could make every report of this gateway
// refused, for all peers.
const (
	maxImportedServices = 4096
	maxImportBytes      = 512 << 10 // encoded
)

// applyDelta applies a peer's catalog delta; a delta that does not follow
// the last applied version is refused (the peer then resends in full), and
// so is one that would take the peer's catalog over maxImportedServices or
// maxImportBytes (the imports stay as they were).
func (c *catalog) applyDelta(peer string, d *federationv1.CatalogDelta) error {
	if len(d.GetUpserts()) > 4096 || len(d.GetRemovals()) > 4096 {
		return fmt.Errorf("catalog delta too large")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.links[peer] == nil {
		return fmt.Errorf("%s is not linked", peer)
	}
	cur := c.imports[peer]
	switch {
	case d.GetFull():
		cur = map[string]*federationv1.ExportedService{}
	case d.GetBaseVersion() != c.versions[peer]:
		return fmt.Errorf("delta on version %d, have %d", d.GetBaseVersion(), c.versions[peer])
	default:
		cur = maps.Clone(cur)
		if cur == nil {
			cur = map[string]*federationv1.ExportedService{}
		}
	}
	for _, r := range d.GetRemovals() {
		delete(cur, key(r.GetNamespace(), r.GetName()))
	}
	for _, es := range d.GetUpserts() {
		if err := fedcatalog.Validate(es); err != nil {
			return fmt.Errorf("from %s: %w", peer, err)
		}
		cur[key(es.GetNamespace(), es.GetName())] = es
	}
	if len(cur) > maxImportedServices {
		return fmt.Errorf("from %s: %d services exported to this cluster, more than the %d a link carries", peer, len(cur), maxImportedServices)
	}
	size := 0
	for _, es := range cur {
		size += proto.Size(es)
	}
	if size > maxImportBytes {
		return fmt.Errorf("from %s: the services exported to this cluster take %d bytes, more than the %d a link carries", peer, size, maxImportBytes)
	}
	c.imports[peer] = cur
	c.versions[peer] = d.GetVersion()
	return nil
}

// importsOf lists what peer exports to this cluster, sorted.
func (c *catalog) importsOf(peer string) []*federationv1.ExportedService {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := slices.Collect(maps.Values(c.imports[peer]))
	slices.SortFunc(out, func(a, b *federationv1.ExportedService) int {
		return cmp.Or(cmp.Compare(a.GetNamespace(), b.GetNamespace()), cmp.Compare(a.GetName(), b.GetName()))
	})
	return out
}
