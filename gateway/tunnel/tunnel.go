// Package tunnel is the wire format of Strait's east-west tunnel: the small
// versioned header that opens every tunnelled stream (and the sidecar's entry
// connection to its gateway), and the reply the receiving side sends back
// before it relays a single byte. docs/gateway-protocol.md is the
// specification; this package is its reference implementation.
//
// Decoding is strict and bounded, because the bytes come from the network:
// a header is length-prefixed, so an oversize one is refused before its body
// is read; the decoder never reads past the header (the caller may hand the
// rest of the stream to a relay) and never allocates more than the limit it
// is given. Names are DNS labels, ports are 1..65535, and nothing may follow
// the fields inside the declared length but well-formed optional fields,
// which a receiver of the same major version skips.
//
// The package knows nothing of QUIC, TLS or sockets and imports only the
// standard library, so the lean sidecar may use it to speak the entry hop.
package tunnel

// ALPN protocol IDs. The major version of the header is part of each: a
// change that an old receiver cannot skip needs a new ALPN, negotiated in the
// TLS handshake, so two gateways always speak a version both understand.
const (
	// ALPNPeer is negotiated between gateways over QUIC (mTLS, gateway SVIDs).
	ALPNPeer = "strait-gw/1"
	// ALPNEntry is negotiated by a sidecar connecting to its own cluster's
	// gateway over TCP+TLS (mTLS, the workload's SVID); the relayed bytes
	// stay inside that TLS session.
	ALPNEntry = "strait-entry/1"
	// ALPNEntryRaw is ALPNEntry where, after an OK reply, both sides
	// continue on the TCP connection under the TLS session, outside it:
	// the relayed bytes are the workload's own end-to-end mTLS, so a second
	// layer of encryption on the local hop would only cost CPU and memory.
	// The sidecar sends nothing after the header until it has read the
	// reply, and the gateway nothing after the reply until it relays, so no
	// relayed byte is ever read into a TLS record buffer. Preferred by
	// gateways; the sidecar offers only this one.
	ALPNEntryRaw = "strait-entry/2"
	// ALPNJoin is negotiated by a cluster that joins a federation with a join
	// token (QUIC, client certificate optional).
	ALPNJoin = "strait-join/1"
)

// Version is the major version of the header and reply this package writes.
const Version = 1

// Limits of the format.
const (
	// DefaultMaxHeaderBytes is the default bound on a whole header
	// (prefix included) that ReadHeader accepts.
	DefaultMaxHeaderBytes = 1024
	// MaxMessageBytes bounds the human-readable message of a reply.
	MaxMessageBytes = 256
	// MaxReplyBytes bounds a whole reply (prefix included).
	MaxReplyBytes = 512
	// MaxNameBytes bounds a cluster, namespace or service name (a DNS label).
	MaxNameBytes = 63
	// MaxDataHeaderBytes is the largest header this version writes: a data
	// header with three 63-byte names.
	MaxDataHeaderBytes = prefixBytes + 3*(1+MaxNameBytes) + 2

	// prefixBytes is the fixed prefix of headers and replies: version, kind
	// or code, and the body length (uint16, big endian).
	prefixBytes = 4
	// maxBodyBytes is the largest body the uint16 length can declare.
	maxBodyBytes = 1<<16 - 1
)

// StreamCode is an application error code carried by QUIC RESET_STREAM and
// STOP_SENDING frames on a tunnel stream.
type StreamCode uint64

// Stream error codes.
const (
	// StreamNoError ends a direction that is no longer needed after a
	// normal exchange.
	StreamNoError StreamCode = 0x0
	// StreamRefused resets a stream the receiver refused; the reply that
	// precedes the reset says why.
	StreamRefused StreamCode = 0x1
	// StreamAborted resets a stream whose other leg (the TCP connection to
	// the endpoint, or the entry connection) failed mid-relay.
	StreamAborted StreamCode = 0x2
	// StreamShutdown resets a stream because its gateway is stopping.
	StreamShutdown StreamCode = 0x3
)

// CloseCode is an application error code carried by a QUIC
// CONNECTION_CLOSE frame between gateways.
type CloseCode uint64

// Connection close codes.
const (
	CloseNoError      CloseCode = 0x0 // nothing wrong (e.g. an idle join connection)
	CloseShutdown     CloseCode = 0x1 // the gateway is stopping
	CloseUnlinked     CloseCode = 0x2 // the peer is not (or no longer) linked
	CloseUntrusted    CloseCode = 0x3 // the peer's chain is no longer trusted
	CloseTooManyConns CloseCode = 0x4 // more connections from one peer than allowed
	CloseStale        CloseCode = 0x5 // the connection stopped answering (closed locally)
	CloseProtocol     CloseCode = 0x6 // the peer broke the protocol
)
