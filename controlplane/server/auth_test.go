package server

import (
	"context"
	"crypto/tls"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// TestClusterScopedCallersNeedTheirClustersIntermediate: an admin or
// gateway SVID of this cluster signed by another cluster's intermediate
// (any intermediate of the mesh may sign any SPIFFE ID) is refused; the
// same identity signed by this cluster's own is served.
func TestClusterScopedCallersNeedTheirClustersIntermediate(t *testing.T) {
	e := newTestEnv(t) // cluster "east"
	west := e.ca.IssuerFor(t, "west")
	info := &grpc.UnaryServerInfo{FullMethod: controlplanev1.AdminService_CreateRegistrationToken_FullMethodName}
	served := 0
	handler := func(context.Context, any) (any, error) { served++; return &controlplanev1.CreateRegistrationTokenResponse{}, nil }
	call := func(id string, forged bool) error {
		s := e.ca.SVID(t, id, time.Hour)
		if forged {
			var err error
			if s, err = west.MintSVID(spiffeid.RequireFromString(id), time.Hour); err != nil {
				t.Fatal(err)
			}
		}
		ctx := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{PeerCertificates: s.Certificates}}})
		_, err := e.srv.unaryInterceptor(ctx, &controlplanev1.CreateRegistrationTokenRequest{Namespace: "default", ServiceAccount: "backend"}, info, handler)
		return err
	}
	admin := "spiffe://" + testTD + "/cluster/east/admin"
	if err := call(admin, true); err == nil {
		t.Fatalf("east's admin API served an admin SVID signed by west's intermediate: %v", err)
	}
	if err := call(admin, false); err != nil {
		t.Fatalf("east's own admin SVID: %v", err)
	}
	if served != 1 {
		t.Errorf("the handler ran %d times, want once", served)
	}
	info.FullMethod = controlplanev1.FederationService_ReportPeers_FullMethodName
	if err := call("spiffe://"+testTD+"/cluster/east/gateway", true); err == nil {
		t.Error("east's federation API served a gateway SVID signed by west's intermediate")
	}
}
