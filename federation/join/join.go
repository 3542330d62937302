// Package join is the protocol by which a cluster redeems a join token
// with the cluster that issued it, over a QUIC connection to one of the
// issuer's gateways negotiated with ALPN strait-join/1.
//
// The exchange, on one bidirectional stream, each message a 4-byte
// big-endian length and a protobuf (federation/api/v1):
//
//	joiner → issuer   JoinRequest{cluster}           hello: opens the stream
//	issuer → joiner   JoinOffer{bundle, cluster}
//	joiner            checks the offered bundle's digest against the one the
//	                  token pins, then the gateway's certificate chain
//	                  against that bundle and the issuer's gateway ID:
//	                  no trust on first use, and nothing secret sent before
//	joiner → issuer   JoinRequest{token id, proof, cluster, gateways, CSR?}
//	issuer → joiner   JoinResult{link, intermediate?, bundle} or an error
//
// The proof is federation/token's HMAC over the TLS exporter of this very
// connection: a request relayed to another connection proves nothing.
// The issuer's gateway does not judge the request itself; it hands it,
// with its side's exporter value, to its control plane, which checks the
// proof and consumes the token in one transaction.
package join

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/quic-go/quic-go"
	"google.golang.org/protobuf/proto"

	"github.com/straitmesh/strait/ca/bundle"
	"github.com/straitmesh/strait/ca/identity"
	"github.com/straitmesh/strait/ca/svid"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/federation/token"
	"github.com/straitmesh/strait/federation/wire"
	"github.com/straitmesh/strait/gateway/tunnel"
)

// MaxMessage bounds one message of the exchange.
const MaxMessage = 64 << 10

// Timeout bounds a whole exchange.
const Timeout = 30 * time.Second

// WriteMsg writes m as one frame (federation/wire).
func WriteMsg(w io.Writer, m proto.Message) error { return wire.Write(w, m, MaxMessage) }

// ReadMsg reads one frame of at most MaxMessage bytes into m.
func ReadMsg(r io.Reader, m proto.Message) error { return wire.Read(r, m, MaxMessage) }

// Request is what the joiner sends besides the token's proof.
type Request struct {
	Token   *token.Token
	Cluster string // the joining cluster
	// GatewayAddrs are the joiner's gateways (QUIC); may be empty when
	// they are not known yet (a pending cluster): the issuer learns them
	// when the joiner's gateway connects.
	GatewayAddrs []string
	// CSR asks for an intermediate (pending clusters only).
	CSR []byte
	// BundleDigest of the joiner's bundle, if it has one.
	BundleDigest string
	// Certificate, if set, is presented as a client certificate.
	Certificate *tls.Certificate
	// Clock; nil means time.Now.
	Clock func() time.Time
	// CheckOffer, if set, judges the issuer's bundle (whose digest matched
	// the token) before anything secret is sent: an error ends the join
	// with the token still unused.
	CheckOffer func(*bundle.Bundle) error
}

// Result is a successful join.
type Result struct {
	*federationv1.JoinResult
	// IssuerBundle is the bundle the issuer offered, whose digest matched
	// the token.
	IssuerBundle *bundle.Bundle
	// Intermediate is the joiner's new intermediate chain, if a CSR was sent.
	Intermediate []*x509.Certificate
}

// RefusedError is a join the issuer refused; Reason is a federation/token
// reason or "conflict"/"internal".
type RefusedError struct {
	Reason  string
	Message string
}

func (e *RefusedError) Error() string {
	return "join refused by the issuer: " + e.Message
}

// Unwrap gives the token error for a token reason, so token.ReasonOf and
// errors.Is with the token sentinels work on refusals too.
func (e *RefusedError) Unwrap() error {
	switch r := token.Reason(e.Reason); r {
	case "", "conflict", "internal":
		return nil
	default:
		return token.Errorf(r, "%s", e.Message)
	}
}

