package resource

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"sigs.k8s.io/yaml"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// Object is one decoded document: its envelope checked for shape, its spec
// kept as JSON until Validate reads it against the kind's schema.
type Object struct {
	APIVersion string          `json:"apiVersion"`
	Kind       string          `json:"kind"`
	Metadata   Metadata        `json:"metadata"`
	Spec       json.RawMessage `json:"spec,omitempty"`
	// Doc is the 1-based index of the document in the input Decode read, for
	// error messages; 0 for objects from elsewhere.
	Doc int `json:"-"`
}

// Metadata names an object.
type Metadata struct {
	// Name is required: a DNS-1123 label.
	Name string `json:"name,omitempty"`
	// Namespace is a DNS-1123 label; empty means DefaultNamespace.
	Namespace string `json:"namespace,omitempty"`
	// Labels follow Kubernetes' rules for label keys and values. The admin
	// API cannot carry them yet: ToProto refuses an object that has any.
	Labels map[string]string `json:"labels,omitempty"`
	// Generation is output only: the store bumps it on every change. It is
	// accepted on input (so `strait get -o yaml` output can be re-applied)
	// and ignored.
	Generation uint64 `json:"generation,omitempty"`
}

// DefaultNamespace is the namespace of objects that name none.
const DefaultNamespace = "default"

// namespaceOrDefault returns ns, or DefaultNamespace if it is empty.
func namespaceOrDefault(ns string) string {
	if ns == "" {
		return DefaultNamespace
	}
	return ns
}

