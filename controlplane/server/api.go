package server

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/registry"
	"github.com/straitmesh/strait/controlplane/resource"
	"github.com/straitmesh/strait/controlplane/store"
)

// maxCSRSize bounds the CSRs parsed; defaultSVIDTTL is the lifetime of
// SVIDs when the server is not told otherwise.
const (
	maxCSRSize     = 8 << 10
	defaultSVIDTTL = time.Hour
)

type identityServer struct {
	controlplanev1.UnimplementedIdentityServiceServer
	s *Server
}

func (i identityServer) Certify(ctx context.Context, req *controlplanev1.CertifyRequest) (*controlplanev1.CertifyResponse, error) {
	s := i.s
	if len(req.GetCsr()) == 0 {
		return nil, fmt.Errorf("%w: csr is required", ErrBadRequest)
	}
	// Check the CSR before spending a single-use token on it.
	if len(req.GetCsr()) > maxCSRSize {
		return nil, fmt.Errorf("%w: csr of %d bytes, more than %d", ErrBadRequest, len(req.GetCsr()), maxCSRSize)
	}
	csr, err := x509.ParseCertificateRequest(req.GetCsr())
	if err != nil {
		return nil, fmt.Errorf("%w: csr: %w", ErrBadRequest, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: csr signature: %w", ErrBadRequest, err)
	}
	// The key the credential is spent for: signed for in the CSR.
	key := sha256.Sum256(csr.RawSubjectPublicKeyInfo)
	var id spiffeid.ID
	proof := "svid"
	c, hasCert := callerFrom(ctx)
	switch {
	case req.GetCredential() != nil:
		if req.GetCredential().GetKind() == nil {
			return nil, fmt.Errorf("%w: credential is empty: set registration_token or service_account_token", ErrBadRequest)
		}
		var err error
		// A CSR the CA would refuse does not spend a single-use credential.
		id, err = s.authenticateCredential(ctx, req.GetCredential(), key[:], func(id spiffeid.ID) error {
			if err := s.cfg.Issuer.CheckRequest(req.GetCsr(), id); err != nil {
				return fmt.Errorf("%w: %w", ErrBadRequest, err)
			}
			return nil
		})
		if err != nil {
			s.log.Info("certify refused", "err", err)
			return nil, err
		}
		proof = "token"
	case hasCert:
		gateway := c.info.Kind == identity.KindGateway && c.info.Cluster == s.cfg.Cluster
		if c.info.Kind != identity.KindWorkload && !gateway {
			return nil, fmt.Errorf("%w: renewal by SVID is for workloads and this cluster's gateways; %s is a %s", ErrPermissionDenied, c.id, c.info.Kind)
		}
		id = c.id
	default:
		return nil, fmt.Errorf("%w: present a credential or renew over mTLS with a valid SVID", ErrUnauthenticated)
	}
	// The caller may ask for less than the cluster's SVID lifetime, never more.
	maxTTL := s.cfg.SVIDTTL
	if maxTTL <= 0 {
		maxTTL = defaultSVIDTTL
	}
	ttl := time.Duration(req.GetTtlSeconds()) * time.Second
	if ttl <= 0 || ttl > maxTTL {
		ttl = maxTTL
	}
	chain, err := s.cfg.Issuer.IssueSVID(req.GetCsr(), id, ttl)
	if err != nil {
		return nil, err
	}
	s.metrics.issued.WithLabelValues(proof).Inc()
	s.log.Info("SVID issued", "spiffe_id", id.String(), "proof", proof, "expires", chain[0].NotAfter.UTC().Format(time.RFC3339))
	resp := &controlplanev1.CertifyResponse{SpiffeId: id.String(), Bundle: bundleProto(s.cfg.Bundle())}
	for _, cert := range chain {
		resp.CertificateChain = append(resp.CertificateChain, cert.Raw)
	}
	return resp, nil
}

func (s *Server) authenticateCredential(ctx context.Context, cred *controlplanev1.Credential, key []byte, accept func(spiffeid.ID) error) (spiffeid.ID, error) {
	for _, a := range s.cfg.Authenticators {
		var id spiffeid.ID
		var err error
		if checking, ok := a.(CheckingAuthenticator); ok {
			id, err = checking.AuthenticateIf(ctx, cred, key, accept)
		} else if id, err = a.Authenticate(ctx, cred); err == nil && accept != nil {
			err = accept(id)
		}
		if errors.Is(err, ErrNotApplicable) {
			continue
		}
		return id, err
	}
	return spiffeid.ID{}, fmt.Errorf("%w: this control plane does not accept that kind of credential", ErrUnauthenticated)
}

type discoveryServer struct {
	controlplanev1.UnimplementedDiscoveryServiceServer
	s *Server
}

func (d discoveryServer) Register(ctx context.Context, req *controlplanev1.RegisterRequest) (*controlplanev1.RegisterResponse, error) {
	c, _ := callerFrom(ctx)
	in := req.GetInstance()
	if in == nil {
		return nil, fmt.Errorf("%w: instance is required", ErrBadRequest)
	}
	if ok, err := d.s.cfg.Store.ServiceBound(c.info.Namespace, c.info.ServiceAccount, in.GetService()); err != nil {
		return nil, err
	} else if !ok {
		return nil, fmt.Errorf("%w: %s may not register instances of service %q (its registration token was minted for another service; mint one with --service %s)",
			ErrPermissionDenied, c.id, in.GetService(), in.GetService())
	}
	inst := registry.Instance{
		Name: in.GetName(), Service: in.GetService(), Namespace: in.GetNamespace(), Address: in.GetAddress(),
		Protocol: in.GetProtocol(), Region: in.GetLocality().GetRegion(), Zone: in.GetLocality().GetZone(),
	}
	if err := d.s.cfg.Registry.Register(ctx, inst, c.id); err != nil {
		return nil, err
	}
	return &controlplanev1.RegisterResponse{Lease: durationpb.New(d.s.cfg.Registry.Lease())}, nil
}

func (d discoveryServer) ReportHealth(ctx context.Context, req *controlplanev1.ReportHealthRequest) (*controlplanev1.ReportHealthResponse, error) {
	c, _ := callerFrom(ctx)
	h := req.GetHealth()
	if h != controlplanev1.Health_HEALTH_HEALTHY && h != controlplanev1.Health_HEALTH_UNHEALTHY {
		return nil, fmt.Errorf("%w: health must be HEALTHY or UNHEALTHY", ErrBadRequest)
	}
	if len(req.GetBundleDigest()) > maxDigestLen || len(req.GetSvidIssuer()) > maxDigestLen {
		return nil, fmt.Errorf("%w: bundle digest or SVID issuer longer than %d bytes", ErrBadRequest, maxDigestLen)
	}
	// What the node holds counts for rotation even if the registry refuses
	// the health report (the node is keyed by name and verified identity).
	if len(req.GetEjections()) > maxEjections {
		return nil, fmt.Errorf("%w: %d ejections, more than %d", ErrBadRequest, len(req.GetEjections()), maxEjections)
	}
	for _, e := range req.GetEjections() {
		if len(e.GetService()) > 253 || len(e.GetEndpoint()) > 253 {
			return nil, fmt.Errorf("%w: ejection names longer than 253 bytes", ErrBadRequest)
		}
	}
	d.s.noteDigest(req.GetInstance(), c.id, req.GetBundleDigest(), req.GetSvidIssuer(), h)
	d.s.noteEjections(req.GetInstance(), c.id, req.GetEjections())
	if err := d.s.cfg.Registry.ReportHealth(ctx, req.GetInstance(), h, c.id); err != nil {
		return nil, err
	}
	return &controlplanev1.ReportHealthResponse{Lease: durationpb.New(d.s.cfg.Registry.Lease())}, nil
}

func (d discoveryServer) Deregister(ctx context.Context, req *controlplanev1.DeregisterRequest) (*controlplanev1.DeregisterResponse, error) {
	c, _ := callerFrom(ctx)
	if err := d.s.cfg.Registry.Deregister(ctx, req.GetInstance(), c.id); err != nil {
		return nil, err
	}
	return &controlplanev1.DeregisterResponse{}, nil
}

func (d discoveryServer) Watch(req *controlplanev1.WatchRequest, stream controlplanev1.DiscoveryService_WatchServer) error {
	return d.s.watch(stream.Context(), req, stream.Send)
}

type adminServer struct {
	controlplanev1.UnimplementedAdminServiceServer
	s *Server
}

func (a adminServer) Apply(ctx context.Context, req *controlplanev1.ApplyRequest) (*controlplanev1.ApplyResponse, error) {
	s := a.s
	if len(req.GetResources()) == 0 {
		return nil, fmt.Errorf("%w: no resources to apply", ErrBadRequest)
	}
	var problems []string
	records := make([]store.Resource, 0, len(req.GetResources()))
	for i, r := range req.GetResources() {
		obj, err := resource.FromProto(r)
		if err == nil {
			_, err = resource.Validate(obj, s.cfg.TrustDomain)
		}
		if err != nil {
			problems = append(problems, fmt.Sprintf("resource %d (%s %s/%s): %v", i+1, r.GetKind(), r.GetNamespace(), r.GetName(), err))
			continue
		}
		wire, err := resource.ToProto(obj)
		if err != nil {
			problems = append(problems, fmt.Sprintf("resource %d: %v", i+1, err))
			continue
		}
		records = append(records, store.Resource{APIVersion: wire.GetApiVersion(), Kind: wire.GetKind(), Namespace: wire.GetNamespace(), Name: wire.GetName(), Spec: wire.GetSpecJson()})
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("%w: nothing applied:\n  %s", ErrBadRequest, strings.Join(problems, "\n  "))
	}
	resp := &controlplanev1.ApplyResponse{}
	if req.GetDryRun() {
		for _, r := range records {
			resp.Results = append(resp.Results, &controlplanev1.ApplyResult{Kind: r.Kind, Namespace: r.Namespace, Name: r.Name, Action: "valid (dry run)"})
		}
		return resp, nil
	}
	results, err := s.cfg.Store.Apply(records)
	if err != nil {
		return nil, err
	}
	for i, r := range results {
		resp.Results = append(resp.Results, &controlplanev1.ApplyResult{Kind: records[i].Kind, Namespace: records[i].Namespace, Name: records[i].Name, Action: r.Action})
		if r.Action != "unchanged" {
			s.log.Info("resource applied", "kind", records[i].Kind, "namespace", records[i].Namespace, "name", records[i].Name, "action", r.Action)
		}
	}
	return resp, nil
}

func (a adminServer) List(ctx context.Context, req *controlplanev1.ListRequest) (*controlplanev1.ListResponse, error) {
	rs, err := a.s.cfg.Store.List(req.GetKind(), req.GetNamespace(), req.GetName())
	if err != nil {
		return nil, err
	}
	resp := &controlplanev1.ListResponse{}
	for _, r := range rs {
		resp.Resources = append(resp.Resources, &controlplanev1.Resource{ApiVersion: r.APIVersion, Kind: r.Kind, Namespace: r.Namespace, Name: r.Name, SpecJson: r.Spec, Generation: r.Generation})
	}
	return resp, nil
}

func (a adminServer) Delete(ctx context.Context, req *controlplanev1.DeleteRequest) (*controlplanev1.DeleteResponse, error) {
	if req.GetKind() == "" || req.GetName() == "" {
		return nil, fmt.Errorf("%w: kind and name are required", ErrBadRequest)
	}
	ns := req.GetNamespace()
	if ns == "" {
		ns = "default"
	}
	if err := a.s.cfg.Store.Delete(req.GetKind(), ns, req.GetName()); err != nil {
		return nil, err
	}
	a.s.log.Info("resource deleted", "kind", req.GetKind(), "namespace", ns, "name", req.GetName())
	return &controlplanev1.DeleteResponse{}, nil
}

func (a adminServer) CreateRegistrationToken(ctx context.Context, req *controlplanev1.CreateRegistrationTokenRequest) (*controlplanev1.CreateRegistrationTokenResponse, error) {
	id, err := identity.Workload(a.s.cfg.TrustDomain, req.GetNamespace(), req.GetServiceAccount())
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	tok, rec, err := a.s.cfg.Store.MintToken(store.TokenRequest{Namespace: req.GetNamespace(), ServiceAccount: req.GetServiceAccount(), Service: req.GetService(), TTL: time.Duration(req.GetTtlSeconds()) * time.Second})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadRequest, err)
	}
	c, _ := callerFrom(ctx)
	a.s.log.Info("registration token minted", "spiffe_id", id.String(), "service", req.GetService(), "by", c.id.String(), "expires", rec.Expires.UTC().Format(time.RFC3339))
	return &controlplanev1.CreateRegistrationTokenResponse{Token: tok, SpiffeId: id.String(), ExpiresAt: timestamppb.New(rec.Expires)}, nil
}