// Dial redeems req.Token with the issuer: it tries the token's gateway
// addresses in order.
func Dial(ctx context.Context, req Request) (*Result, error) {
	tok := req.Token
	if tok == nil {
		return nil, errors.New("join: no token")
	}
	clock := req.Clock
	if clock == nil {
		clock = time.Now
	}
	if err := tok.Check(clock(), req.Cluster, token.DefaultClockSkew); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, Timeout)
	defer cancel()
	tc := &tls.Config{
		MinVersion: tls.VersionTLS13,
		// The chain is checked after the issuer offered its bundle,
		// against that bundle once its digest matched the token's.
		InsecureSkipVerify: true,
		NextProtos:         []string{tunnel.ALPNJoin},
	}
	if req.Certificate != nil {
		tc.Certificates = []tls.Certificate{*req.Certificate}
	}
	var errs []error
	for _, addr := range tok.GatewayAddrs() {
		var presented bool
		res, err := dialOne(ctx, addr, tc, req, &presented)
		if err == nil {
			return res, nil
		}
		var refused *RefusedError
		if errors.As(err, &refused) || errors.Is(err, errPinMismatch) || errors.Is(err, errOfferRefused) {
			return nil, err // the issuer answered: another address will say the same
		}
		if presented {
			// The issuer may have redeemed the token (or refused it for
			// a reason this side never learned): on another address it
			// would only say "already used".
			return nil, &PresentedError{Addr: addr, Issuer: tok.Issuer(), Joiner: req.Cluster, Err: err}
		}
		errs = append(errs, fmt.Errorf("%s: %w", addr, err))
	}
	return nil, fmt.Errorf("join: no gateway of %s could be reached: %w", tok.Issuer(), errors.Join(errs...))
}

// PresentedError is a join that failed after the token's proof was sent
// to the issuer's gateway at Addr: whether the issuer redeemed it is not
// known, and the token is not tried on another address.
type PresentedError struct {
	Addr, Issuer, Joiner string
	Err                  error
}

func (e *PresentedError) Error() string {
	return fmt.Sprintf("join: the exchange with %s's gateway at %s failed after the token was presented (%v); "+
		"the issuer may have redeemed it, so it was not tried on another address: if `strait federation status` on %s lists a link to %s, "+
		"the join went through there only (remove that link with `strait federation unlink %s` on %s); either way create a new token and join again",
		e.Issuer, e.Addr, e.Err, e.Issuer, e.Joiner, e.Joiner, e.Issuer)
}

func (e *PresentedError) Unwrap() error { return e.Err }

var (
	errPinMismatch  = errors.New("the issuer's trust bundle does not match the digest the token pins")
	errOfferRefused = errors.New("join: the issuer's offer was refused")
)

