package server

import (
	"context"
	"crypto/tls"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/federation/join"
	"github.com/straitmesh/strait/federation/token"
	"github.com/straitmesh/strait/gateway/tunnel"
)

// A cluster that has its intermediate joins the mesh of its own root only,
// and must find that out before it proves the token: otherwise the issuer
// has consumed the token and stored a link that the joiner then refuses.
func TestJoinOtherMeshRefusedBeforeRedemption(t *testing.T) {
	e := newTestEnv(t)
	other := catest.New(t, testTD, catest.Options{Cluster: "north"}) // same trust domain, another root
	gwID, _ := identity.Gateway(td, "north")
	sv := other.SVID(t, gwID.String(), time.Hour)
	cert := tls.Certificate{PrivateKey: sv.PrivateKey, Leaf: sv.Certificates[0]}
	for _, x := range sv.Certificates {
		cert.Certificate = append(cert.Certificate, x.Raw)
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, NextProtos: []string{tunnel.ALPNJoin}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	b := other.Bundle()
	var redeemed atomic.Bool
	go func() {
		conn, err := ln.Accept(context.Background())
		if err != nil {
			return
		}
		s, err := conn.AcceptStream(context.Background())
		if err != nil {
			return
		}
		defer s.Close()
		join.Serve(conn.Context(), s, conn.ConnectionState().TLS, &federationv1.JoinOffer{BundlePem: b.MarshalPEM(), BundleSequence: b.Sequence(), Cluster: "north"},
			func(context.Context, *federationv1.JoinRequest, []byte) (*federationv1.JoinResult, error) {
				redeemed.Store(true)
				return &federationv1.JoinResult{LinkId: "01", Cluster: "north", BundlePem: b.MarshalPEM(), BundleSequence: b.Sequence()}, nil
			}, nil)
	}()
	digest, _ := token.ParseBundleDigest(b.Digest())
	tok, err := token.New(token.Params{Issuer: "north", TrustDomain: td, GatewayAddrs: []string{ln.Addr().String()}, BundleDigest: digest})
	if err != nil {
		t.Fatal(err)
	}
	_, err = federationServer{s: e.srv}.Join(context.Background(), &controlplanev1.JoinRequest{Token: tok.String()})
	if !errors.Is(err, ErrPermissionDenied) {
		t.Fatalf("join into another mesh: %v, want permission denied", err)
	}
	if redeemed.Load() {
		t.Fatal("the token was redeemed at the issuer before the joiner found the issuer is of another mesh")
	}
}
