package agent

import (
	"context"
	"crypto/tls"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/client"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/federation/join"
)

// joinCP is a control plane whose RedeemJoin fails with an internal error;
// every call that reaches it is recorded, by method.
type joinCP struct {
	controlplanev1.UnimplementedFederationServiceServer
	mu    sync.Mutex
	calls []joinCall
}

type joinCall struct {
	method string
	req    proto.Message
}

func (f *joinCP) RedeemJoin(context.Context, *controlplanev1.RedeemJoinRequest) (*controlplanev1.RedeemJoinResponse, error) {
	return nil, status.Error(codes.Internal, "store: bolt: open /var/lib/strait/state.db: input/output error")
}

// called returns the calls to a method whose name ends with suffix.
func (f *joinCP) called(suffix string) []proto.Message {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []proto.Message
	for _, c := range f.calls {
		if strings.HasSuffix(c.method, suffix) {
			out = append(out, c.req)
		}
	}
	return out
}

// field reads a string field of m by its proto name ("" if m has none).
func field(m proto.Message, name string) string {
	fd := m.ProtoReflect().Descriptor().Fields().ByName(protoreflect.Name(name))
	if fd == nil {
		return ""
	}
	return m.ProtoReflect().Get(fd).String()
}

func startJoinCP(t *testing.T, c *catest.CA) (*joinCP, string) {
	t.Helper()
	s := c.SVID(t, "spiffe://example.org/cluster/east/controlplane", time.Hour)
	cert := tls.Certificate{Leaf: s.Certificates[0], PrivateKey: s.PrivateKey}
	for _, c := range s.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	f := &joinCP{}
	record := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if m, ok := req.(proto.Message); ok {
			f.mu.Lock()
			f.calls = append(f.calls, joinCall{info.FullMethod, m})
			f.mu.Unlock()
		}
		return handler(ctx, req)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		ClientAuth: tls.RequestClientCert})), grpc.UnaryInterceptor(record))
	controlplanev1.RegisterFederationServiceServer(srv, f)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return f, ln.Addr().String()
}

// tlsPipe is a TLS 1.3 connection in memory: the joiner's end and the
// issuer's, whose state Serve takes its channel binding from, and the
// joiner's end below TLS (closing it ends the issuer's close_notify).
func tlsPipe(t *testing.T, c *catest.CA) (joiner, issuer *tls.Conn, raw net.Conn) {
	t.Helper()
	s := c.SVID(t, "spiffe://example.org/cluster/east/gateway", time.Hour)
	cert := tls.Certificate{Leaf: s.Certificates[0], PrivateKey: s.PrivateKey}
	for _, c := range s.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	a, b := net.Pipe()
	joiner = tls.Client(a, &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true})
	issuer = tls.Server(b, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}})
	errc := make(chan error, 1)
	go func() { errc <- issuer.Handshake() }()
	if err := joiner.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return joiner, issuer, a
}

