// Package identity defines the SPIFFE identities of a Strait mesh and parses
// them strictly.
//
// It implements the naming rules of the SPIFFE ID specification
// (https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md) on top of
// go-spiffe's spiffeid package, and adds what the specification requires but
// go-spiffe leaves to the caller: length limits on IDs, trust domains and path
// segments, and Strait's own layout of workload and component IDs:
//
//	spiffe://<td>/ns/<namespace>/sa/<serviceaccount>   workloads
//	spiffe://<td>/cluster/<cluster>/controlplane       a cluster's control plane
//	spiffe://<td>/cluster/<cluster>/gateway            a cluster's east-west gateway
//	spiffe://<td>/cluster/<cluster>/admin              a cluster's administrators
//
// The package is a leaf: it knows nothing of certificates, keys or transport,
// so the sidecar can import it without pulling in the CA.
package identity

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Limits on identities. The SPIFFE ID specification caps a SPIFFE ID at 2048
// bytes and a trust domain name at 255 bytes; segments are capped at 253 so a
// Kubernetes name (at most 253 bytes) always fits and nothing much longer does.
const (
	MaxIDLength          = 2048
	MaxTrustDomainLength = 255
	MaxSegmentLength     = 253
	maxClusterNameLength = 63
)

// ErrInvalid is wrapped by every error this package returns for a malformed ID.
var ErrInvalid = errors.New("identity: invalid SPIFFE ID")

// Kind says what an ID names in a Strait mesh.
type Kind int

// Kinds of identity.
const (
	KindOther Kind = iota // a valid SPIFFE ID outside Strait's layout
	KindWorkload
	KindControlPlane
	KindGateway
	KindAdmin
)

var kindNames = map[Kind]string{
	KindOther:        "other",
	KindWorkload:     "workload",
	KindControlPlane: "controlplane",
	KindGateway:      "gateway",
	KindAdmin:        "admin",
}

