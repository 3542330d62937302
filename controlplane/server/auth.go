package server

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/store"
)

// Issuer signs SVIDs with the cluster's intermediate.
type Issuer interface {
	// IssueSVID signs csr (DER) for id, the identity the caller proved.
	// Errors wrapping ErrBadRequest are the caller's fault.
	IssueSVID(csr []byte, id spiffeid.ID, ttl time.Duration) ([]*x509.Certificate, error)
	// CheckRequest returns the error IssueSVID would return for csr and
	// id, without signing.
	CheckRequest(csr []byte, id spiffeid.ID) error
	// MintSVID issues an SVID with a key generated here (the control
	// plane's own serving identity).
	MintSVID(id spiffeid.ID, ttl time.Duration) (*x509svid.SVID, error)
}

// Authenticator turns a first-contact credential into the identity it
// proves. It returns ErrNotApplicable for credentials of another kind.
type Authenticator interface {
	Authenticate(ctx context.Context, cred *controlplanev1.Credential) (spiffeid.ID, error)
}

// CheckingAuthenticator is an Authenticator whose credential is spent by
// use: it consumes it only if accept, given the identity it proves,
// returns nil (and returns that error otherwise, the credential intact).
// key is a digest of the public key the credential is spent for: the
// same credential presented again for the same key may prove the same
// identity again (a retry whose answer was lost).
type CheckingAuthenticator interface {
	Authenticator
	AuthenticateIf(ctx context.Context, cred *controlplanev1.Credential, key []byte, accept func(spiffeid.ID) error) (spiffeid.ID, error)
}

// Errors the edge maps to status codes.
var (
	ErrBadRequest       = errors.New("server: invalid request")
	ErrNotApplicable    = errors.New("server: credential kind not handled")
	ErrUnauthenticated  = errors.New("server: unauthenticated")
	ErrPermissionDenied = errors.New("server: permission denied")
	ErrUnavailable      = errors.New("server: unavailable")
)

// TokenAuthenticator redeems single-use workload registration tokens.
type TokenAuthenticator struct {
	Store       *store.Store
	TrustDomain spiffeid.TrustDomain
	// Log receives a line for each repeated redemption; nil logs nothing.
	Log *slog.Logger
}

// Authenticate implements Authenticator.
func (a *TokenAuthenticator) Authenticate(ctx context.Context, cred *controlplanev1.Credential) (spiffeid.ID, error) {
	return a.AuthenticateIf(ctx, cred, nil, nil)
}

// AuthenticateIf implements CheckingAuthenticator: the token is spent only
// if accept (nil accepts) takes the identity it names, and a spent token
// is taken again, until it expires, for the key it was spent for.
func (a *TokenAuthenticator) AuthenticateIf(_ context.Context, cred *controlplanev1.Credential, key []byte, accept func(spiffeid.ID) error) (spiffeid.ID, error) {
	tok := cred.GetRegistrationToken()
	if tok == "" {
		return spiffeid.ID{}, ErrNotApplicable
	}
	var id spiffeid.ID
	var refused error
	rec, err := a.Store.RedeemTokenIf(tok, key, func(rec store.TokenRecord) error {
		var err error
		if id, err = identity.Workload(a.TrustDomain, rec.Namespace, rec.ServiceAccount); err != nil {
			return fmt.Errorf("%w: registration token names an invalid identity: %w", ErrUnauthenticated, err)
		}
		if accept != nil {
			if refused = accept(id); refused != nil {
				return refused
			}
		}
		return nil
	})
	switch {
	case refused != nil:
		return id, refused
	case errors.Is(err, ErrUnauthenticated):
		return spiffeid.ID{}, err
	case err != nil:
		return spiffeid.ID{}, fmt.Errorf("%w: registration token: %w", ErrUnauthenticated, err)
	}
	if rec.Repeated && a.Log != nil {
		a.Log.Info("registration token redeemed again for the key it was first redeemed for", "token", rec.ID, "spiffe_id", id.String(), "first_used", rec.UsedAt.Format(time.RFC3339))
	}
	return id, nil
}