// dialOne runs the exchange with one gateway address; presented is set
// once the proof has been handed to the connection.
func dialOne(ctx context.Context, addr string, tc *tls.Config, req Request, presented *bool) (*Result, error) {
	tok := req.Token
	conn, err := quic.DialAddr(ctx, addr, tc, &quic.Config{HandshakeIdleTimeout: 10 * time.Second, MaxIdleTimeout: Timeout})
	if err != nil {
		return nil, err
	}
	defer conn.CloseWithError(0, "")
	s, err := conn.OpenStreamSync(ctx)
	if err != nil {
		return nil, err
	}
	defer s.Close()
	if dl, ok := ctx.Deadline(); ok {
		s.SetDeadline(dl)
	}
	if err := WriteMsg(s, &federationv1.JoinRequest{Cluster: req.Cluster}); err != nil {
		return nil, err
	}
	var offer federationv1.JoinOffer
	if err := ReadMsg(s, &offer); err != nil {
		return nil, err
	}
	b, err := bundle.ParsePEM(tok.TrustDomain(), offer.GetBundleSequence(), offer.GetBundlePem())
	if err != nil {
		return nil, fmt.Errorf("join: the issuer offered an unreadable trust bundle: %w", err)
	}
	if b.Digest() != tok.BundleDigestString() {
		return nil, fmt.Errorf("join: %w (offered %s, pinned %s): the issuer rotated its roots since the token was made, or this is not the issuer", errPinMismatch, b.Digest(), tok.BundleDigestString())
	}
	cs := conn.ConnectionState().TLS
	v, err := svid.NewVerifier(svid.VerifierConfig{TrustDomain: tok.TrustDomain(), Bundles: b})
	if err != nil {
		return nil, err
	}
	want, err := identity.Gateway(tok.TrustDomain(), tok.Issuer())
	if err != nil {
		return nil, err
	}
	id, _, err := v.Verify(cs.PeerCertificates, svid.RoleServer)
	if err != nil {
		return nil, fmt.Errorf("join: the gateway's certificate does not verify against the pinned bundle: %w", err)
	}
	if id != want {
		return nil, fmt.Errorf("join: the gateway is %s, want %s", id, want)
	}
	if req.CheckOffer != nil {
		if err := req.CheckOffer(b); err != nil {
			return nil, fmt.Errorf("%w: %w", errOfferRefused, err)
		}
	}
	binding, err := token.ChannelBinding(&cs)
	if err != nil {
		return nil, err
	}
	jr := &federationv1.JoinRequest{
		TokenId: tok.ID().String(), Proof: tok.Proof(binding, req.Cluster), Cluster: req.Cluster,
		GatewayAddresses: req.GatewayAddrs, IntermediateCsr: req.CSR, BundleDigest: req.BundleDigest,
	}
	*presented = true
	if err := WriteMsg(s, jr); err != nil {
		return nil, err
	}
	var result federationv1.JoinResult
	if err := ReadMsg(s, &result); err != nil {
		return nil, err
	}
	if result.GetError() != "" {
		return nil, &RefusedError{Reason: result.GetReason(), Message: result.GetError()}
	}
	if result.GetCluster() != tok.Issuer() {
		return nil, fmt.Errorf("join: the issuer %s answered for cluster %q", tok.Issuer(), result.GetCluster())
	}
	res := &Result{JoinResult: &result, IssuerBundle: b}
	if len(req.CSR) > 0 {
		if len(result.GetIntermediateChain()) == 0 {
			return nil, errors.New("join: the issuer sent no intermediate for the CSR")
		}
		for _, der := range result.GetIntermediateChain() {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				return nil, fmt.Errorf("join: intermediate: %w", err)
			}
			res.Intermediate = append(res.Intermediate, c)
		}
	}
	if len(result.GetBundlePem()) > 0 {
		nb, err := bundle.ParsePEM(tok.TrustDomain(), result.GetBundleSequence(), result.GetBundlePem())
		if err != nil {
			return nil, fmt.Errorf("join: result bundle: %w", err)
		}
		if nb.Digest() != b.Digest() {
			return nil, errors.New("join: the result's bundle differs from the one offered")
		}
	}
	return res, nil
}

// Redeemer checks a join request received on a channel whose exporter
// value is binding, and answers it (the issuer's control plane). The
// result's error, if any, is sent to the joiner as it is: it must say
// nothing of the issuer's internals (see PublicMessage). An error the
// Redeemer returns is not sent: the joiner is told the issuer could not
// process the join.
type Redeemer func(ctx context.Context, req *federationv1.JoinRequest, binding []byte) (*federationv1.JoinResult, error)

// Refusal is a join Serve refused itself, inside the exchange, before the
// Redeemer was asked (or because it failed).
type Refusal struct {
	// TokenID and Cluster are what the joiner claimed, as far as it could
	// be read: unauthenticated, and cut to MaxClaim bytes.
	TokenID, Cluster string
	// Reason is what the joiner was told: a federation/token reason or
	// "internal".
	Reason string
	// Err says why, for the issuer's log and audit log; the joiner was
	// not told it.
	Err error
}

// Refuser records a Refusal: every join attempt, refused or not, is
// audited.
type Refuser func(ctx context.Context, r Refusal)

// MaxClaim bounds each unauthenticated claim in a Refusal.
const MaxClaim = 64

// Clip cuts s to at most n bytes on a character boundary, marking a cut
// with "...": for what an unauthenticated joiner claimed.
func Clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "..."
}

// clip is Clip to MaxClaim.
func clip(s string) string { return Clip(s, MaxClaim) }

// PublicMessage is what a joiner is told of a join refused for reason (a
// federation/token reason, "conflict" or "internal"): the reason in words
// and what to do, nothing of why in the issuer's terms (store or gRPC
// errors, who used a token when): that goes to the issuer's log and audit
// log.
func PublicMessage(reason string) string {
	switch r := token.Reason(reason); r {
	case token.ReasonMalformed:
		return "federation: the join request is malformed"
	case token.ReasonExpired, token.ReasonRevoked, token.ReasonSuperseded, token.ReasonAlreadyUsed, token.ReasonUnknown, token.ReasonWrongCluster:
		return token.Errorf(r, "create a new token on the issuing cluster").Error()
	case token.ReasonTruncated, token.ReasonTampered, token.ReasonUnsupportedVersion, token.ReasonNotYetValid, token.ReasonBadProof:
		return token.Errorf(r, "%s", "").Error()
	case "conflict":
		return "federation: the joining cluster is already linked with the issuer: remove that link there (strait federation unlink) before joining again"
	}
	return "federation: the issuer could not process the join (its control plane's log says why); try again later"
}

