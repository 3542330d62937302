package proxy

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// errNoPolicy refuses callers until the first snapshot has been applied.
var errNoPolicy = errors.New("no configuration from the control plane yet")

// authorizer is a compiled Authorization: DENY rules win; then, if there are
// ALLOW rules, the caller must match one; with none, any member of the trust
// domain may call (the caller's chain was already verified against it).
type authorizer struct {
	allowExact    map[string]string // id -> policy
	allowPrefixes []prefixRule
	denyExact     map[string]string
	denyPrefixes  []prefixRule
}

type prefixRule struct{ prefix, policy string }

func compileAuthorization(a *controlplanev1.Authorization) *authorizer {
	z := &authorizer{allowExact: map[string]string{}, denyExact: map[string]string{}}
	add := func(rules []*controlplanev1.AuthorizationRule, exact map[string]string, prefixes *[]prefixRule) {
		for _, r := range rules {
			for _, id := range r.GetSpiffeIds() {
				exact[id] = r.GetPolicy()
			}
			for _, p := range r.GetSpiffeIdPrefixes() {
				*prefixes = append(*prefixes, prefixRule{p, r.GetPolicy()})
			}
		}
	}
	add(a.GetAllow(), z.allowExact, &z.allowPrefixes)
	add(a.GetDeny(), z.denyExact, &z.denyPrefixes)
	return z
}

func (z *authorizer) check(id spiffeid.ID) error {
	if z == nil {
		return errNoPolicy
	}
	s := id.String()
	if p, ok := z.denyExact[s]; ok {
		return fmt.Errorf("denied by policy %s", p)
	}
	for _, r := range z.denyPrefixes {
		if strings.HasPrefix(s, r.prefix) {
			return fmt.Errorf("denied by policy %s", r.policy)
		}
	}
	if len(z.allowExact) == 0 && len(z.allowPrefixes) == 0 {
		return nil
	}
	if _, ok := z.allowExact[s]; ok {
		return nil
	}
	for _, r := range z.allowPrefixes {
		if strings.HasPrefix(s, r.prefix) {
			return nil
		}
	}
	return errors.New("not allowed by any policy")
}