type callerKey struct{}

// caller is the verified identity of an RPC's peer.
type caller struct {
	id   spiffeid.ID
	info identity.Info
	leaf *x509.Certificate
}

// callerFrom returns the verified caller, if the peer presented an SVID.
func callerFrom(ctx context.Context) (*caller, bool) {
	c, ok := ctx.Value(callerKey{}).(*caller)
	return c, ok
}

// authenticate verifies the peer's chain now, against the current bundle:
// a connection opened under a root since removed, or with an SVID since
// expired, authenticates nothing.
func (s *Server) authenticate(ctx context.Context) (context.Context, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return ctx, nil
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.PeerCertificates) == 0 {
		return ctx, nil
	}
	id, _, err := s.verifier.Verify(ti.State.PeerCertificates, svid.RoleClient)
	if err != nil {
		s.metrics.authFailures.WithLabelValues(string(svid.ReasonOf(err))).Inc()
		return ctx, fmt.Errorf("%w: %w", ErrUnauthenticated, err)
	}
	return context.WithValue(ctx, callerKey{}, &caller{id: id, info: identity.Classify(id), leaf: ti.State.PeerCertificates[0]}), nil
}

// authorize applies the per-service rule: who may call what.
func (s *Server) authorize(ctx context.Context, method string) error {
	c, ok := callerFrom(ctx)
	switch method {
	case controlplanev1.IdentityService_Certify_FullMethodName:
		return nil // token or SVID, checked in Certify
	case controlplanev1.DiscoveryService_Register_FullMethodName,
		controlplanev1.DiscoveryService_ReportHealth_FullMethodName,
		controlplanev1.DiscoveryService_Deregister_FullMethodName,
		controlplanev1.DiscoveryService_Watch_FullMethodName:
		if !ok {
			return fmt.Errorf("%w: %s requires mTLS with a workload SVID", ErrUnauthenticated, method)
		}
		if c.info.Kind != identity.KindWorkload {
			return fmt.Errorf("%w: %s is a %s identity, not a workload", ErrPermissionDenied, c.id, c.info.Kind)
		}
		return nil
	case controlplanev1.FederationService_WatchGateway_FullMethodName,
		controlplanev1.FederationService_ReportPeers_FullMethodName,
		controlplanev1.FederationService_RedeemJoin_FullMethodName,
		controlplanev1.FederationService_AuditJoinRefusal_FullMethodName:
		if !ok {
			return fmt.Errorf("%w: %s requires mTLS with this cluster's gateway SVID", ErrUnauthenticated, method)
		}
		if c.info.Kind != identity.KindGateway || c.info.Cluster != s.cfg.Cluster {
			return fmt.Errorf("%w: %s is not a gateway of cluster %s", ErrPermissionDenied, c.id, s.cfg.Cluster)
		}
		return nil
	default:
		if !ok {
			return fmt.Errorf("%w: %s requires mTLS with an admin SVID", ErrUnauthenticated, method)
		}
		if c.info.Kind != identity.KindAdmin || c.info.Cluster != s.cfg.Cluster {
			return fmt.Errorf("%w: %s is not an admin of cluster %s", ErrPermissionDenied, c.id, s.cfg.Cluster)
		}
		return nil
	}
}

func (s *Server) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	ctx, err := s.authenticate(ctx)
	if err == nil {
		err = s.authorize(ctx, info.FullMethod)
	}
	if err != nil {
		s.log.Info("rpc refused", "method", info.FullMethod, "err", err)
		return nil, toStatus(err)
	}
	resp, err := handler(ctx, req)
	return resp, toStatus(err)
}

type wrappedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (w *wrappedStream) Context() context.Context { return w.ctx }

func (s *Server) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx, err := s.authenticate(ss.Context())
	if err == nil {
		err = s.authorize(ctx, info.FullMethod)
	}
	if err != nil {
		s.log.Info("rpc refused", "method", info.FullMethod, "err", err)
		return toStatus(err)
	}
	return toStatus(handler(srv, &wrappedStream{ServerStream: ss, ctx: ctx}))
}
