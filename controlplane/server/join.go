package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/store"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/federation/join"
	"github.com/straitmesh/strait/federation/token"
)

// IntermediateSigner signs cluster intermediates: the root authority.
type IntermediateSigner interface {
	SignIntermediate(ctx context.Context, cluster string, csr []byte, ttl time.Duration) (*x509.Certificate, error)
}

// gatewayAddrs returns the QUIC addresses of this cluster's live gateways.
func (s *Server) gatewayAddrs() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, g := range s.gateways {
		if g.streams > 0 {
			for _, a := range g.peerAddrs {
				if !slices.Contains(out, a) {
					out = append(out, a)
				}
			}
		}
	}
	slices.Sort(out)
	return out
}

func (f federationServer) CreateJoinToken(ctx context.Context, req *controlplanev1.CreateJoinTokenRequest) (*controlplanev1.CreateJoinTokenResponse, error) {
	s := f.s
	if fc := req.GetForCluster(); fc != "" {
		if err := identity.ValidateClusterName(fc); err != nil {
			return nil, fmt.Errorf("%w: for_cluster: %w", ErrBadRequest, err)
		}
		if fc == s.cfg.Cluster {
			return nil, fmt.Errorf("%w: for_cluster %q is this cluster", ErrBadRequest, fc)
		}
	}
	addrs := s.gatewayAddrs()
	if len(addrs) == 0 {
		return nil, fmt.Errorf("%w: no gateway of cluster %s is connected; a token carries the gateway addresses, start the gateway first", ErrUnavailable, s.cfg.Cluster)
	}
	if len(addrs) > token.MaxGatewayAddrs {
		addrs = addrs[:token.MaxGatewayAddrs]
	}
	b := s.cfg.Bundle()
	digest, err := token.ParseBundleDigest(b.Digest())
	if err != nil {
		return nil, err
	}
	tok, err := token.New(token.Params{
		Issuer: s.cfg.Cluster, TrustDomain: s.cfg.TrustDomain, GatewayAddrs: addrs, BundleDigest: digest,
		TTL: req.GetTtl().AsDuration(), ForCluster: req.GetForCluster(), Now: s.cfg.Clock,
	})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	hash := tok.SecretHash()
	rec := store.JoinTokenRecord{ID: tok.ID().String(), SecretHash: hash[:], ForCluster: tok.ForCluster(), BundleDigest: b.Digest(), Created: tok.IssuedAt(), Expires: tok.ExpiresAt()}
	if err := s.cfg.Store.PutJoinToken(rec); err != nil {
		return nil, err
	}
	s.log.Info("join token created", "token", tok.ID().String(), "for_cluster", tok.ForCluster(), "expires", tok.ExpiresAt().Format(time.RFC3339))
	return &controlplanev1.CreateJoinTokenResponse{Token: tok.String(), Info: tokenInfo(rec, s.cfg.Clock())}, nil
}

func tokenInfo(r store.JoinTokenRecord, now time.Time) *controlplanev1.JoinTokenInfo {
	ti := &controlplanev1.JoinTokenInfo{Id: r.ID, ForCluster: r.ForCluster, Created: timestamppb.New(r.Created), Expires: timestamppb.New(r.Expires), State: r.State(now), UsedBy: r.UsedBy}
	if !r.UsedAt.IsZero() {
		ti.UsedAt = timestamppb.New(r.UsedAt)
	}
	return ti
}

func (f federationServer) ListJoinTokens(ctx context.Context, _ *controlplanev1.ListJoinTokensRequest) (*controlplanev1.ListJoinTokensResponse, error) {
	recs, err := f.s.cfg.Store.JoinTokens()
	if err != nil {
		return nil, err
	}
	resp := &controlplanev1.ListJoinTokensResponse{}
	now := f.s.cfg.Clock()
	for _, r := range recs {
		resp.Tokens = append(resp.Tokens, tokenInfo(r, now))
	}
	return resp, nil
}