// Serve runs the issuer's side of one join stream: offer sends the
// issuer's bundle; the request is then passed to redeem. What Serve
// refuses itself (a malformed message, a request naming another cluster
// than its hello, a token sent in the hello before the joiner could check
// the offer, a redeem that failed) is told to the joiner with a public
// reason and passed to refused, if not nil; Serve then returns the
// refusal's detail.
//
// The exchange is bounded by Timeout and ctx: if s has SetDeadline (a
// QUIC stream, a net.Conn), a joiner that goes silent does not hold it
// longer.
func Serve(ctx context.Context, s io.ReadWriter, cs tls.ConnectionState, offer *federationv1.JoinOffer, redeem Redeemer, refused Refuser) error {
	ctx, cancel := context.WithTimeout(ctx, Timeout)
	defer cancel()
	if d, ok := s.(interface{ SetDeadline(time.Time) error }); ok {
		dl, _ := ctx.Deadline()
		d.SetDeadline(dl)
		stop := context.AfterFunc(ctx, func() { d.SetDeadline(time.Unix(1, 0)) })
		defer stop()
	}
	var claim *federationv1.JoinRequest // what is known of the joiner's claims
	refuse := func(reason token.Reason, public string, detail error) error {
		if public == "" {
			public = PublicMessage(string(reason))
		}
		werr := WriteMsg(s, &federationv1.JoinResult{Error: public, Reason: string(reason)})
		if refused != nil {
			refused(ctx, Refusal{TokenID: clip(claim.GetTokenId()), Cluster: clip(claim.GetCluster()), Reason: string(reason), Err: detail})
		}
		if werr != nil {
			return fmt.Errorf("join refused (%w); telling the joiner failed: %w", detail, werr)
		}
		return fmt.Errorf("join refused: %w", detail)
	}
	var hello federationv1.JoinRequest
	if err := ReadMsg(s, &hello); err != nil {
		if errors.Is(err, wire.ErrMalformed) {
			return refuse(token.ReasonMalformed, "federation: the join hello is malformed", fmt.Errorf("hello: %w", err))
		}
		return err
	}
	claim = &hello
	if hello.GetTokenId() != "" || len(hello.GetProof()) > 0 {
		// A joiner sends its proof only after it checked the offer (the
		// issuer's bundle and certificate): not before.
		return refuse(token.ReasonMalformed, "federation: the join hello carries a token: the proof goes in the request that follows the offer, once the joiner has checked it",
			fmt.Errorf("the hello carries a token ID or a proof, sent before the joiner could check the offer"))
	}
	if err := WriteMsg(s, offer); err != nil {
		return err
	}
	var req federationv1.JoinRequest
	if err := ReadMsg(s, &req); err != nil {
		if errors.Is(err, wire.ErrMalformed) {
			return refuse(token.ReasonMalformed, "federation: the join request is malformed", fmt.Errorf("request of %q: %w", clip(hello.GetCluster()), err))
		}
		return err
	}
	claim = &federationv1.JoinRequest{TokenId: req.GetTokenId(), Cluster: req.GetCluster()}
	if req.GetCluster() != hello.GetCluster() {
		return refuse(token.ReasonMalformed, "federation: the join request names another cluster than its hello",
			fmt.Errorf("the request names cluster %q, its hello %q", clip(req.GetCluster()), clip(hello.GetCluster())))
	}
	binding, err := token.ChannelBinding(&cs)
	if err != nil {
		return refuse("internal", "", fmt.Errorf("channel binding: %w", err))
	}
	res, err := redeem(ctx, &req, binding)
	if err == nil && res == nil {
		err = errors.New("no result")
	}
	if err != nil {
		return refuse("internal", "", fmt.Errorf("redeem: %w", err))
	}
	return WriteMsg(s, res)
}
