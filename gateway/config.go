package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	"github.com/straitmesh/strait/gateway/tunnel"
)

// Credentials are the gateway's SVID and trust bundle. TLS configs built
// from them read the current material on every handshake. *proxy.Credentials
// implements it.
type Credentials interface {
	// TrustDomain is the mesh's trust domain.
	TrustDomain() spiffeid.TrustDomain
	// ServerTLS returns a TLS 1.3 server config presenting the current SVID
	// and calling verify on every handshake.
	ServerTLS(nextProtos []string, verify func(tls.ConnectionState) error) *tls.Config
	// ClientTLS returns a TLS 1.3 client config presenting the current SVID
	// and calling verify (instead of WebPKI checks) on every handshake.
	ClientTLS(nextProtos []string, verify func(tls.ConnectionState) error) *tls.Config
	// Certificate returns the current SVID as TLS presents it, the same
	// pointer until the SVID changes.
	Certificate() (*tls.Certificate, error)
	// Verifier verifies chains against the current bundle.
	Verifier() *svid.Verifier
	// StillTrusted re-verifies an open session's chain against the current
	// bundle (a leaf that merely expired since the handshake still passes).
	StillTrusted(chain []*x509.Certificate, role svid.Role) (spiffeid.ID, error)
	// Changed returns a channel closed at the next change of SVID or bundle.
	Changed() <-chan struct{}
}

// Peer is a linked cluster and where its gateways listen.
type Peer struct {
	Cluster string
	Addrs   []string // host:port UDP addresses, tried in order
}

// Catalog answers the gateway's routing questions. It is consulted on every
// connection and every stream, so a change applies to the next one at once
// (call Recheck to apply it to open connections). It must be safe for
// concurrent use and quick: it is called on the connection's path.
type Catalog interface {
	// Peer returns the linked peer named cluster, if it is linked.
	Peer(cluster string) (Peer, bool)
	// LocalEndpoints returns the addresses (host:port) of the healthy local
	// endpoints of namespace/service:port, if the service is exported to
	// fromPeer. Otherwise it returns an error wrapping ErrNotExported or
	// ErrNoEndpoints (any other error is reported as unavailable).
	LocalEndpoints(fromPeer, namespace, service string, port uint16) ([]string, error)
	// Imported returns nil if this cluster may send to namespace/service in
	// peer, and otherwise an error wrapping ErrNotImported (any other error
	// is reported as unavailable).
	Imported(peer, namespace, service string) error
}

// Catalog errors, mapped to reply codes at the gateway's edge.
var (
	ErrNotExported = errors.New("gateway: service not exported to this peer")
	ErrNoEndpoints = errors.New("gateway: no healthy endpoints")
	ErrNotImported = errors.New("gateway: service not imported from this peer")
)

// ErrClosed is returned by OpenControl once the gateway has stopped (or
// before it runs).
var ErrClosed = errors.New("gateway: not running")

// Limits bound what peers and sidecars may make the gateway hold. Every zero
// field means its default.
type Limits struct {
	// MaxStreamsPerConn is how many streams a peer may have open at once on
	// one connection (QUIC's MaxIncomingStreams). Default 16384.
	MaxStreamsPerConn int
	// MaxConnsPerPeer is how many connections the gateway accepts from one
	// peer gateway identity at once; more are closed. Default 4.
	MaxConnsPerPeer int
	// MaxEntryConns is how many entry connections (from local sidecars) may
	// be open at once; more are closed on accept. Default 65536.
	MaxEntryConns int
	// MaxJoinConns is how many join connections may be open at once.
	// Default 16.
	MaxJoinConns int
	// MaxHeaderBytes bounds a tunnel header, prefix included. Default 1024;
	// at least tunnel.MaxDataHeaderBytes.
	MaxHeaderBytes int
	// HandshakeTimeout bounds a QUIC or TLS handshake. Default 10s.
	HandshakeTimeout time.Duration
	// IdleTimeout closes a QUIC connection that heard nothing for that
	// long; keep-alives are sent every third of it. Default 60s.
	IdleTimeout time.Duration
	// HeaderTimeout bounds the wait for a stream's (or an entry
	// connection's) header, and, added to DialTimeout, for a peer's reply.
	// Default 5s.
	HeaderTimeout time.Duration
	// DialTimeout bounds dialing one peer address, dialing a local endpoint
	// (all attempts together), and waiting for stream credit on a peer
	// connection. Default 5s.
	DialTimeout time.Duration
	// JoinIdleTimeout closes a join connection that has had no stream open
	// for that long. Default 10s.
	JoinIdleTimeout time.Duration
}

// Defaults.
const (
	DefaultMaxStreamsPerConn = 16384
	DefaultMaxConnsPerPeer   = 4
	DefaultMaxEntryConns     = 65536
	DefaultMaxJoinConns      = 16
	DefaultHandshakeTimeout  = 10 * time.Second
	DefaultIdleTimeout       = 60 * time.Second
	DefaultHeaderTimeout     = 5 * time.Second
	DefaultDialTimeout       = 5 * time.Second
	DefaultJoinIdleTimeout   = 10 * time.Second
)

// ControlHandler serves a control stream a linked peer opened. It owns s
// until it returns; ctx ends when the peer connection or the gateway does.
type ControlHandler func(ctx context.Context, peer string, s io.ReadWriteCloser)

// JoinHandler serves one stream of a connection that negotiated the join
// ALPN. cs is that connection's TLS state: the client certificate is
// optional (cs.PeerCertificates may be empty and is not verified), and
// cs.ExportKeyingMaterial binds a token exchange to the connection.
type JoinHandler func(ctx context.Context, s io.ReadWriteCloser, cs tls.ConnectionState)

