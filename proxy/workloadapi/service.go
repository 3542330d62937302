package workloadapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// errNotReady means the Source has no SVID or bundle to serve yet; the
// streams wait for the next change rather than fail.
var errNotReady = errors.New("workloadapi: no identity available yet")

// service implements workload.SpiffeWorkloadAPIServer for one Serve call.
// Authorization (peer uid, security header) is done by the interceptors
// before any method runs.
type service struct {
	workload.UnimplementedSpiffeWorkloadAPIServer

	src      Source
	log      *slog.Logger
	stopping <-chan struct{} // closed when the server shuts down
}

// FetchX509SVID streams the workload's X.509-SVID with the bundle of its
// trust domain (and any federated bundles), then again on every change,
// until the client goes away or the server stops.
//
// Before the first SVID and its bundle are available the stream blocks
// rather than answering PermissionDenied (the spec's "no identity issued"):
// the sidecar always gets an identity shortly after start, and go-spiffe's
// clients would otherwise retry with backoff. If the stream ends before
// anything was sent (client deadline, server stop) it returns Unavailable.
func (s *service) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	return serveStream(s, stream, s.x509SVIDResponse)
}

// FetchX509Bundles streams trust domain → bundle for every trust domain the
// Source holds, then again on every change. It waits, as FetchX509SVID
// does, until there is at least one bundle.
func (s *service) FetchX509Bundles(_ *workload.X509BundlesRequest, stream grpc.ServerStreamingServer[workload.X509BundlesResponse]) error {
	return serveStream(s, stream, s.x509BundlesResponse)
}

const x509Only = "Strait issues X.509-SVIDs only"

func (s *service) FetchJWTSVID(context.Context, *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	return nil, status.Error(codes.Unimplemented, "workloadapi: JWT-SVIDs are not supported: "+x509Only)
}

func (s *service) FetchJWTBundles(*workload.JWTBundlesRequest, grpc.ServerStreamingServer[workload.JWTBundlesResponse]) error {
	return status.Error(codes.Unimplemented, "workloadapi: JWT bundles are not supported: "+x509Only)
}

func (s *service) ValidateJWTSVID(context.Context, *workload.ValidateJWTSVIDRequest) (*workload.ValidateJWTSVIDResponse, error) {
	return nil, status.Error(codes.Unimplemented, "workloadapi: JWT-SVID validation is not supported: "+x509Only)
}

func (s *service) FetchWITSVID(*workload.WITSVIDRequest, grpc.ServerStreamingServer[workload.WITSVIDResponse]) error {
	return status.Error(codes.Unimplemented, "workloadapi: WIT-SVIDs are not supported: "+x509Only)
}

func (s *service) FetchWITBundles(*workload.WITBundlesRequest, grpc.ServerStreamingServer[workload.WITBundlesResponse]) error {
	return status.Error(codes.Unimplemented, "workloadapi: WIT bundles are not supported: "+x509Only)
}

// serveStream sends build()'s response now and after every change of the
// Source, skipping responses equal to the last one sent. It is where the
// streams' gRPC statuses are made.
func serveStream[T any, PT interface {
	*T
	proto.Message
}](s *service, stream grpc.ServerStreamingServer[T], build func() (PT, error)) error {
	ctx := stream.Context()
	var last PT
	sent := false
	for {
		// Take the channel before reading, so a change in between is seen.
		changed := s.src.Changed()
		resp, err := build()
		select {
		case <-changed:
			// The Source changed while it was read (the SVID and the
			// bundles are read one after the other): what was built may
			// mix the two states. Read it again, whole.
			continue
		default:
		}
		switch {
		case errors.Is(err, errNotReady):
			s.log.DebugContext(ctx, "workload API: waiting for identity", "error", err)
		case err != nil:
			s.log.ErrorContext(ctx, "workload API: build response", "error", err)
			return status.Error(codes.Internal, err.Error())
		case !sent || !proto.Equal(resp, last):
			if err := stream.Send((*T)(resp)); err != nil {
				return err
			}
			last, sent = resp, true
		}
		select {
		case <-changed:
		case <-s.stopping:
			return status.Error(codes.Unavailable, "workloadapi: server shutting down")
		case <-ctx.Done():
			if !sent {
				return status.Error(codes.Unavailable, "workloadapi: no X.509-SVID or bundle issued yet")
			}
			return status.FromContextError(ctx.Err()).Err()
		}
	}
}

func (s *service) x509SVIDResponse() (*workload.X509SVIDResponse, error) {
	svid, err := s.src.GetX509SVID()
	if err != nil || svid == nil {
		return nil, fmt.Errorf("%w: SVID: %v", errNotReady, err)
	}
	td := svid.ID.TrustDomain()
	own, err := s.src.GetX509BundleForTrustDomain(td)
	if err != nil || own == nil || own.Empty() {
		return nil, fmt.Errorf("%w: bundle for %s: %v", errNotReady, td, err)
	}
	chain, key, err := svid.MarshalRaw()
	if err != nil {
		return nil, fmt.Errorf("workloadapi: marshal SVID %s: %w", svid.ID, err)
	}
	resp := &workload.X509SVIDResponse{
		Svids: []*workload.X509SVID{{
			SpiffeId:    svid.ID.String(),
			X509Svid:    chain,
			X509SvidKey: key,
			Bundle:      rawBundle(own),
			Hint:        svid.Hint,
		}},
	}
	for _, b := range s.listBundles() {
		if b.TrustDomain() == td || b.Empty() {
			continue
		}
		if resp.FederatedBundles == nil {
			resp.FederatedBundles = map[string][]byte{}
		}
		resp.FederatedBundles[b.TrustDomain().IDString()] = rawBundle(b)
	}
	return resp, nil
}

func (s *service) x509BundlesResponse() (*workload.X509BundlesResponse, error) {
	bundles := s.listBundles()
	if bundles == nil {
		// Not a BundleLister: serve the bundle of the SVID's trust domain.
		svid, err := s.src.GetX509SVID()
		if err != nil || svid == nil {
			return nil, fmt.Errorf("%w: SVID: %v", errNotReady, err)
		}
		b, err := s.src.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
		if err != nil || b == nil {
			return nil, fmt.Errorf("%w: bundle for %s: %v", errNotReady, svid.ID.TrustDomain(), err)
		}
		bundles = []*x509bundle.Bundle{b}
	}
	resp := &workload.X509BundlesResponse{Bundles: map[string][]byte{}}
	for _, b := range bundles {
		if !b.Empty() {
			resp.Bundles[b.TrustDomain().IDString()] = rawBundle(b)
		}
	}
	if len(resp.Bundles) == 0 {
		return nil, fmt.Errorf("%w: no bundles", errNotReady)
	}
	return resp, nil
}

// listBundles returns the Source's bundles if it is a BundleLister, else nil.
func (s *service) listBundles() []*x509bundle.Bundle {
	l, ok := s.src.(BundleLister)
	if !ok {
		return nil
	}
	bundles := l.Bundles()
	if bundles == nil {
		bundles = []*x509bundle.Bundle{}
	}
	return bundles
}

// rawBundle is the bundle's X.509 authorities as concatenated DER.
func rawBundle(b *x509bundle.Bundle) []byte {
	var out []byte
	for _, c := range b.X509Authorities() {
		out = append(out, c.Raw...)
	}
	return out
}
