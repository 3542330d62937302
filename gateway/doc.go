// Package gateway is the east-west gateway: the QUIC tunnel between clusters
// (one quic.Transport, mTLS with gateway SVIDs, one stream per tunnelled
// connection), the peer table and routing. It must not import client-go.
package gateway