// Decode reads YAML or JSON into objects. YAML may hold several documents
// separated by "---" lines; empty documents are skipped. JSON may be one
// object or a list of objects. Decode checks the envelope's shape (fields
// apiVersion, kind, metadata and spec with the right types, nothing else);
// Validate checks the rest.
//
// On failure it returns no objects and an error that joins one *Error per
// bad document (use errors.As, or Unwrap() []error for all of them). Input
// with no documents gives ErrEmpty.
func Decode(data []byte) ([]Object, error) {
	docs := splitInput(data)
	if len(docs) == 0 {
		return nil, ErrEmpty
	}
	objs := make([]Object, 0, len(docs))
	var errs []error
	for i, raw := range docs {
		obj, err := decodeDoc(i+1, raw)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		objs = append(objs, obj)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return objs, nil
}

func decodeDoc(doc int, raw rawDoc) (Object, error) {
	obj := Object{Doc: doc}
	if raw.err != "" {
		return obj, &Error{Doc: doc, Fields: []FieldError{{Message: raw.err}}}
	}
	if _, ok := raw.value.(map[string]any); !ok {
		return obj, &Error{Doc: doc, Fields: []FieldError{{
			Message: "must be an object with apiVersion, kind, metadata and spec, got " + describe(raw.value),
		}}}
	}
	errs := &fieldErrors{}
	decoder{errs: errs}.object("", raw.value, reflect.ValueOf(&obj).Elem())
	if !errs.empty() {
		return obj, &Error{Doc: doc, Kind: obj.Kind, Namespace: obj.Metadata.Namespace, Name: obj.Metadata.Name, Fields: errs.done()}
	}
	return obj, nil
}

// Load decodes data and validates every object against trust domain td,
// returning the typed resources or an error joining one *Error per bad
// document.
func Load(data []byte, td spiffeid.TrustDomain) ([]Typed, error) {
	objs, err := Decode(data)
	if err != nil {
		return nil, err
	}
	typed := make([]Typed, 0, len(objs))
	var errs []error
	for _, obj := range objs {
		t, err := Validate(obj, td)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		typed = append(typed, t)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return typed, nil
}

// Encode prints objects as YAML documents separated by "---" lines, keys in
// alphabetical order (apiVersion, kind, metadata, spec), for
// `strait get -o yaml`.
func Encode(objs []Object) ([]byte, error) {
	var buf bytes.Buffer
	for i, obj := range objs {
		j, err := json.Marshal(obj)
		if err != nil {
			return nil, fmt.Errorf("encode %s: %w", objectName(obj), err)
		}
		y, err := yaml.JSONToYAML(j)
		if err != nil {
			return nil, fmt.Errorf("encode %s: %w", objectName(obj), err)
		}
		if i > 0 {
			buf.WriteString("---\n")
		}
		buf.Write(y)
	}
	return buf.Bytes(), nil
}

func objectName(obj Object) string {
	return printable(obj.Kind) + " " + printable(namespaceOrDefault(obj.Metadata.Namespace)) + "/" + printable(obj.Metadata.Name)
}

// ToProto converts an object for the admin API: the spec travels as compact
// JSON and an empty namespace becomes DefaultNamespace. It checks only that
// the spec is JSON; the server validates. Objects with labels are refused
// because Resource has no field for them yet.
func ToProto(obj Object) (*controlplanev1.Resource, error) {
	ns := namespaceOrDefault(obj.Metadata.Namespace)
	fail := func(path, msg string) error {
		return &Error{Doc: obj.Doc, Kind: obj.Kind, Namespace: ns, Name: obj.Metadata.Name,
			Fields: []FieldError{{Path: path, Message: msg}}}
	}
	if len(obj.Metadata.Labels) > 0 {
		return nil, fail("metadata.labels", "not supported by the admin API yet; remove the labels")
	}
	var spec []byte
	if len(obj.Spec) > 0 {
		var buf bytes.Buffer
		if err := json.Compact(&buf, obj.Spec); err != nil {
			return nil, fail("spec", "invalid JSON: "+err.Error())
		}
		spec = buf.Bytes()
	}
	if (len(spec) == 0 || string(spec) == "null") && kinds[obj.Kind].specOptional {
		spec = []byte("{}") // stored explicitly: the store keeps no empty specs
	}
	return &controlplanev1.Resource{
		ApiVersion: obj.APIVersion,
		Kind:       obj.Kind,
		Namespace:  ns,
		Name:       obj.Metadata.Name,
		SpecJson:   spec,
		Generation: obj.Metadata.Generation,
	}, nil
}

// FromProto converts a Resource from the admin API back to an object. It
// checks only that the spec is JSON; Validate checks the rest.
func FromProto(r *controlplanev1.Resource) (Object, error) {
	if r == nil {
		return Object{}, errors.New("resource: nil Resource")
	}
	obj := Object{
		APIVersion: r.GetApiVersion(),
		Kind:       r.GetKind(),
		Metadata: Metadata{
			Name:       r.GetName(),
			Namespace:  r.GetNamespace(),
			Generation: r.GetGeneration(),
		},
	}
	if spec := r.GetSpecJson(); len(spec) > 0 {
		if !json.Valid(spec) {
			return Object{}, &Error{Kind: obj.Kind, Namespace: obj.Metadata.Namespace, Name: obj.Metadata.Name,
				Fields: []FieldError{{Path: "spec", Message: "invalid JSON"}}}
		}
		obj.Spec = bytes.Clone(spec)
	}
	return obj, nil
}

// CanonicalKind maps what a user types on the command line (trafficpolicy,
// TrafficPolicies, tp, authz, se) to the kind's name; unknown input is
// returned unchanged (KnownKind tells).
func CanonicalKind(s string) string {
	l := strings.ToLower(s)
	for _, k := range Kinds() {
		kl := strings.ToLower(k)
		if l == kl || l == kl+"s" || strings.TrimSuffix(l, "ies")+"y" == kl {
			return k
		}
	}
	switch l {
	case "tp":
		return KindTrafficPolicy
	case "ap", "authz", "authorization":
		return KindAuthorizationPolicy
	case "se", "export", "exports":
		return KindServiceExport
	}
	return s
}

// KnownKind returns the kind s names (as CanonicalKind reads it), or an
// error listing the kinds there are.
func KnownKind(s string) (string, error) {
	k := CanonicalKind(s)
	if !slices.Contains(Kinds(), k) {
		return "", fmt.Errorf("unknown kind %q: one of %s", s, strings.Join(Kinds(), ", "))
	}
	return k, nil
}
