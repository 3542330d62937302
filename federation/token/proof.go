package token

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
)

// Channel binding constants.
const (
	// ExporterLabel is the TLS exporter label (RFC 8446 §7.5) of the value a
	// redemption proof is bound to. Its "EXPORTER-" prefix is the convention
	// of the IANA TLS Exporter Labels registry.
	ExporterLabel = "EXPORTER-strait-join-v1"
	// ExporterLength is the length in bytes of the exported value.
	ExporterLength = 32
	// MinExporterLength is the shortest exporter value Proof binds to.
	MinExporterLength = 16
	// ProofLength is the length of a proof in bytes.
	ProofLength = sha256.Size

	proofLabel = "strait-join-v1 proof"
)

// ChannelBinding returns the exporter value of a TLS connection for Proof and
// VerifyProof: ExporterLength bytes exported under ExporterLabel, no
// context. Both ends of one connection get the same value; no other
// connection does. It requires a completed TLS 1.3 handshake.
func ChannelBinding(cs *tls.ConnectionState) ([]byte, error) {
	switch {
	case cs == nil || !cs.HandshakeComplete:
		return nil, errors.New("federation: channel binding: TLS handshake not complete")
	case cs.Version != tls.VersionTLS13:
		return nil, fmt.Errorf("federation: channel binding: TLS version %s, want TLS 1.3", tls.VersionName(cs.Version))
	}
	ekm, err := cs.ExportKeyingMaterial(ExporterLabel, nil, ExporterLength)
	if err != nil {
		return nil, fmt.Errorf("federation: channel binding: %w", err)
	}
	return ekm, nil
}

// Proof computes the redemption proof the joiner sends: an HMAC-SHA256, keyed
// by the token's SecretHash, over exporter (the ChannelBinding of the TLS
// connection it is sent on) and joiner (the redeeming cluster's name); see
// the package documentation for the exact input. An exporter shorter than
// MinExporterLength binds to nothing, so Proof returns nil for it, which
// VerifyProof never accepts.
func Proof(secretHash [sha256.Size]byte, exporter []byte, joiner string) []byte {
	if len(exporter) < MinExporterLength {
		return nil
	}
	m := hmac.New(sha256.New, secretHash[:])
	m.Write([]byte(proofLabel))
	m.Write([]byte{0})
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(exporter)))
	m.Write(n[:])
	m.Write(exporter)
	binary.BigEndian.PutUint32(n[:], uint32(len(joiner)))
	m.Write(n[:])
	m.Write([]byte(joiner))
	return m.Sum(nil)
}

// VerifyProof reports, in constant time, whether proof is the Proof of the
// token with secretHash, for this exporter value and joiner name. The issuer
// calls it with the hash it stored and its own side's ChannelBinding.
func VerifyProof(secretHash [sha256.Size]byte, exporter []byte, joiner string, proof []byte) bool {
	want := Proof(secretHash, exporter, joiner)
	return want != nil && len(proof) == ProofLength && hmac.Equal(want, proof)
}

// Proof is Proof(t.SecretHash(), exporter, joiner): what the joiner sends.
func (t *Token) Proof(exporter []byte, joiner string) []byte {
	return Proof(t.SecretHash(), exporter, joiner)
}
