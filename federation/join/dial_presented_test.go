package join

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/catest"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/federation/token"
)

// gatewayListener listens for joins as east's gateway; each stream gets
// the offer of c's bundle, then its request is passed to answer, which
// writes the result (or not). A nil answer closes each connection before
// the offer.
func gatewayListener(t *testing.T, c *catest.CA, answer func(conn *quic.Conn, s *quic.Stream, req *federationv1.JoinRequest)) string {
	t.Helper()
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
				if answer == nil {
					conn.CloseWithError(0, "")
					return
				}
				var hello, req federationv1.JoinRequest
				if ReadMsg(s, &hello) != nil || WriteMsg(s, &federationv1.JoinOffer{BundlePem: b.MarshalPEM(), BundleSequence: b.Sequence(), Cluster: "east"}) != nil || ReadMsg(s, &req) != nil {
					return
				}
				answer(conn, s, &req)
			}()
		}
	}()
	return ln.Addr().String()
}

// Once the proof has gone to one of the issuer's gateways, the token is
// not tried on the next: the issuer may have redeemed it (the connection
// was lost before its answer arrived), and the next gateway would answer
// "already used" instead of what happened. Before, Dial went on to the
// next address, where the token was presented a second time, and
// reported that gateway's "already used".
func TestDialStopsAfterTheProofWasSent(t *testing.T) {
	c := catest.New(t, testTD)
	var first, second atomic.Int32
	lost := gatewayListener(t, c, func(conn *quic.Conn, _ *quic.Stream, _ *federationv1.JoinRequest) {
		first.Add(1)
		conn.CloseWithError(0, "") // the issuer redeemed it (or not): the answer never arrives
	})
	next := gatewayListener(t, c, func(_ *quic.Conn, s *quic.Stream, _ *federationv1.JoinRequest) {
		second.Add(1)
		WriteMsg(s, &federationv1.JoinResult{Error: "federation: join token already used", Reason: string(token.ReasonAlreadyUsed)})
	})
	digest, err := token.ParseBundleDigest(c.Bundle().Digest())
	if err != nil {
		t.Fatal(err)
	}
	tok, err := token.New(token.Params{Issuer: "east", TrustDomain: spiffeid.RequireTrustDomainFromString(testTD), GatewayAddrs: []string{lost, next}, BundleDigest: digest})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err = Dial(ctx, Request{Token: tok, Cluster: "west"})
	if err == nil {
		t.Fatal("Dial succeeded")
	}
	if first.Load() != 1 {
		t.Fatalf("the first gateway got %d requests, want 1", first.Load())
	}
	if n := second.Load(); n != 0 {
		t.Errorf("the token was presented again on the next gateway (%d times) after the first connection was lost; Dial: %v", n, err)
	}
	if token.ReasonOf(err) == token.ReasonAlreadyUsed || !strings.Contains(err.Error(), lost) || !strings.Contains(err.Error(), "presented") ||
		!strings.Contains(err.Error(), "federation status") {
		t.Errorf("Dial: %v; want it to say the connection to %s failed after the token was presented, and how to find out what happened", err, lost)
	}
}

// Before the proof is sent, another address is still tried: nothing was
// spent.
func TestDialTriesNextAddressBeforeTheProof(t *testing.T) {
	c := catest.New(t, testTD)
	var redeemed atomic.Int32
	next := gatewayListener(t, c, func(_ *quic.Conn, s *quic.Stream, _ *federationv1.JoinRequest) {
		redeemed.Add(1)
		WriteMsg(s, &federationv1.JoinResult{Error: "no", Reason: string(token.ReasonRevoked)})
	})
	gone := gatewayListener(t, c, nil)
	digest, _ := token.ParseBundleDigest(c.Bundle().Digest())
	tok, err := token.New(token.Params{Issuer: "east", TrustDomain: spiffeid.RequireTrustDomainFromString(testTD), GatewayAddrs: []string{gone, next}, BundleDigest: digest})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer cancel()
	_, err = Dial(ctx, Request{Token: tok, Cluster: "west"})
	if token.ReasonOf(err) != token.ReasonRevoked || redeemed.Load() != 1 {
		t.Fatalf("Dial: %v (%d requests on the second address); want the second address's refusal", err, redeemed.Load())
	}
}
