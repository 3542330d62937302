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
		res, err := dialOne(ctx, addr, tc, req)
		if err == nil {
			return res, nil
		}
		var refused *RefusedError
		if errors.As(err, &refused) || errors.Is(err, errPinMismatch) || errors.Is(err, errOfferRefused) {
			return nil, err // the issuer answered: another address will say the same
		}
		errs = append(errs, fmt.Errorf("%s: %w", addr, err))
	}
	return nil, fmt.Errorf("join: no gateway of %s could be reached: %w", tok.Issuer(), errors.Join(errs...))
}

var (
	errPinMismatch  = errors.New("the issuer's trust bundle does not match the digest the token pins")
	errOfferRefused = errors.New("join: the issuer's offer was refused")
)

func dialOne(ctx context.Context, addr string, tc *tls.Config, req Request) (*Result, error) {
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
// value is binding, and answers it (the issuer's control plane).
type Redeemer func(ctx context.Context, req *federationv1.JoinRequest, binding []byte) (*federationv1.JoinResult, error)

// Serve runs the issuer's side of one join stream: offer sends the
// issuer's bundle; the request is then passed to redeem.
//
// The exchange is bounded by Timeout and ctx: if s has SetDeadline (a
// QUIC stream, a net.Conn), a joiner that goes silent does not hold it
// longer.
func Serve(ctx context.Context, s io.ReadWriter, cs tls.ConnectionState, offer *federationv1.JoinOffer, redeem Redeemer) error {
	ctx, cancel := context.WithTimeout(ctx, Timeout)
	defer cancel()
	if d, ok := s.(interface{ SetDeadline(time.Time) error }); ok {
		dl, _ := ctx.Deadline()
		d.SetDeadline(dl)
		stop := context.AfterFunc(ctx, func() { d.SetDeadline(time.Unix(1, 0)) })
		defer stop()
	}
	var hello federationv1.JoinRequest
	if err := ReadMsg(s, &hello); err != nil {
		return err
	}
	if err := WriteMsg(s, offer); err != nil {
		return err
	}
	var req federationv1.JoinRequest
	if err := ReadMsg(s, &req); err != nil {
		return err
	}
	if req.GetCluster() != hello.GetCluster() {
		return WriteMsg(s, &federationv1.JoinResult{Error: "the request names another cluster than its hello", Reason: string(token.ReasonMalformed)})
	}
	binding, err := token.ChannelBinding(&cs)
	if err != nil {
		return err
	}
	res, err := redeem(ctx, &req, binding)
	if err != nil {
		res = &federationv1.JoinResult{Error: "the issuer could not process the join: " + err.Error(), Reason: "internal"}
	}
	return WriteMsg(s, res)
}