func (f federationServer) RevokeJoinToken(ctx context.Context, req *controlplanev1.RevokeJoinTokenRequest) (*controlplanev1.RevokeJoinTokenResponse, error) {
	id, err := token.ParseID(req.GetId())
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	if err := f.s.cfg.Store.RevokeJoinToken(id.String()); err != nil {
		return nil, err
	}
	f.s.log.Info("join token revoked", "token", id.String())
	return &controlplanev1.RevokeJoinTokenResponse{}, nil
}

// publicRefusal marks a refusal whose text is written for the joiner (it
// names nothing the joiner may not know): it is sent as it is, where any
// other refusal is told by its reason only (join.PublicMessage).
type publicRefusal struct{ err error }

func (p *publicRefusal) Error() string { return p.err.Error() }
func (p *publicRefusal) Unwrap() error { return p.err }

// AuditJoinRefusal records a join the gateway refused inside the exchange,
// before RedeemJoin was asked: every attempt is in the audit log. The
// joiner's claims are unauthenticated and cut short (the store cuts them
// again, and the detail).
func (f federationServer) AuditJoinRefusal(ctx context.Context, req *controlplanev1.AuditJoinRefusalRequest) (*controlplanev1.AuditJoinRefusalResponse, error) {
	s := f.s
	reason := join.Clip(req.GetReason(), join.MaxClaim)
	if reason == "" {
		reason = "internal"
	}
	detail := join.Clip(req.GetDetail(), maxRefusalDetail)
	r := store.Redemption{TokenID: join.Clip(req.GetTokenId(), join.MaxClaim), Joiner: join.Clip(req.GetCluster(), join.MaxClaim), Remote: join.Clip(req.GetRemote(), join.MaxClaim)}
	s.log.Warn("join refused by the gateway", "token", r.TokenID, "joiner", r.Joiner, "remote", r.Remote, "reason", reason, "err", detail)
	if err := s.cfg.Store.AuditJoinRefusal(r, fmt.Errorf("refused by the gateway (%s): %s", reason, detail)); err != nil {
		return nil, err
	}
	return &controlplanev1.AuditJoinRefusalResponse{}, nil
}

// maxRefusalDetail bounds the detail of a refusal a gateway reports.
const maxRefusalDetail = 512

// refusal maps a redemption error to the reason the joiner is told.
func refusal(err error) string {
	switch {
	case errors.Is(err, store.ErrJoinTokenUnknown):
		return string(token.ReasonUnknown)
	case errors.Is(err, store.ErrJoinTokenUsed):
		return string(token.ReasonAlreadyUsed)
	case errors.Is(err, store.ErrJoinTokenRevoked):
		return string(token.ReasonRevoked)
	case errors.Is(err, store.ErrJoinTokenSuperseded):
		return string(token.ReasonSuperseded)
	case errors.Is(err, store.ErrJoinTokenExpired):
		return string(token.ReasonExpired)
	case errors.Is(err, store.ErrLinkExists):
		return "conflict"
	}
	if r := token.ReasonOf(err); r != "" {
		return string(r)
	}
	return "internal"
}

