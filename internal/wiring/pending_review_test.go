package wiring

import (
	"context"
	"crypto/tls"
	"log/slog"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/local"
	"github.com/straitmesh/strait/controlplane/store"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/federation/join"
	"github.com/straitmesh/strait/federation/token"
	"github.com/straitmesh/strait/gateway/tunnel"
)

// Two Join calls at once on a pending control plane (the CLI retried, two
// admins) must not both install an intermediate and both end the pending
// state: the second must be told the cluster has joined, not crash the
// process closing done twice.
func TestPendingConcurrentJoins(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("strait.example")
	root := catest.New(t, td.Name())
	gwID, _ := identity.Gateway(td, "east")
	sv := root.SVID(t, gwID.String(), time.Hour)
	cert := tls.Certificate{PrivateKey: sv.PrivateKey, Leaf: sv.Certificates[0]}
	for _, x := range sv.Certificates {
		cert.Certificate = append(cert.Certificate, x.Raw)
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, NextProtos: []string{tunnel.ALPNJoin}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	b := root.Bundle()
	// The issuer answers once two requests arrived (or after a second).
	arrived := make(chan struct{}, 2)
	redeem := func(ctx context.Context, req *federationv1.JoinRequest, _ []byte) (*federationv1.JoinResult, error) {
		arrived <- struct{}{}
		deadline := time.After(time.Second)
		for len(arrived) < 2 {
			select {
			case <-deadline:
				goto answer
			case <-time.After(5 * time.Millisecond):
			}
		}
	answer:
		c, err := root.Authority.SignIntermediate(ctx, ca.IntermediateRequest{Cluster: req.GetCluster(), CSR: req.GetIntermediateCsr(), Replace: true})
		if err != nil {
			return nil, err
		}
		return &federationv1.JoinResult{LinkId: "01", Cluster: "east", BundlePem: b.MarshalPEM(), BundleSequence: b.Sequence(), IntermediateChain: [][]byte{c.Raw}}, nil
	}
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
				join.Serve(conn.Context(), s, conn.ConnectionState().TLS, &federationv1.JoinOffer{BundlePem: b.MarshalPEM(), BundleSequence: b.Sequence(), Cluster: "east"}, redeem, nil)
			}()
		}
	}()
	digest, _ := token.ParseBundleDigest(b.Digest())
	dir := t.TempDir()
	p, err := local.InitPending(dir, "west", td, false)
	if err != nil {
		t.Fatal(err)
	}
	st, err := store.Open(filepath.Join(t.TempDir(), "state.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ps := &pendingServer{p: p, st: st, log: slog.New(slog.DiscardHandler), clock: time.Now, done: make(chan struct{})}
	var wg sync.WaitGroup
	codesGot := make([]codes.Code, 2)
	for i := range 2 {
		tok, err := token.New(token.Params{Issuer: "east", TrustDomain: td, GatewayAddrs: []string{ln.Addr().String()}, BundleDigest: digest})
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			_, err := ps.Join(context.Background(), &controlplanev1.JoinRequest{Token: tok.String()})
			codesGot[i] = status.Code(err)
		})
	}
	wg.Wait()
	ok, already := 0, 0
	for _, c := range codesGot {
		switch c {
		case codes.OK:
			ok++
		case codes.FailedPrecondition:
			already++
		}
	}
	if ok != 1 || already != 1 {
		t.Fatalf("concurrent joins: codes %v, want one OK and one FailedPrecondition", codesGot)
	}
}