// Refusals made inside the join exchange, by the issuer's gateway, are
// audited by its control plane like those the control plane makes
// (docs/federation.md: every attempt, refused or not), and the joiner is
// told a public reason: never the gRPC status or Go error text of the
// issuer's inside. Before, they reached neither the control plane nor the
// audit log, and a failed RedeemJoin call was relayed to the
// unauthenticated joiner as "rpc error: code = Internal desc = ...".
func TestJoinExchangeRefusalsAuditedAndPublic(t *testing.T) {
	a, _ := testAgent(t)
	c := catest.New(t, "example.org")
	if _, err := a.cfg.Creds.SetBundle(c.Bundle()); err != nil {
		t.Fatal(err)
	}
	f, addr := startJoinCP(t, c)
	a.id = &client.Identity{ControlPlane: addr, Creds: a.cfg.Creds}
	if err := a.id.Connect(); err != nil {
		t.Fatal(err)
	}
	defer a.id.Close()

	const tokenID = "aaaaaaaaaaaaaaaaaaaaaaaaab"
	for _, tc := range []struct {
		name string
		// joiner runs the joiner's side after the handshake and returns
		// what the issuer answered.
		joiner      func(t *testing.T, s net.Conn) *federationv1.JoinResult
		wantCluster string
		wantToken   string
		wantReason  string
		wantDetail  string // in the audited detail, never in the joiner's answer
	}{
		{
			name: "request names another cluster than its hello",
			joiner: func(t *testing.T, s net.Conn) *federationv1.JoinResult {
				hello(t, s, &federationv1.JoinRequest{Cluster: "west"})
				return request(t, s, &federationv1.JoinRequest{TokenId: tokenID, Proof: make([]byte, 32), Cluster: "south"})
			},
			wantCluster: "south", wantToken: tokenID, wantReason: "malformed", wantDetail: `"west"`,
		},
		{
			name: "malformed request",
			joiner: func(t *testing.T, s net.Conn) *federationv1.JoinResult {
				hello(t, s, &federationv1.JoinRequest{Cluster: "west"})
				if _, err := s.Write([]byte{0, 0, 0, 2, 0x0a, 0x05}); err != nil {
					t.Fatal(err)
				}
				return result(t, s)
			},
			wantCluster: "west", wantReason: "malformed", wantDetail: "malformed",
		},
		{
			name: "proof sent in the hello, before the offer was checked",
			joiner: func(t *testing.T, s net.Conn) *federationv1.JoinResult {
				if err := join.WriteMsg(s, &federationv1.JoinRequest{TokenId: tokenID, Proof: make([]byte, 32), Cluster: "west"}); err != nil {
					t.Fatal(err)
				}
				return result(t, s)
			},
			wantCluster: "west", wantToken: tokenID, wantReason: "malformed", wantDetail: "hello",
		},
		{
			name: "the control plane could not be asked",
			joiner: func(t *testing.T, s net.Conn) *federationv1.JoinResult {
				hello(t, s, &federationv1.JoinRequest{Cluster: "west"})
				return request(t, s, &federationv1.JoinRequest{TokenId: tokenID, Proof: make([]byte, 32), Cluster: "west"})
			},
			wantCluster: "west", wantToken: tokenID, wantReason: "internal", wantDetail: "input/output error",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(f.called("/AuditJoinRefusal"))
			j, i, raw := tlsPipe(t, c)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			done := make(chan struct{})
			go func() {
				defer close(done)
				a.serveJoin(ctx, i, i.ConnectionState())
			}()
			j.SetDeadline(time.Now().Add(10 * time.Second))
			res := tc.joiner(t, j)
			raw.Close()
			<-done
			if res.GetReason() != tc.wantReason || res.GetError() == "" {
				t.Errorf("joiner told %q (reason %q), want a refusal with reason %q", res.GetError(), res.GetReason(), tc.wantReason)
			}
			for _, internal := range []string{"rpc error", "desc =", "bolt", "/var/lib", "input/output", "wire:", "proto:"} {
				if strings.Contains(res.GetError(), internal) {
					t.Errorf("joiner told the issuer's internals (%q): %q", internal, res.GetError())
				}
			}
			audits := f.called("/AuditJoinRefusal")
			if len(audits) != before+1 {
				t.Fatalf("%d refusals audited by the control plane, want 1; calls: %v", len(audits)-before, f.calls)
			}
			got := audits[len(audits)-1]
			if field(got, "cluster") != tc.wantCluster || field(got, "token_id") != tc.wantToken || field(got, "reason") != tc.wantReason ||
				!strings.Contains(field(got, "detail"), tc.wantDetail) {
				t.Errorf("audited %v, want cluster %q, token %q, reason %q, detail with %q", got, tc.wantCluster, tc.wantToken, tc.wantReason, tc.wantDetail)
			}
		})
	}
}

// hello sends the joiner's hello and reads the issuer's offer.
func hello(t *testing.T, s net.Conn, h *federationv1.JoinRequest) {
	t.Helper()
	if err := join.WriteMsg(s, h); err != nil {
		t.Fatal(err)
	}
	var offer federationv1.JoinOffer
	if err := join.ReadMsg(s, &offer); err != nil {
		t.Fatalf("offer: %v", err)
	}
}

func request(t *testing.T, s net.Conn, r *federationv1.JoinRequest) *federationv1.JoinResult {
	t.Helper()
	if err := join.WriteMsg(s, r); err != nil {
		t.Fatal(err)
	}
	return result(t, s)
}

func result(t *testing.T, s net.Conn) *federationv1.JoinResult {
	t.Helper()
	var res federationv1.JoinResult
	if err := join.ReadMsg(s, &res); err != nil {
		t.Fatalf("no answer from the issuer: %v", err)
	}
	return &res
}
