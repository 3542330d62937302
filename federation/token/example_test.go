package token_test

import (
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/federation/token"
)

// The life of a join token: east issues it, west parses and checks it, proves
// possession over the TLS connection it dialled, and east verifies the proof
// with only the hash it stored.
func Example() {
	issuedAt := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	tok, err := token.New(token.Params{
		Issuer:       "east",
		TrustDomain:  spiffeid.RequireTrustDomainFromString("strait.example"),
		GatewayAddrs: []string{"203.0.113.10:15443", "203.0.113.11:15443"},
		BundleDigest: [32]byte{0xd1, 0x9e}, // from the issuer's bundle
		TTL:          15 * time.Minute,
		ForCluster:   "west",
		Now:          func() time.Time { return issuedAt },
	})
	if err != nil {
		panic(err)
	}
	stored := tok.SecretHash() // east stores tok.ID() and this, never the secret

	// On west: `strait federation join TOKEN`.
	joined, err := token.Parse(tok.String() + "\n")
	if err != nil {
		panic(err)
	}
	fmt.Println(joined.Issuer(), joined.TrustDomain(), joined.GatewayAddrs())
	fmt.Println(joined.Check(issuedAt.Add(time.Minute), "west", token.DefaultClockSkew))
	fmt.Println(joined.Check(issuedAt.Add(time.Minute), "south", token.DefaultClockSkew))
	fmt.Println(joined.Check(issuedAt.Add(time.Hour), "west", token.DefaultClockSkew))

	// Both ends of the TLS connection compute the same token.ChannelBinding.
	exporter := make([]byte, token.ExporterLength)
	proof := joined.Proof(exporter, "west")
	fmt.Println(token.VerifyProof(stored, exporter, "west", proof))
	// Output:
	// east strait.example [203.0.113.10:15443 203.0.113.11:15443]
	// <nil>
	// federation: join token is for another cluster: it was issued for cluster "west", and this is "south"
	// federation: join token has expired: it expired at 2026-03-01T12:15:00Z (now 2026-03-01T13:00:00Z): create a new one on cluster "east"
	// true
}