func (f federationServer) RedeemJoin(ctx context.Context, req *controlplanev1.RedeemJoinRequest) (*controlplanev1.RedeemJoinResponse, error) {
	s := f.s
	jr := req.GetJoin()
	// The joiner is unauthenticated: it is told the reason in public
	// terms; err (store errors, the signer's, who used a token when) goes
	// to the log and the audit log only.
	refuse := func(err error) (*controlplanev1.RedeemJoinResponse, error) {
		s.log.Warn("join refused", "token", join.Clip(jr.GetTokenId(), join.MaxClaim), "joiner", join.Clip(jr.GetCluster(), join.MaxClaim), "remote", join.Clip(req.GetRemote(), join.MaxClaim), "err", err)
		reason := refusal(err)
		msg := join.PublicMessage(reason)
		var pe *publicRefusal
		if errors.As(err, &pe) {
			msg = pe.Error()
		}
		return &controlplanev1.RedeemJoinResponse{Result: &federationv1.JoinResult{Error: msg, Reason: reason}}, nil
	}
	// Refusals before the store is asked are audited here; the store
	// audits its own.
	refuseEarly := func(err error) (*controlplanev1.RedeemJoinResponse, error) {
		if aerr := s.cfg.Store.AuditJoinRefusal(store.Redemption{TokenID: jr.GetTokenId(), Joiner: jr.GetCluster(), Remote: req.GetRemote()}, err); aerr != nil {
			s.log.Error("audit a refused join", "err", aerr)
		}
		return refuse(err)
	}
	if err := identity.ValidateClusterName(jr.GetCluster()); err != nil {
		return refuseEarly(token.Errorf(token.ReasonMalformed, "joiner cluster: %v", err))
	}
	if jr.GetCluster() == s.cfg.Cluster {
		return refuseEarly(&publicRefusal{token.Errorf(token.ReasonWrongCluster, "a cluster cannot join itself")})
	}
	id, err := token.ParseID(jr.GetTokenId())
	if err != nil {
		return refuseEarly(err)
	}
	tokenID := id.String() // canonical: the caller's form may be padded or upper case
	if len(jr.GetGatewayAddresses()) > token.MaxGatewayAddrs {
		return refuseEarly(token.Errorf(token.ReasonMalformed, "%d gateway addresses, more than %d", len(jr.GetGatewayAddresses()), token.MaxGatewayAddrs))
	}
	for _, a := range jr.GetGatewayAddresses() {
		if err := checkHostPort("gateway address", a); err != nil {
			return refuseEarly(token.Errorf(token.ReasonMalformed, "%v", err))
		}
	}
	b := s.cfg.Bundle()
	var linkID [8]byte
	rand.Read(linkID[:])
	var chain []*x509.Certificate
	now := s.cfg.Clock()
	rec, err := s.cfg.Store.RedeemJoinToken(store.Redemption{
		TokenID: tokenID, Joiner: jr.GetCluster(), Remote: req.GetRemote(),
		Proof: func(r store.JoinTokenRecord) error {
			var hash [32]byte
			copy(hash[:], r.SecretHash)
			if !token.VerifyProof(hash, req.GetChannelBinding(), jr.GetCluster(), jr.GetProof()) {
				return token.Errorf(token.ReasonBadProof, "the proof does not match this token on this channel")
			}
			return nil
		},
		Check: func(r store.JoinTokenRecord) error {
			// The gateway gives up on the joiner's behalf when its
			// connection goes away or the exchange takes too long, and
			// tells it the join failed: nothing may change then. (The
			// write lock held here may have been waited for.)
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("the joiner's request was abandoned before it was redeemed (its connection closed or the issuer's gateway gave up): %w", err)
			}
			if r.ForCluster != "" && r.ForCluster != jr.GetCluster() {
				// Told after the proof only: to the token's holder.
				return &publicRefusal{token.Errorf(token.ReasonWrongCluster, "the token is for cluster %s, not %s", r.ForCluster, jr.GetCluster())}
			}
			if r.BundleDigest != "" && r.BundleDigest != b.Digest() {
				return &publicRefusal{token.Errorf(token.ReasonSuperseded, "the issuer's trust bundle changed since the token was made; create a new token")}
			}
			if len(jr.GetIntermediateCsr()) == 0 {
				return nil
			}
			if s.cfg.RootAuthority == nil {
				return &publicRefusal{token.Errorf(token.ReasonWrongCluster, "cluster %s is not the root authority and cannot issue an intermediate; join with a token of the root authority's cluster", s.cfg.Cluster)}
			}
			c, err := s.cfg.RootAuthority.SignIntermediate(ctx, jr.GetCluster(), jr.GetIntermediateCsr(), 0)
			if err != nil {
				return fmt.Errorf("sign the intermediate: %w", err)
			}
			chain = []*x509.Certificate{c}
			return nil
		},
		Link: store.Link{ID: hex.EncodeToString(linkID[:]), Peer: jr.GetCluster(), PeerGateways: jr.GetGatewayAddresses(), Role: "issuer", Created: now},
	})
	if err != nil {
		return refuse(err)
	}
	s.log.Info("cluster joined", "peer", jr.GetCluster(), "token", rec.ID, "remote", req.GetRemote(), "intermediate_issued", chain != nil)
	res := &federationv1.JoinResult{LinkId: hex.EncodeToString(linkID[:]), Cluster: s.cfg.Cluster, GatewayAddresses: s.gatewayAddrs(), BundlePem: b.MarshalPEM(), BundleSequence: b.Sequence()}
	for _, c := range chain {
		res.IntermediateChain = append(res.IntermediateChain, c.Raw)
	}
	return &controlplanev1.RedeemJoinResponse{Result: res}, nil
}