// String returns the lower-case name of the kind.
func (k Kind) String() string {
	if s, ok := kindNames[k]; ok {
		return s
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// Info is what an ID says about its holder.
type Info struct {
	ID             spiffeid.ID
	Kind           Kind
	Namespace      string // workloads only
	ServiceAccount string // workloads only
	Cluster        string // components only
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Parse parses s as a SPIFFE ID, enforcing the specification's character set
// (via go-spiffe) and its length limits.
func Parse(s string) (spiffeid.ID, error) {
	if len(s) > MaxIDLength {
		return spiffeid.ID{}, invalid("ID is %d bytes, more than the limit of %d", len(s), MaxIDLength)
	}
	id, err := spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, invalid("%q: %v", truncate(s), err)
	}
	if err := checkLengths(id); err != nil {
		return spiffeid.ID{}, err
	}
	return id, nil
}

// ParseTrustDomain parses a trust domain name (or a SPIFFE ID whose trust
// domain is wanted) and enforces the 255-byte limit.
func ParseTrustDomain(s string) (spiffeid.TrustDomain, error) {
	if s == "" {
		return spiffeid.TrustDomain{}, invalid("trust domain is empty")
	}
	td, err := spiffeid.TrustDomainFromString(s)
	if err != nil {
		return spiffeid.TrustDomain{}, invalid("trust domain %q: %v", truncate(s), err)
	}
	if n := len(td.Name()); n > MaxTrustDomainLength {
		return spiffeid.TrustDomain{}, invalid("trust domain is %d bytes, more than the limit of %d", n, MaxTrustDomainLength)
	}
	return td, nil
}

// CheckLeaf reports whether id may name the holder of a leaf certificate: it
// must be well formed, within the limits, and have a non-root path (the
// X509-SVID specification reserves the bare trust-domain ID for signing
// certificates).
func CheckLeaf(id spiffeid.ID) error {
	if id.IsZero() {
		return invalid("ID is empty")
	}
	if err := checkLengths(id); err != nil {
		return err
	}
	if id.Path() == "" {
		return invalid("%s has no path; leaf SVIDs need a non-root path", id)
	}
	return nil
}

func checkLengths(id spiffeid.ID) error {
	if n := len(id.String()); n > MaxIDLength {
		return invalid("ID is %d bytes, more than the limit of %d", n, MaxIDLength)
	}
	if n := len(id.TrustDomain().Name()); n > MaxTrustDomainLength {
		return invalid("trust domain is %d bytes, more than the limit of %d", n, MaxTrustDomainLength)
	}
	for seg := range strings.SplitSeq(strings.TrimPrefix(id.Path(), "/"), "/") {
		if len(seg) > MaxSegmentLength {
			return invalid("path segment of %d bytes is more than the limit of %d", len(seg), MaxSegmentLength)
		}
	}
	return nil
}

// Workload returns the ID of service account sa in namespace ns.
func Workload(td spiffeid.TrustDomain, ns, sa string) (spiffeid.ID, error) {
	if err := checkName("namespace", ns); err != nil {
		return spiffeid.ID{}, err
	}
	if err := checkName("service account", sa); err != nil {
		return spiffeid.ID{}, err
	}
	return build(td, "ns", ns, "sa", sa)
}

// ControlPlane returns the ID of cluster's control plane.
func ControlPlane(td spiffeid.TrustDomain, cluster string) (spiffeid.ID, error) {
	return component(td, cluster, "controlplane")
}

// Gateway returns the ID of cluster's east-west gateways.
func Gateway(td spiffeid.TrustDomain, cluster string) (spiffeid.ID, error) {
	return component(td, cluster, "gateway")
}

// Admin returns the ID of cluster's administrators (the CLI).
func Admin(td spiffeid.TrustDomain, cluster string) (spiffeid.ID, error) {
	return component(td, cluster, "admin")
}

func component(td spiffeid.TrustDomain, cluster, kind string) (spiffeid.ID, error) {
	if err := ValidateClusterName(cluster); err != nil {
		return spiffeid.ID{}, err
	}
	return build(td, "cluster", cluster, kind)
}

func build(td spiffeid.TrustDomain, segments ...string) (spiffeid.ID, error) {
	if td.IsZero() {
		return spiffeid.ID{}, invalid("trust domain is empty")
	}
	id, err := spiffeid.FromSegments(td, segments...)
	if err != nil {
		return spiffeid.ID{}, invalid("%v", err)
	}
	if err := checkLengths(id); err != nil {
		return spiffeid.ID{}, err
	}
	return id, nil
}

// Classify says what id names in Strait's layout. An ID outside the layout is
// KindOther, not an error: foreign workloads may have any path.
func Classify(id spiffeid.ID) Info {
	info := Info{ID: id, Kind: KindOther}
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	switch {
	case len(segs) == 4 && segs[0] == "ns" && segs[2] == "sa" && checkName("", segs[1]) == nil && checkName("", segs[3]) == nil:
		info.Kind, info.Namespace, info.ServiceAccount = KindWorkload, segs[1], segs[3]
	case len(segs) == 3 && segs[0] == "cluster" && ValidateClusterName(segs[1]) == nil:
		kinds := map[string]Kind{"controlplane": KindControlPlane, "gateway": KindGateway, "admin": KindAdmin}
		if k, ok := kinds[segs[2]]; ok {
			info.Kind, info.Cluster = k, segs[1]
		}
	}
	return info
}

var (
	dnsLabel     = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	dnsSubdomain = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
)

// ValidateClusterName checks that name is a DNS label (RFC 1123) of at most 63
// bytes, as Kubernetes requires of names that end up in hostnames.
func ValidateClusterName(name string) error {
	switch {
	case name == "":
		return invalid("cluster name is empty")
	case len(name) > maxClusterNameLength:
		return invalid("cluster name is %d bytes, more than the limit of %d", len(name), maxClusterNameLength)
	case !dnsLabel.MatchString(name):
		return invalid("cluster name %q must be lower-case letters, digits and '-', starting and ending with a letter or digit", name)
	}
	return nil
}

// checkName checks a Kubernetes-style name (RFC 1123 subdomain).
func checkName(what, name string) error {
	switch {
	case name == "":
		return invalid("%s is empty", what)
	case len(name) > MaxSegmentLength:
		return invalid("%s is %d bytes, more than the limit of %d", what, len(name), MaxSegmentLength)
	case !dnsSubdomain.MatchString(name):
		return invalid("%s %q must be lower-case letters, digits, '-' and '.'", what, truncate(name))
	}
	return nil
}

func truncate(s string) string {
	const max = 80
	if len(s) <= max {
		return s
	}
	return s[:max] + "..."
}
