package agent

import (
	"context"
	"crypto/tls"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/client"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// fedCP is a control plane's FederationService: WatchGateway streams the
// snapshots it is given (a nil one ends the stream), ReportPeers passes
// each report on.
type fedCP struct {
	controlplanev1.UnimplementedFederationServiceServer
	snaps   chan *controlplanev1.GatewaySnapshot
	reports chan *controlplanev1.ReportPeersRequest
}

func (f *fedCP) WatchGateway(_ *controlplanev1.WatchGatewayRequest, stream controlplanev1.FederationService_WatchGatewayServer) error {
	for {
		select {
		case <-stream.Context().Done():
			return nil
		case s := <-f.snaps:
			if s == nil {
				return nil
			}
			if err := stream.Send(&controlplanev1.WatchGatewayResponse{Snapshot: s}); err != nil {
				return err
			}
		}
	}
}

func (f *fedCP) ReportPeers(_ context.Context, req *controlplanev1.ReportPeersRequest) (*controlplanev1.ReportPeersResponse, error) {
	f.reports <- req
	return &controlplanev1.ReportPeersResponse{}, nil
}

func (f *fedCP) next(t *testing.T, what string) *controlplanev1.ReportPeersRequest {
	t.Helper()
	select {
	case r := <-f.reports:
		return r
	case <-time.After(10 * time.Second):
		t.Fatalf("no report %s", what)
		return nil
	}
}

func startFedCP(t *testing.T, c *catest.CA) (*fedCP, string) {
	t.Helper()
	s := c.SVID(t, "spiffe://example.org/cluster/east/controlplane", time.Hour)
	cert := tls.Certificate{Leaf: s.Certificates[0], PrivateKey: s.PrivateKey}
	for _, c := range s.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		ClientAuth: tls.RequestClientCert})))
	f := &fedCP{snaps: make(chan *controlplanev1.GatewaySnapshot, 4), reports: make(chan *controlplanev1.ReportPeersRequest, 16)}
	controlplanev1.RegisterFederationServiceServer(srv, f)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return f, ln.Addr().String()
}

// The gateway follows its snapshots' reissue hints and relay messages, and
// reports the bundle it holds and its SVID's issuer: at once when they
// change (the heartbeat here is an hour) and again on every new
// configuration stream, whose control plane side starts without a report.
func TestWatchAndReport(t *testing.T) {
	a, _ := testAgent(t)
	c := catest.New(t, "example.org")
	// The agent's credentials trust another test CA: the control plane
	// presents an SVID of that one.
	if _, err := a.cfg.Creds.SetBundle(c.Bundle()); err != nil {
		t.Fatal(err)
	}
	f, addr := startFedCP(t, c)
	a.id = &client.Identity{ControlPlane: addr, Creds: a.cfg.Creds}
	if err := a.id.Connect(); err != nil {
		t.Fatal(err)
	}
	defer a.id.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 3)
	for _, run := range []func(){
		func() { a.watchLoop(ctx, "127.0.0.1:1") },
		func() { a.reportLoop(ctx) },
		func() { a.credentialsLoop(ctx) },
	} {
		go func() { run(); done <- struct{}{} }()
	}
	defer func() {
		cancel()
		for range 3 {
			<-done
		}
	}()

	snap := &controlplanev1.GatewaySnapshot{Cluster: "east", Links: []*controlplanev1.Link{{Peer: "west"}, {Peer: "south"}}, // as testAgent's
		Reissue:  &controlplanev1.Reissue{Issuer: "sha256:00", Window: durationpb.New(time.Minute)},
		Rotation: &federationv1.RotationReport{Cluster: "east", Nodes: 2}}
	f.snaps <- snap
	r := f.next(t, "after the first snapshot")
	if want := a.cfg.Creds.Bundle().Digest(); r.GetBundleDigest() != want {
		t.Errorf("bundle digest %q, want %q", r.GetBundleDigest(), want)
	}
	if want := svid.IssuerFingerprint(a.cfg.Creds.SVID().Certificates); r.GetSvidIssuer() != want {
		t.Errorf("SVID issuer %q, want %q", r.GetSvidIssuer(), want)
	}
	if a.id.PendingReissue().IsZero() {
		t.Error("the snapshot's reissue hint scheduled no renewal")
	}
	if _, _, rr := a.out.forPeer("west"); rr.GetNodes() != 2 {
		t.Errorf("rotation to relay: %v, want the snapshot's", rr)
	}

	// A new bundle is reported at once.
	other := catest.New(t, "example.org")
	if _, err := a.cfg.Creds.SetBundle(other.Bundle()); err != nil {
		t.Fatal(err)
	}
	for r = f.next(t, "after the bundle changed"); r.GetBundleDigest() != other.Bundle().Digest(); r = f.next(t, "with the new bundle") {
	}

	// The configuration stream ends and comes back: the same report again,
	// and the control streams to the peers carry on (they belong to the
	// agent, not to one configuration stream).
	a.mu.Lock()
	west := a.peers["west"]
	a.mu.Unlock()
	f.snaps <- nil
	f.snaps <- snap
	if r = f.next(t, "on a new configuration stream"); r.GetBundleDigest() != other.Bundle().Digest() {
		t.Errorf("report on the new stream: bundle digest %q, want %q", r.GetBundleDigest(), other.Bundle().Digest())
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.peers["west"] != west || west.outCtx == nil || west.outCtx.Err() != nil {
		t.Error("the control stream to west ended with the configuration stream")
	}
}
