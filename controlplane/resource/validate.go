package resource

import (
	"bytes"
	"maps"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// APIVersion is the only API version so far.
const APIVersion = "strait.dev/v1alpha1"

// The kinds this package knows.
const (
	KindTrafficPolicy       = "TrafficPolicy"
	KindAuthorizationPolicy = "AuthorizationPolicy"
)

// Typed is a validated resource of a known kind: *TrafficPolicy or
// *AuthorizationPolicy or *ServiceExport. Only this package implements it.
type Typed interface {
	// Kind returns the resource's kind, e.g. "TrafficPolicy".
	Kind() string
	// ObjectMeta returns the resource's metadata, namespace defaulted.
	ObjectMeta() Metadata

	meta() *Metadata
	// spec returns a pointer to the spec struct, which is decoded into.
	spec() any
	// validate makes the kind's semantic checks on the decoded spec.
	validate(v *validator)
	// service returns the service the resource applies to.
	service() string
}

// kindInfo is what Validate needs to know about a kind.
type kindInfo struct {
	apiVersions  []string
	new          func() Typed
	specOptional bool
}

// kinds is the table of known kinds. A new kind is a Typed implementation
// and a line here.
var kinds = map[string]kindInfo{
	KindTrafficPolicy:       {apiVersions: []string{APIVersion}, new: func() Typed { return new(TrafficPolicy) }},
	KindAuthorizationPolicy: {apiVersions: []string{APIVersion}, new: func() Typed { return new(AuthorizationPolicy) }},
	KindServiceExport:       {apiVersions: []string{MCSAPIVersion}, new: func() Typed { return new(ServiceExport) }, specOptional: true},
}

// Kinds returns the known kinds, sorted.
func Kinds() []string { return slices.Sorted(maps.Keys(kinds)) }

// ServiceKey returns the namespace and service a resource applies to.
func ServiceKey(t Typed) (namespace, service string) {
	return namespaceOrDefault(t.ObjectMeta().Namespace), t.service()
}

// validator carries what semantic checks need.
type validator struct {
	td   spiffeid.TrustDomain
	errs *fieldErrors
}

func (v *validator) add(path, format string, args ...any) { v.errs.add(path, format, args...) }

// Validate checks obj strictly against its kind's schema and rules and
// returns the typed resource, namespace defaulted. SPIFFE IDs must be in trust
// domain td; a zero td skips that check, but then namespace shorthands in
// authorization policies cannot be resolved and are refused. The error is an
// *Error listing every problem found.
func Validate(obj Object, td spiffeid.TrustDomain) (Typed, error) {
	errs := &fieldErrors{}
	v := &validator{td: td, errs: errs}
	meta := obj.Metadata
	meta.Namespace = namespaceOrDefault(meta.Namespace)
	fail := func() (Typed, error) {
		return nil, &Error{Doc: obj.Doc, Kind: obj.Kind, Namespace: meta.Namespace, Name: meta.Name, Fields: errs.done()}
	}

	kind, known := kinds[obj.Kind]
	versions := kind.apiVersions
	if !known {
		versions = allVersions()
	}
	switch {
	case obj.APIVersion == "":
		v.add("apiVersion", "required; supported: %s", strings.Join(versions, ", "))
	case !slices.Contains(versions, obj.APIVersion):
		v.add("apiVersion", "unsupported version %s; supported: %s", quote(obj.APIVersion), strings.Join(versions, ", "))
	}
	switch {
	case obj.Kind == "":
		v.add("kind", "required; supported kinds: %s", strings.Join(Kinds(), ", "))
	case !known:
		msg := "unknown kind " + quote(obj.Kind) + "; supported kinds: " + strings.Join(Kinds(), ", ")
		if s := suggest(obj.Kind, Kinds()); s != "" {
			msg += "; did you mean " + strconv.Quote(s) + "?"
		}
		v.add("kind", "%s", msg)
	}
	v.dnsLabel("metadata.name", meta.Name, true)
	v.dnsLabel("metadata.namespace", meta.Namespace, true)
	v.labels("metadata.labels", meta.Labels)
	if !known {
		return fail()
	}

	t := kind.new()
	*t.meta() = meta
	spec := bytes.TrimSpace(obj.Spec)
	if len(spec) == 0 || string(spec) == "null" {
		if !kind.specOptional {
			v.add("spec", "required")
			return fail()
		}
		spec = []byte("{}")
	}
	generic, err := parseJSON(spec, "spec")
	if err != nil {
		v.add("spec", "invalid JSON: %v", err)
		return fail()
	}
	if _, ok := generic.(map[string]any); !ok {
		v.add("spec", "must be an object, got %s", describe(generic))
		return fail()
	}
	decoder{errs: errs}.object("spec", generic, reflect.ValueOf(t.spec()).Elem())
	t.validate(v)
	if !errs.empty() {
		return fail()
	}
	return t, nil
}

func allVersions() []string {
	var all []string
	for _, k := range kinds {
		for _, v := range k.apiVersions {
			if !slices.Contains(all, v) {
				all = append(all, v)
			}
		}
	}
	slices.Sort(all)
	return all
}

var (
	dnsLabelRE     = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	dnsSubdomainRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
	labelNameRE    = regexp.MustCompile(`^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$`)
)

// dnsLabel checks an RFC 1123 label of at most 63 characters.
func (v *validator) dnsLabel(path, s string, required bool) {
	switch {
	case s == "":
		if required {
			v.add(path, "required")
		}
	case len(s) > 63:
		v.add(path, "must be at most 63 characters, got %d", len(s))
	case !dnsLabelRE.MatchString(s):
		v.add(path, "must be a DNS-1123 label (lower-case letters, digits and '-', starting and ending with a letter or digit), got %s", quote(s))
	}
}

// labels checks label keys and values by Kubernetes' rules.
func (v *validator) labels(path string, labels map[string]string) {
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		p := mapKey(path, k)
		prefix, name, hasPrefix := strings.Cut(k, "/")
		if !hasPrefix {
			prefix, name = "", k
		}
		switch {
		case hasPrefix && (prefix == "" || len(prefix) > 253 || !dnsSubdomainRE.MatchString(prefix)):
			v.add(p, "key prefix must be a DNS-1123 subdomain of at most 253 characters")
			continue
		case name == "" || len(name) > 63 || !labelNameRE.MatchString(name):
			v.add(p, "key name must be at most 63 characters: letters, digits, '-', '_' and '.', starting and ending with a letter or digit")
			continue
		}
		if val := labels[k]; val != "" && (len(val) > 63 || !labelNameRE.MatchString(val)) {
			v.add(p, "value must be empty or at most 63 characters: letters, digits, '-', '_' and '.', starting and ending with a letter or digit; got %s", quote(val))
		}
	}
}

// enum checks that s is one of allowed, suggesting the closest value.
func (v *validator) enum(path, s string, allowed []string) bool {
	if slices.Contains(allowed, s) {
		return true
	}
	msg := "must be one of " + strings.Join(allowed, ", ") + ", got " + quote(s)
	if sug := suggest(s, allowed); sug != "" {
		msg += "; did you mean " + strconv.Quote(sug) + "?"
	}
	v.add(path, "%s", msg)
	return false
}