func (f federationServer) Join(ctx context.Context, req *controlplanev1.JoinRequest) (*controlplanev1.JoinResponse, error) {
	s := f.s
	tok, err := token.Parse(req.GetToken())
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	if tok.TrustDomain() != s.cfg.TrustDomain {
		return nil, fmt.Errorf("%w: the token is for trust domain %s; this cluster is in %s", ErrBadRequest, tok.TrustDomain().Name(), s.cfg.TrustDomain.Name())
	}
	cert := s.cert.Load()
	// A cluster with an intermediate joins the mesh of its own root only:
	// judged on the offer, before the token is proved and consumed.
	checkOffer := func(b *bundle.Bundle) error {
		if !sharesRoot(s.cfg.Bundle().Roots(), b.Roots()) {
			return fmt.Errorf("%w: %s's trust bundle shares no root with this cluster's: they are different meshes (a cluster installed pending can join any)", ErrPermissionDenied, tok.Issuer())
		}
		return nil
	}
	res, err := join.Dial(ctx, join.Request{Token: tok, Cluster: s.cfg.Cluster, GatewayAddrs: s.gatewayAddrs(), BundleDigest: s.cfg.Bundle().Digest(), Certificate: cert, Clock: s.cfg.Clock, CheckOffer: checkOffer})
	if err != nil {
		var refused *join.RefusedError
		if errors.Is(err, ErrPermissionDenied) {
			return nil, err
		}
		if errors.As(err, &refused) || token.ReasonOf(err) != "" {
			return nil, fmt.Errorf("%w: %w", ErrPermissionDenied, err)
		}
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	peers := res.GetGatewayAddresses()
	if len(peers) == 0 {
		peers = tok.GatewayAddrs()
	}
	l := store.Link{ID: res.GetLinkId(), Peer: res.GetCluster(), PeerGateways: peers, Role: "joiner", Created: s.cfg.Clock()}
	if err := s.cfg.Store.PutLink(l); err != nil {
		return nil, err
	}
	s.log.Info("joined", "peer", l.Peer, "link", l.ID)
	return &controlplanev1.JoinResponse{Link: linkProto(l)}, nil
}

func sharesRoot(a, b []*x509.Certificate) bool {
	for _, x := range a {
		for _, y := range b {
			if bytes.Equal(x.Raw, y.Raw) {
				return true
			}
		}
	}
	return false
}

func (f federationServer) AuditLog(ctx context.Context, req *controlplanev1.AuditLogRequest) (*controlplanev1.AuditLogResponse, error) {
	limit := int(req.GetLimit())
	if limit <= 0 {
		limit = 100
	}
	limit = min(limit, 10000)
	events, err := f.s.cfg.Store.AuditLog(limit)
	if err != nil {
		return nil, err
	}
	resp := &controlplanev1.AuditLogResponse{}
	for _, e := range events {
		resp.Events = append(resp.Events, &controlplanev1.AuditEvent{Time: timestamppb.New(e.Time), Event: e.Event, TokenId: e.TokenID, Peer: e.Peer, Remote: e.Remote, Detail: e.Detail})
	}
	return resp, nil
}
