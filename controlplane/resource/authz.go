package resource

import (
	"cmp"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// Authorization actions.
const (
	ActionAllow = "ALLOW"
	ActionDeny  = "DENY"
)

// AuthorizationPolicy says who may (ALLOW) or may not (DENY) call a service:
// kind AuthorizationPolicy.
type AuthorizationPolicy struct {
	Metadata Metadata
	Spec     AuthorizationPolicySpec
	// TrustDomain is the mesh's trust domain, captured by Validate; namespace
	// shorthands in Spec.From are resolved in it.
	TrustDomain spiffeid.TrustDomain
}

// AuthorizationPolicySpec is an AuthorizationPolicy's spec.
type AuthorizationPolicySpec struct {
	// Service is required: the DNS-1123 label of the service called.
	Service string `json:"service"`
	// Action is ALLOW or DENY; empty means ALLOW.
	Action string `json:"action,omitempty"`
	// From is required: the callers the policy matches, at least one.
	From []Source `json:"from"`
}

// Source matches callers. Exactly one of SPIFFEID, SPIFFEIDPrefix and
// Namespace is set.
type Source struct {
	// SPIFFEID is one exact workload ID in the trust domain.
	SPIFFEID string `json:"spiffeID,omitempty"`
	// SPIFFEIDPrefix ends in "/" and matches every ID under it, e.g.
	// "spiffe://td/ns/ops/".
	SPIFFEIDPrefix string `json:"spiffeIDPrefix,omitempty"`
	// Namespace is shorthand for the prefix spiffe://<td>/ns/<namespace>/.
	Namespace string `json:"namespace,omitempty"`
	// ServiceAccount, only with Namespace, narrows it to the exact ID
	// spiffe://<td>/ns/<namespace>/sa/<serviceAccount>.
	ServiceAccount string `json:"serviceAccount,omitempty"`
}

// Kind returns "AuthorizationPolicy".
func (*AuthorizationPolicy) Kind() string { return KindAuthorizationPolicy }

// ObjectMeta returns the policy's metadata.
func (p *AuthorizationPolicy) ObjectMeta() Metadata { return p.Metadata }

func (p *AuthorizationPolicy) meta() *Metadata { return &p.Metadata }
func (p *AuthorizationPolicy) spec() any       { return &p.Spec }
func (p *AuthorizationPolicy) service() string { return p.Spec.Service }

// action returns the policy's action, defaulted.
func (p *AuthorizationPolicy) action() string {
	if p.Spec.Action == "" {
		return ActionAllow
	}
	return p.Spec.Action
}

func (p *AuthorizationPolicy) validate(v *validator) {
	p.TrustDomain = v.td
	s := &p.Spec
	v.dnsLabel("spec.service", s.Service, true)
	if s.Action != "" {
		v.enum("spec.action", s.Action, []string{ActionAllow, ActionDeny})
	}
	if len(s.From) == 0 {
		v.add("spec.from", "required: list at least one source (spiffeID, spiffeIDPrefix or namespace)")
	}
	for i, src := range s.From {
		validateSource(v, index("spec.from", i), src)
	}
}

func validateSource(v *validator, path string, src Source) {
	var set []string
	for _, f := range []struct{ name, value string }{
		{"spiffeID", src.SPIFFEID}, {"spiffeIDPrefix", src.SPIFFEIDPrefix}, {"namespace", src.Namespace},
	} {
		if f.value != "" {
			set = append(set, f.name)
		}
	}
	switch {
	case len(set) > 1:
		v.add(path, "set exactly one of spiffeID, spiffeIDPrefix and namespace, got %s", strings.Join(set, " and "))
		return
	case src.ServiceAccount != "" && src.Namespace == "":
		v.add(field(path, "serviceAccount"), "requires namespace")
		return
	case len(set) == 0:
		v.add(path, "set one of spiffeID, spiffeIDPrefix and namespace")
		return
	}
	switch {
	case src.SPIFFEID != "":
		p := field(path, "spiffeID")
		id, err := identity.Parse(src.SPIFFEID)
		if err == nil {
			err = identity.CheckLeaf(id)
		}
		if err != nil {
			v.add(p, "must be a SPIFFE ID with a path: %v", err)
			return
		}
		checkTrustDomain(v, p, id.TrustDomain())
	case src.SPIFFEIDPrefix != "":
		p := field(path, "spiffeIDPrefix")
		if !strings.HasSuffix(src.SPIFFEIDPrefix, "/") {
			v.add(p, `must end with "/" so that it matches whole path segments, got %s`, quote(src.SPIFFEIDPrefix))
			return
		}
		id, err := identity.Parse(strings.TrimSuffix(src.SPIFFEIDPrefix, "/"))
		if err != nil {
			v.add(p, `must be a SPIFFE ID followed by "/": %v`, err)
			return
		}
		checkTrustDomain(v, p, id.TrustDomain())
	default:
		v.dnsLabel(field(path, "namespace"), src.Namespace, true)
		if src.ServiceAccount != "" {
			if len(src.ServiceAccount) > 253 || !dnsSubdomainRE.MatchString(src.ServiceAccount) {
				v.add(field(path, "serviceAccount"), "must be a DNS-1123 subdomain (lower-case letters, digits, '-' and '.'), got %s", quote(src.ServiceAccount))
			}
		}
		if v.td.IsZero() {
			v.add(field(path, "namespace"), "cannot be resolved to a SPIFFE ID without the trust domain")
		}
	}
}

func checkTrustDomain(v *validator, path string, td spiffeid.TrustDomain) {
	if !v.td.IsZero() && td != v.td {
		v.add(path, "trust domain %s is not this mesh's trust domain %s", quote(td.Name()), quote(v.td.Name()))
	}
}

// resolve returns the exact ID or the ID prefix src stands for; both are
// empty if src cannot be resolved (it did not pass Validate).
func (p *AuthorizationPolicy) resolve(src Source) (id, prefix string) {
	switch {
	case src.SPIFFEID != "":
		if parsed, err := identity.Parse(src.SPIFFEID); err == nil {
			return parsed.String(), ""
		}
	case src.SPIFFEIDPrefix != "":
		if parsed, err := identity.Parse(strings.TrimSuffix(src.SPIFFEIDPrefix, "/")); err == nil {
			return "", parsed.String() + "/"
		}
	case src.Namespace != "" && !p.TrustDomain.IsZero():
		if src.ServiceAccount != "" {
			if w, err := identity.Workload(p.TrustDomain, src.Namespace, src.ServiceAccount); err == nil {
				return w.String(), ""
			}
			return "", ""
		}
		if ns, err := spiffeid.FromSegments(p.TrustDomain, "ns", src.Namespace); err == nil {
			return "", ns.String() + "/"
		}
	}
	return "", ""
}

// BuildAuthorization turns the validated policies of one service into the
// service's Authorization: one rule per policy, named "namespace/name", in
// Allow or Deny by action, ordered by namespace and name. Namespace
// shorthands become the prefix spiffe://<td>/ns/<namespace>/ or, with a
// service account, the exact workload ID, in the trust domain captured by
// Validate. With no policies, the result is empty: any member of the trust
// domain may call.
func BuildAuthorization(policies []*AuthorizationPolicy) *controlplanev1.Authorization {
	sorted := slices.DeleteFunc(slices.Clone(policies), func(p *AuthorizationPolicy) bool { return p == nil })
	slices.SortStableFunc(sorted, func(a, b *AuthorizationPolicy) int {
		return cmp.Or(
			cmp.Compare(namespaceOrDefault(a.Metadata.Namespace), namespaceOrDefault(b.Metadata.Namespace)),
			cmp.Compare(a.Metadata.Name, b.Metadata.Name))
	})
	out := &controlplanev1.Authorization{}
	for _, p := range sorted {
		rule := &controlplanev1.AuthorizationRule{Policy: namespaceOrDefault(p.Metadata.Namespace) + "/" + p.Metadata.Name}
		for _, src := range p.Spec.From {
			id, prefix := p.resolve(src)
			if id != "" && !slices.Contains(rule.SpiffeIds, id) {
				rule.SpiffeIds = append(rule.SpiffeIds, id)
			}
			if prefix != "" && !slices.Contains(rule.SpiffeIdPrefixes, prefix) {
				rule.SpiffeIdPrefixes = append(rule.SpiffeIdPrefixes, prefix)
			}
		}
		if p.action() == ActionDeny {
			out.Deny = append(out.Deny, rule)
		} else {
			out.Allow = append(out.Allow, rule)
		}
	}
	return out
}
