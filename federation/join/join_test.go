package join

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/identity"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/federation/token"
	"github.com/straitmesh/strait/gateway/tunnel"
)

const testTD = "strait.example"

// listenAsEastGateway listens on the join ALPN over QUIC, presenting
// east's gateway SVID from c.
func listenAsEastGateway(t *testing.T, c *catest.CA) *quic.Listener {
	t.Helper()
	gwID, _ := identity.Gateway(spiffeid.RequireTrustDomainFromString(testTD), "east")
	sv := c.SVID(t, gwID.String(), time.Hour)
	cert := tls.Certificate{PrivateKey: sv.PrivateKey, Leaf: sv.Certificates[0]}
	for _, x := range sv.Certificates {
		cert.Certificate = append(cert.Certificate, x.Raw)
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, NextProtos: []string{tunnel.ALPNJoin}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// issuer is a minimal issuer gateway: the join ALPN on QUIC with east's
// gateway SVID, each stream served by Serve with redeem.
func issuer(t *testing.T, redeem Redeemer) (*catest.CA, *token.Token) {
	t.Helper()
	c := catest.New(t, testTD)
	ln := listenAsEastGateway(t, c)
	b := c.Bundle()
	go func() {
		for {
			conn, err := ln.Accept(context.Background())
			if err != nil {
				return
			}
			go func() {
				s, err := conn.AcceptStream(context.Background())
				if err != nil {
					return
				}
				defer s.Close()
				Serve(conn.Context(), s, conn.ConnectionState().TLS, &federationv1.JoinOffer{BundlePem: b.MarshalPEM(), BundleSequence: b.Sequence(), Cluster: "east"}, redeem, nil)
			}()
		}
	}()
	digest, err := token.ParseBundleDigest(b.Digest())
	if err != nil {
		t.Fatal(err)
	}
	tok, err := token.New(token.Params{Issuer: "east", TrustDomain: spiffeid.RequireTrustDomainFromString(testTD), GatewayAddrs: []string{ln.Addr().String()}, BundleDigest: digest})
	if err != nil {
		t.Fatal(err)
	}
	return c, tok
}

// An authenticated issuer still only speaks for itself: a result naming
// another cluster must not become the joiner's link to that cluster.
func TestDialRefusesResultForAnotherCluster(t *testing.T) {
	var bp atomic.Pointer[bundle.Bundle] // set after the issuer started: UDP gives the race detector no order
	c, tok := issuer(t, func(ctx context.Context, req *federationv1.JoinRequest, binding []byte) (*federationv1.JoinResult, error) {
		b := bp.Load()
		return &federationv1.JoinResult{LinkId: "0102", Cluster: "south", BundlePem: b.MarshalPEM(), BundleSequence: b.Sequence()}, nil
	})
	bp.Store(c.Bundle())
	_, err := Dial(context.Background(), Request{Token: tok, Cluster: "west"})
	if err == nil {
		t.Fatal("a join result naming south accepted from east's gateway")
	}
}

// The joiner's own judgement of the offered bundle (a cluster with an
// intermediate joins only the mesh of its own root) must come before the
// proof is sent: after it the issuer has consumed the token and stored
// the link.
func TestDialCheckOfferBeforeProof(t *testing.T) {
	var redeemed atomic.Bool
	_, tok := issuer(t, func(ctx context.Context, req *federationv1.JoinRequest, binding []byte) (*federationv1.JoinResult, error) {
		redeemed.Store(true)
		return &federationv1.JoinResult{Error: "no", Reason: "internal"}, nil
	})
	refuse := errors.New("not my mesh")
	_, err := Dial(context.Background(), Request{Token: tok, Cluster: "west", CheckOffer: func(*bundle.Bundle) error { return refuse }})
	if !errors.Is(err, refuse) {
		t.Fatalf("Dial: %v, want the CheckOffer error", err)
	}
	if redeemed.Load() {
		t.Fatal("the request was redeemed although the joiner refused the offer")
	}
}

// A client that opens a join stream and then says nothing must not hold
// the issuer's join slot (and a goroutine) beyond the exchange's bound.
func TestServeBoundedByContext(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, b, tls.ConnectionState{}, &federationv1.JoinOffer{}, func(context.Context, *federationv1.JoinRequest, []byte) (*federationv1.JoinResult, error) {
			return nil, errors.New("unreachable")
		}, nil)
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Serve succeeded with a silent joiner")
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Serve still waiting for a silent joiner after its context ended")
	}
}
