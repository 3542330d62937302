package wiring

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/local"
	"github.com/straitmesh/strait/controlplane/store"
	"github.com/straitmesh/strait/federation/join"
	"github.com/straitmesh/strait/federation/token"
)

// runPending serves a pending cluster's control plane on ln until a join
// gives it its intermediate (it then returns nil, and the caller starts
// the full control plane) or ctx ends. Only the admin authenticated by the
// data directory's bootstrap CA may call it, and only Join,
// FederationStatus and Status are served.
func runPending(ctx context.Context, p *local.Pending, ln net.Listener, log *slog.Logger, clock func() time.Time) error {
	st, err := store.Open((&local.Dir{Path: p.Path}).StorePath(), store.Options{Logger: log, Clock: clock})
	if err != nil {
		return err
	}
	defer st.Close()
	cert, err := p.ServingCertificate()
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AddCert(p.CA)
	adminID, err := identity.Admin(p.TrustDomain, p.Cluster)
	if err != nil {
		return err
	}
	tc := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{*cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		NextProtos:   []string{"h2"},
		VerifyConnection: func(cs tls.ConnectionState) error {
			leaf := cs.PeerCertificates[0]
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != adminID.String() {
				return fmt.Errorf("only %s may use a pending control plane", adminID)
			}
			return nil
		},
	}
	done := make(chan struct{})
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(tc)))
	ps := &pendingServer{p: p, st: st, log: log, clock: clock, done: done}
	controlplanev1.RegisterFederationServiceServer(srv, ps)
	controlplanev1.RegisterAdminServiceServer(srv, pendingAdmin{p: p})
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Info("control plane pending: waiting for `strait federation join TOKEN`", "cluster", p.Cluster, "address", ln.Addr().String())
	select {
	case <-ctx.Done():
		srv.Stop()
		return ctx.Err()
	case err := <-serveErr:
		return err
	case <-done:
	}
	// Let the Join response reach the CLI, then hand over.
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		srv.Stop()
	}
	return nil
}

type pendingServer struct {
	controlplanev1.UnimplementedFederationServiceServer
	p     *local.Pending
	st    *store.Store
	log   *slog.Logger
	clock func() time.Time
	done  chan struct{}
	// joining serializes Join: of concurrent calls one joins, the others
	// then find done closed.
	joining sync.Mutex
}

func (s *pendingServer) Join(ctx context.Context, req *controlplanev1.JoinRequest) (*controlplanev1.JoinResponse, error) {
	s.joining.Lock()
	defer s.joining.Unlock()
	select {
	case <-s.done:
		return nil, status.Error(codes.FailedPrecondition, "this cluster has joined already")
	default:
	}
	tok, err := token.Parse(req.GetToken())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if tok.TrustDomain() != s.p.TrustDomain {
		return nil, status.Errorf(codes.InvalidArgument, "the token is for trust domain %s; this cluster was installed for %s", tok.TrustDomain().Name(), s.p.TrustDomain.Name())
	}
	csr, err := s.p.CSR()
	if err != nil {
		return nil, err
	}
	res, err := join.Dial(ctx, join.Request{Token: tok, Cluster: s.p.Cluster, CSR: csr, Clock: s.clock})
	if err != nil {
		var refused *join.RefusedError
		if errors.As(err, &refused) || token.ReasonOf(err) != "" {
			return nil, status.Error(codes.PermissionDenied, err.Error())
		}
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	// The link first: the issuer has stored its side already, and a crash
	// after the intermediate is installed must not leave this side without
	// it.
	peers := res.GetGatewayAddresses()
	if len(peers) == 0 {
		peers = tok.GatewayAddrs()
	}
	l := store.Link{ID: res.GetLinkId(), Peer: res.GetCluster(), PeerGateways: peers, Role: "joiner", Created: s.clock()}
	if err := s.st.PutLink(l); err != nil {
		return nil, err
	}
	d, err := s.p.Complete(res.Intermediate, res.IssuerBundle)
	if err != nil {
		// The issuer has stored the link already: a new token is refused
		// as a conflict until it is removed there.
		return nil, status.Errorf(codes.Internal, "the join succeeded but installing the intermediate failed: %v (on %s, run `strait federation unlink %s`, then create a new token and join again)", err, res.GetCluster(), s.p.Cluster)
	}
	iss, err := NewIssuer(d, 0)
	if err != nil {
		return nil, err
	}
	if _, err := d.MintAdmin(iss, 24*time.Hour); err != nil {
		return nil, err
	}
	s.log.Info("joined the mesh; intermediate installed", "peer", l.Peer, "link", l.ID, "intermediate_expires", d.Chain[0].NotAfter.UTC().Format(time.RFC3339))
	close(s.done)
	return &controlplanev1.JoinResponse{Link: &controlplanev1.Link{Id: l.ID, Peer: l.Peer, PeerGatewayAddresses: l.PeerGateways, Role: l.Role}, ReceivedIntermediate: true}, nil
}

func (s *pendingServer) FederationStatus(ctx context.Context, _ *controlplanev1.FederationStatusRequest) (*controlplanev1.FederationStatusResponse, error) {
	return &controlplanev1.FederationStatusResponse{Cluster: s.p.Cluster, Pending: true}, nil
}

type pendingAdmin struct {
	controlplanev1.UnimplementedAdminServiceServer
	p *local.Pending
}

func (a pendingAdmin) Status(context.Context, *controlplanev1.StatusRequest) (*controlplanev1.StatusResponse, error) {
	return &controlplanev1.StatusResponse{Cluster: a.p.Cluster, TrustDomain: a.p.TrustDomain.Name()}, nil
}
