// Package gateway is Strait's east-west gateway: it carries connections
// between clusters without ever decrypting them.
//
// A calling sidecar opens a TCP+TLS connection to its own cluster's gateway
// (the entry hop, ALPN strait-entry/1, mTLS with the workload's SVID) and
// writes a tunnel header naming cluster, namespace, service and port. The
// gateway checks the target is imported from a linked peer, opens one
// bidirectional QUIC stream on its connection to that peer's gateway (ALPN
// strait-gw/1, mTLS with gateway SVIDs, one quic.Transport that both listens
// and dials), forwards the header and relays the peer's reply; the peer
// gateway checks the service is exported to the caller's cluster, dials one
// of its healthy local endpoints over plain TCP and relays bytes both ways.
// The workload's own mTLS runs inside, end to end, untouched.
//
// Everything is bounded (streams per connection, connections per peer,
// header size, handshake, header and idle timeouts), a malformed or refused
// stream is reset alone, and trust is re-judged on every handshake and, for
// open connections, whenever the credentials change or Recheck is called.
// The wire format is package gateway/tunnel, specified in
// docs/gateway-protocol.md.
//
// The package learns who its peers are and what is exported from a Catalog
// and its identity from Credentials, both interfaces it declares; it must
// not import client-go, the control plane or the sidecar.
package gateway
