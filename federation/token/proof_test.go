package token

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"testing"
	"time"
)

// tlsPair runs a real TLS handshake over an in-memory connection and returns
// both ends' connection states.
func tlsPair(t *testing.T, maxVersion uint16) (client, server tls.ConnectionState) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		DNSNames:     []string{"gw.east.example"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(leaf)

	c, s := net.Pipe()
	t.Cleanup(func() { c.Close(); s.Close() })
	srv := tls.Server(s, &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		MaxVersion:   maxVersion,
	})
	cli := tls.Client(c, &tls.Config{RootCAs: pool, ServerName: "gw.east.example", MaxVersion: maxVersion})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- srv.HandshakeContext(ctx) }()
	if err := cli.HandshakeContext(ctx); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
	return cli.ConnectionState(), srv.ConnectionState()
}

func TestProofOverTLS(t *testing.T) {
	tok := mustNew(t, testParams())
	stored := tok.SecretHash() // all the issuer keeps

	joinerSide, issuerSide := tlsPair(t, tls.VersionTLS13)
	joinerEKM, err := ChannelBinding(&joinerSide)
	if err != nil {
		t.Fatalf("ChannelBinding(joiner): %v", err)
	}
	issuerEKM, err := ChannelBinding(&issuerSide)
	if err != nil {
		t.Fatalf("ChannelBinding(issuer): %v", err)
	}
	if !bytes.Equal(joinerEKM, issuerEKM) || len(joinerEKM) != ExporterLength {
		t.Fatalf("exporter values differ across one connection: %x vs %x", joinerEKM, issuerEKM)
	}
	proof := tok.Proof(joinerEKM, "west")
	if len(proof) != ProofLength {
		t.Fatalf("proof is %d bytes, want %d", len(proof), ProofLength)
	}
	if !VerifyProof(stored, issuerEKM, "west", proof) {
		t.Fatal("VerifyProof refused the joiner's proof on its own connection")
	}

	// A man in the middle terminates the joiner's TLS and opens its own
	// connection to the issuer: the relayed proof is bound to the wrong
	// channel.
	_, relayIssuerSide := tlsPair(t, tls.VersionTLS13)
	relayEKM, err := ChannelBinding(&relayIssuerSide)
	if err != nil {
		t.Fatal(err)
	}
	if VerifyProof(stored, relayEKM, "west", proof) {
		t.Fatal("VerifyProof accepted a proof relayed onto another TLS connection")
	}
}

func TestVerifyProofBinding(t *testing.T) {
	tok := mustNew(t, testParams())
	other := testParams()
	other.Rand = &counter{next: 100}
	otherTok := mustNew(t, other)
	ekm := bytes.Repeat([]byte{7}, ExporterLength)
	proof := tok.Proof(ekm, "west")
	hash := tok.SecretHash()

	tests := []struct {
		name     string
		hash     [32]byte
		exporter []byte
		joiner   string
		proof    []byte
		want     bool
	}{
		{"genuine", hash, ekm, "west", proof, true},
		{"package function agrees", hash, ekm, "west", Proof(hash, ekm, "west"), true},
		{"other exporter", hash, bytes.Repeat([]byte{8}, ExporterLength), "west", proof, false},
		{"exporter one bit off", hash, append([]byte{6}, ekm[1:]...), "west", proof, false},
		{"longer exporter", hash, append(ekm, 7), "west", proof, false},
		{"other joiner", hash, ekm, "south", proof, false},
		{"joiner case", hash, ekm, "West", proof, false},
		{"other token's hash", otherTok.SecretHash(), ekm, "west", proof, false},
		{"truncated proof", hash, ekm, "west", proof[:16], false},
		{"extended proof", hash, ekm, "west", append(proof[:len(proof):len(proof)], 0), false},
		{"empty proof", hash, ekm, "west", nil, false},
		{"proof keyed by the secret, not its hash", hash, ekm, "west", Proof(tok.secret, ekm, "west"), false},
		{"short exporter", hash, ekm[:MinExporterLength-1], "west", Proof(hash, ekm[:MinExporterLength-1], "west"), false},
		{"no exporter", hash, nil, "west", Proof(hash, nil, "west"), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := VerifyProof(tc.hash, tc.exporter, tc.joiner, tc.proof); got != tc.want {
				t.Errorf("VerifyProof: got %v, want %v", got, tc.want)
			}
		})
	}
	// Length prefixes keep exporter and joiner apart: moving a byte from one
	// to the other changes the proof.
	if bytes.Equal(Proof(hash, append(ekm, 'w'), "est"), Proof(hash, ekm, "west")) {
		t.Error("proof does not separate exporter from joiner")
	}
	if Proof(hash, ekm[:MinExporterLength-1], "west") != nil {
		t.Error("Proof bound to a too-short exporter, want nil")
	}
	if tok.SecretHash() == [32]byte(tok.secret) {
		t.Error("SecretHash is the secret")
	}
}

func TestChannelBindingRequiresTLS13(t *testing.T) {
	client, _ := tlsPair(t, tls.VersionTLS12)
	if _, err := ChannelBinding(&client); err == nil {
		t.Error("ChannelBinding on TLS 1.2: got no error")
	}
	if _, err := ChannelBinding(&tls.ConnectionState{}); err == nil {
		t.Error("ChannelBinding before the handshake: got no error")
	}
	if _, err := ChannelBinding(nil); err == nil {
		t.Error("ChannelBinding(nil): got no error")
	}
}