// Config is what a Gateway needs. Required fields say so; every other zero
// value has the meaning given.
type Config struct {
	// Cluster is this gateway's cluster name (a DNS label). Required.
	Cluster string
	// TrustDomain is the mesh's trust domain; it must match Credentials.
	// Required.
	TrustDomain spiffeid.TrustDomain
	// Credentials are the gateway's SVID (spiffe://<td>/cluster/<Cluster>/gateway)
	// and bundle. Required.
	Credentials Credentials
	// PeerListen is the UDP address for QUIC from peer gateways, e.g.
	// "0.0.0.0:15443" or "127.0.0.1:0". Required.
	PeerListen string
	// EntryListen is the TCP address for local sidecars. Empty: no entry
	// listener (the gateway only receives).
	EntryListen string
	// Catalog says which peers are linked and what is exported and
	// imported. Required.
	Catalog Catalog
	// Limits; zero fields mean the defaults.
	Limits Limits
	// Logger; nil discards.
	Logger *slog.Logger
	// Registerer receives the gateway's metrics; nil keeps them private.
	Registerer prometheus.Registerer
	// Clock stamps connections and times streams; nil means time.Now.
	// (Timeouts are run by the runtime's timers.)
	Clock func() time.Time
	// StatelessResetKey lets this gateway tell peers at once that it lost
	// a connection's state (after a restart): keep it the same across
	// restarts. Nil disables stateless resets; peers then notice a restart
	// when a stream opened on the old connection gets no answer.
	StatelessResetKey *quic.StatelessResetKey
	// ControlHandler serves control streams from linked peers; nil refuses
	// them (CodeUnsupported).
	ControlHandler ControlHandler
	// JoinHandler serves join connections; nil does not offer the join
	// ALPN.
	JoinHandler JoinHandler
	// EntryIssuer, if set, returns the key ID (SubjectKeyId) of this
	// cluster's intermediate: entry clients must hold an SVID it issued,
	// so a workload of another cluster cannot use this cluster's links.
	// Nil, or an empty result, accepts any workload of the trust domain.
	EntryIssuer func() []byte
}

func (l *Limits) setDefaults() {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	defDur := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	def(&l.MaxStreamsPerConn, DefaultMaxStreamsPerConn)
	def(&l.MaxConnsPerPeer, DefaultMaxConnsPerPeer)
	def(&l.MaxEntryConns, DefaultMaxEntryConns)
	def(&l.MaxJoinConns, DefaultMaxJoinConns)
	def(&l.MaxHeaderBytes, tunnel.DefaultMaxHeaderBytes)
	defDur(&l.HandshakeTimeout, DefaultHandshakeTimeout)
	defDur(&l.IdleTimeout, DefaultIdleTimeout)
	defDur(&l.HeaderTimeout, DefaultHeaderTimeout)
	defDur(&l.DialTimeout, DefaultDialTimeout)
	defDur(&l.JoinIdleTimeout, DefaultJoinIdleTimeout)
}

func (l Limits) validate() error {
	for _, f := range []struct {
		name string
		v    int
	}{
		{"MaxStreamsPerConn", l.MaxStreamsPerConn},
		{"MaxConnsPerPeer", l.MaxConnsPerPeer},
		{"MaxEntryConns", l.MaxEntryConns},
		{"MaxJoinConns", l.MaxJoinConns},
	} {
		if f.v < 0 {
			return fmt.Errorf("gateway: Limits.%s is %d, want a positive number (0: default)", f.name, f.v)
		}
	}
	for _, f := range []struct {
		name string
		v    time.Duration
	}{
		{"HandshakeTimeout", l.HandshakeTimeout},
		{"IdleTimeout", l.IdleTimeout},
		{"HeaderTimeout", l.HeaderTimeout},
		{"DialTimeout", l.DialTimeout},
		{"JoinIdleTimeout", l.JoinIdleTimeout},
	} {
		if f.v < 0 {
			return fmt.Errorf("gateway: Limits.%s is %s, want a positive duration (0: default)", f.name, f.v)
		}
	}
	if l.MaxStreamsPerConn > 1<<20 {
		return fmt.Errorf("gateway: Limits.MaxStreamsPerConn is %d, more than the limit of %d", l.MaxStreamsPerConn, 1<<20)
	}
	if l.MaxHeaderBytes != 0 && (l.MaxHeaderBytes < tunnel.MaxDataHeaderBytes || l.MaxHeaderBytes > 1<<16) {
		return fmt.Errorf("gateway: Limits.MaxHeaderBytes is %d, want %d..%d (0: default)", l.MaxHeaderBytes, tunnel.MaxDataHeaderBytes, 1<<16)
	}
	return nil
}

func (c *Config) validate() error {
	if err := identity.ValidateClusterName(c.Cluster); err != nil {
		return fmt.Errorf("gateway: Cluster: %w", err)
	}
	if c.TrustDomain.IsZero() {
		return errors.New("gateway: TrustDomain is required")
	}
	if c.Credentials == nil {
		return errors.New("gateway: Credentials are required")
	}
	if td := c.Credentials.TrustDomain(); td != c.TrustDomain {
		return fmt.Errorf("gateway: Credentials are for trust domain %q, want %q", td, c.TrustDomain)
	}
	if c.Catalog == nil {
		return errors.New("gateway: Catalog is required")
	}
	if c.PeerListen == "" {
		return errors.New("gateway: PeerListen is required")
	}
	return c.Limits.validate()
}