func (a adminServer) Status(ctx context.Context, _ *controlplanev1.StatusRequest) (*controlplanev1.StatusResponse, error) {
	s := a.s
	resp := &controlplanev1.StatusResponse{Cluster: s.cfg.Cluster, TrustDomain: s.cfg.TrustDomain.Name()}
	if b := s.cfg.Bundle(); b != nil {
		resp.BundleDigest = b.Digest()
	}
	if !s.cfg.IntermediateExpiry.IsZero() {
		resp.IntermediateExpiresAt = timestamppb.New(s.cfg.IntermediateExpiry)
	}
	insts, err := s.cfg.Registry.Instances(ctx)
	if err != nil {
		return nil, err
	}
	for _, in := range insts {
		resp.Instances = append(resp.Instances, &controlplanev1.Instance{Name: in.Name, Service: in.Service, Namespace: in.Namespace,
			Address: in.Address, Protocol: in.Protocol, SpiffeId: in.SPIFFEID,
			Locality: &controlplanev1.Locality{Region: in.Region, Zone: in.Zone}})
	}
	s.mu.Lock()
	resp.SnapshotVersion = s.version
	for _, n := range s.sortedNodes() {
		resp.Nodes = append(resp.Nodes, &controlplanev1.NodeStatus{Node: n.name, SpiffeId: n.id.String(), Version: n.sentVersion,
			Connected: len(n.streams) > 0, BundleDigest: n.digest, Health: n.health})
	}
	s.mu.Unlock()
	return resp, nil
}
