// Package registry is the control plane's service registry: where the
// instances of each service, with their addresses, identities, localities and
// health, come from.
//
// Source is the interface the control plane consumes. Local implements it in
// local mode on top of the durable store (controlplane/store): sidecars
// register their own instances over the discovery API, keep them alive with
// health reports, and an instance that stops reporting for a lease becomes
// HEALTH_UNKNOWN. A Kubernetes source (EndpointSlices) will implement the
// same interface later.
//
// The package enforces who may register what: a caller is a workload SPIFFE
// ID (spiffe://<td>/ns/<namespace>/sa/<sa>, see ca/identity), may register
// instances only in its own namespace, and may only change or remove its own
// instances. It knows nothing of gRPC; the server maps its errors to codes.
package registry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// Source is where service instances come from: the local store now,
// Kubernetes EndpointSlices later.
type Source interface {
	// Instances returns every known instance with its effective health.
	Instances(ctx context.Context) ([]Instance, error)
	// Changed returns a channel that receives after any change. Receives
	// coalesce: after one, re-read Instances.
	Changed() <-chan struct{}
}

// Instance is one instance of a service, as the control plane serves it.
type Instance struct {
	// Name is unique within the cluster, e.g. "backend-0" (DNS label).
	Name string
	// Service and Namespace say what the instance serves (DNS labels).
	Service, Namespace string
	// Address is host:port of the instance's sidecar inbound mTLS listener.
	Address string
	// Cluster is the cluster the instance runs in.
	Cluster string
	// SPIFFEID is the identity the instance presents (and registered with).
	SPIFFEID string
	// Protocol is how the service is spoken; never PROTOCOL_UNSPECIFIED in
	// what a Source returns.
	Protocol controlplanev1.Protocol
	// Region and Zone place the instance; both may be empty.
	Region, Zone string
	// Health is the effective health: HEALTH_UNKNOWN once the lease lapsed.
	Health controlplanev1.Health
}

// ToEndpoint returns i as a discovery API endpoint.
func ToEndpoint(i Instance) *controlplanev1.Endpoint {
	ep := &controlplanev1.Endpoint{
		Instance: i.Name,
		Address:  i.Address,
		Cluster:  i.Cluster,
		Health:   i.Health,
		SpiffeId: i.SPIFFEID,
	}
	if i.Region != "" || i.Zone != "" {
		ep.Locality = &controlplanev1.Locality{Region: i.Region, Zone: i.Zone}
	}
	return ep
}

// Errors. Callers test them with errors.Is. Errors from the store pass
// through wrapped, so store.ErrNotFound (no such instance) and
// store.ErrInstanceOwned (another identity's instance) also match.
var (
	// ErrInvalid is wrapped by every *FieldError.
	ErrInvalid = errors.New("registry: invalid instance")
	// ErrPermissionDenied means the caller may not act on this instance:
	// it is not a workload, or the instance is outside its namespace.
	ErrPermissionDenied = errors.New("registry: permission denied")
)

// FieldError says which field of a request is invalid, and why.
type FieldError struct {
	Field  string // e.g. "address"
	Reason string
}

func (e *FieldError) Error() string {
	return "registry: invalid " + e.Field + ": " + e.Reason
}

// Unwrap makes every FieldError match ErrInvalid.
func (e *FieldError) Unwrap() error { return ErrInvalid }

func fieldErr(field, format string, args ...any) error {
	return &FieldError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

var (
	dnsLabelRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	// Cloud regions and zones: "eu-west-1", "eu-west-1a", "us-central1-a".
	localityRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$`)
)

func checkLabel(field, v string) error {
	switch {
	case v == "":
		return fieldErr(field, "required")
	case len(v) > 63:
		return fieldErr(field, "%d bytes, more than 63", len(v))
	case !dnsLabelRE.MatchString(v):
		return fieldErr(field, "%q is not a DNS label (lower-case letters, digits and '-', starting and ending with a letter or digit)", trunc(v))
	}
	return nil
}

func checkLocality(field, v string) error {
	if v == "" {
		return nil
	}
	if len(v) > 63 || !localityRE.MatchString(v) {
		return fieldErr(field, "%q must be at most 63 lower-case letters, digits, '-', '.' and '_'", trunc(v))
	}
	return nil
}

// checkAddress accepts host:port where port is a decimal 1-65535 without
// leading zeros and host is "localhost" or a unicast IP address (IPv6 in
// brackets, no zone).
func checkAddress(addr string) error {
	if addr == "" {
		return fieldErr("address", "required")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fieldErr("address", "%q is not host:port", trunc(addr))
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 || strconv.FormatUint(p, 10) != port {
		return fieldErr("address", "port %q must be a number from 1 to 65535", trunc(port))
	}
	if host == "localhost" {
		return nil
	}
	ip, err := netip.ParseAddr(host)
	switch {
	case err != nil:
		return fieldErr("address", "host %q must be an IP address or localhost", trunc(host))
	case ip.Zone() != "":
		return fieldErr("address", "host %q must not have a zone", trunc(host))
	case ip.IsUnspecified() || ip.IsMulticast():
		return fieldErr("address", "host %s is not a unicast address", ip)
	}
	return nil
}

func trunc(s string) string {
	const limit = 64
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}
