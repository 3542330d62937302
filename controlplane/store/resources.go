package store

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strings"

	bolt "go.etcd.io/bbolt"
)

// Resource is one applied object, as `strait apply` sends it.
type Resource struct {
	// APIVersion, e.g. "strait.dev/v1alpha1". Required.
	APIVersion string
	// Kind, e.g. "TrafficPolicy": an upper-case letter, then letters and
	// digits. Required.
	Kind string
	// Namespace: a DNS label, or empty for a cluster-scoped kind.
	Namespace string
	// Name: a DNS subdomain (RFC 1123). Required.
	Name string
	// Spec is the object's spec as canonical JSON. The store compares it
	// byte for byte: the caller canonicalises it.
	Spec []byte
	// Generation is set by the store: 1 on creation, +1 on every change.
	// It is ignored on input.
	Generation uint64
}

// Apply actions, as ApplyResult.Action reports them.
const (
	ActionCreated    = "created"
	ActionConfigured = "configured"
	ActionUnchanged  = "unchanged"
)

// ApplyResult says what Apply did (or Plan would do) to one resource.
type ApplyResult struct {
	Kind, Namespace, Name string
	// Action is ActionCreated, ActionConfigured or ActionUnchanged.
	Action string
	// Generation is the resource's generation after the apply.
	Generation uint64
}

// Limits on resources.
const (
	MaxSpecBytes = 1 << 20
	maxKindLen   = 63
	maxLabelLen  = 63
	maxNameLen   = 253
)

var (
	kindRE       = regexp.MustCompile(`^[A-Z][A-Za-z0-9]*$`)
	apiVersionRE = regexp.MustCompile(`^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?v[0-9]+((alpha|beta)[0-9]+)?$`)
	dnsLabelRE   = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	dnsSubdomRE  = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)
)

// checkLabel checks a DNS label (RFC 1123): at most 63 lower-case letters,
// digits and '-', starting and ending with a letter or digit.
func checkLabel(field, v string) error {
	switch {
	case v == "":
		return fmt.Errorf("%w: %s is empty", ErrInvalid, field)
	case len(v) > maxLabelLen:
		return fmt.Errorf("%w: %s is %d bytes, more than %d", ErrInvalid, field, len(v), maxLabelLen)
	case !dnsLabelRE.MatchString(v):
		return fmt.Errorf("%w: %s %q must be a DNS label: lower-case letters, digits and '-'", ErrInvalid, field, v)
	}
	return nil
}

// ValidateResource checks the identifying fields and the spec of r. It is
// what Apply checks before storing anything; the admin API may call it for
// a dry run.
func ValidateResource(r Resource) error {
	switch {
	case r.Kind == "":
		return fmt.Errorf("%w: kind is empty", ErrInvalid)
	case len(r.Kind) > maxKindLen || !kindRE.MatchString(r.Kind):
		return fmt.Errorf("%w: kind %q must be an upper-case letter then letters and digits, at most %d", ErrInvalid, trunc(r.Kind), maxKindLen)
	case r.APIVersion == "":
		return fmt.Errorf("%w: apiVersion is empty", ErrInvalid)
	case len(r.APIVersion) > maxNameLen || !apiVersionRE.MatchString(r.APIVersion):
		return fmt.Errorf("%w: apiVersion %q must look like group/v1 or v1beta1", ErrInvalid, trunc(r.APIVersion))
	case r.Name == "":
		return fmt.Errorf("%w: name is empty", ErrInvalid)
	case len(r.Name) > maxNameLen || !dnsSubdomRE.MatchString(r.Name):
		return fmt.Errorf("%w: name %q must be a DNS subdomain of at most %d bytes", ErrInvalid, trunc(r.Name), maxNameLen)
	case len(r.Spec) == 0:
		return fmt.Errorf("%w: spec is empty", ErrInvalid)
	case len(r.Spec) > MaxSpecBytes:
		return fmt.Errorf("%w: spec is %d bytes, more than %d", ErrInvalid, len(r.Spec), MaxSpecBytes)
	case !json.Valid(r.Spec):
		return fmt.Errorf("%w: spec is not valid JSON", ErrInvalid)
	}
	if r.Namespace != "" {
		if err := checkLabel("namespace", r.Namespace); err != nil {
			return err
		}
	}
	return nil
}

// resourceKey encodes (kind, namespace, name) injectively: none of the three
// may contain NUL (validation allows no NUL), so the first two NULs are the
// separators. Byte order of keys is the order of (kind, namespace, name)
// because NUL sorts before every other byte.
func resourceKey(kind, ns, name string) []byte {
	k := make([]byte, 0, len(kind)+len(ns)+len(name)+2)
	k = append(k, kind...)
	k = append(k, 0)
	k = append(k, ns...)
	k = append(k, 0)
	return append(k, name...)
}

func splitResourceKey(k []byte) (kind, ns, name string, err error) {
	parts := bytes.SplitN(k, []byte{0}, 3)
	if len(parts) != 3 || bytes.IndexByte(parts[2], 0) >= 0 {
		return "", "", "", fmt.Errorf("%w: resource key %q", ErrCorrupt, k)
	}
	return string(parts[0]), string(parts[1]), string(parts[2]), nil
}

// resourceValue is the stored form of a resource; the key holds the rest.
type resourceValue struct {
	APIVersion string `json:"apiVersion"`
	Spec       []byte `json:"spec"`
	Generation uint64 `json:"generation"`
}

func decodeResource(k, v []byte) (Resource, error) {
	kind, ns, name, err := splitResourceKey(k)
	if err != nil {
		return Resource{}, err
	}
	var rv resourceValue
	if err := json.Unmarshal(v, &rv); err != nil {
		return Resource{}, fmt.Errorf("%w: resource %s %s/%s: %v", ErrCorrupt, kind, ns, name, err)
	}
	return Resource{APIVersion: rv.APIVersion, Kind: kind, Namespace: ns, Name: name, Spec: rv.Spec, Generation: rv.Generation}, nil
}

func ref(kind, ns, name string) string {
	if ns == "" {
		return kind + " " + name
	}
	return kind + " " + ns + "/" + name
}

// validateBatch checks every resource and that no two name the same object.
func validateBatch(rs []Resource) error {
	seen := make(map[string]int, len(rs))
	for i, r := range rs {
		if err := ValidateResource(r); err != nil {
			return fmt.Errorf("resource %d (counting from 1): %w", i+1, err)
		}
		k := string(resourceKey(r.Kind, r.Namespace, r.Name))
		if j, dup := seen[k]; dup {
			return fmt.Errorf("%w: resources %d and %d (counting from 1) are both %s", ErrInvalid, j+1, i+1, ref(r.Kind, r.Namespace, r.Name))
		}
		seen[k] = i
	}
	return nil
}

// Apply creates or updates rs in one transaction: if any resource is
// invalid, or two name the same object, nothing is stored. A resource whose
// apiVersion and spec bytes equal the stored ones is unchanged; otherwise its
// generation grows by one. Results are in the order of rs. The revision is
// bumped (once) and subscribers notified only if something changed.
func (s *Store) Apply(rs []Resource) ([]ApplyResult, error) {
	if err := validateBatch(rs); err != nil {
		return nil, err
	}
	var results []ApplyResult
	err := s.mutate(func(tx *bolt.Tx) (bool, error) {
		var changed bool
		var err error
		results, changed, err = applyTx(tx.Bucket(bucketResources), rs, true)
		return changed, err
	})
	if err != nil {
		return nil, err
	}
	return results, nil
}

// Plan reports what Apply(rs) would do without storing anything: a dry run.
func (s *Store) Plan(rs []Resource) ([]ApplyResult, error) {
	if err := validateBatch(rs); err != nil {
		return nil, err
	}
	var results []ApplyResult
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		results, _, err = applyTx(tx.Bucket(bucketResources), rs, false)
		return err
	})
	return results, err
}

func applyTx(b *bolt.Bucket, rs []Resource, write bool) ([]ApplyResult, bool, error) {
	results := make([]ApplyResult, 0, len(rs))
	changed := false
	for _, r := range rs {
		key := resourceKey(r.Kind, r.Namespace, r.Name)
		res := ApplyResult{Kind: r.Kind, Namespace: r.Namespace, Name: r.Name}
		if v := b.Get(key); v == nil {
			res.Action, res.Generation = ActionCreated, 1
		} else {
			old, err := decodeResource(key, v)
			if err != nil {
				return nil, false, err
			}
			if old.APIVersion == r.APIVersion && bytes.Equal(old.Spec, r.Spec) {
				res.Action, res.Generation = ActionUnchanged, old.Generation
			} else {
				res.Action, res.Generation = ActionConfigured, old.Generation+1
			}
		}
		results = append(results, res)
		if res.Action == ActionUnchanged || !write {
			continue
		}
		changed = true
		v, err := json.Marshal(resourceValue{APIVersion: r.APIVersion, Spec: r.Spec, Generation: res.Generation})
		if err != nil {
			return nil, false, err
		}
		if err := b.Put(key, v); err != nil {
			return nil, false, fmt.Errorf("store: put %s: %w", ref(r.Kind, r.Namespace, r.Name), err)
		}
	}
	return results, changed, nil
}

// List returns the resources matching the filter, sorted by kind, namespace
// and name. An empty kind, namespace or name matches any.
func (s *Store) List(kind, namespace, name string) ([]Resource, error) {
	var out []Resource
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketResources).Cursor()
		var prefix []byte
		if kind != "" {
			prefix = append([]byte(kind), 0)
			if namespace != "" {
				prefix = append(append(prefix, namespace...), 0)
			}
		}
		for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
			r, err := decodeResource(k, v)
			if err != nil {
				return err
			}
			if (kind == "" || r.Kind == kind) && (namespace == "" || r.Namespace == namespace) && (name == "" || r.Name == name) {
				out = append(out, r)
			}
		}
		return nil
	})
	return out, err
}

// Get returns one resource, or an error wrapping ErrNotFound.
func (s *Store) Get(kind, namespace, name string) (Resource, error) {
	var r Resource
	err := s.db.View(func(tx *bolt.Tx) error {
		key := resourceKey(kind, namespace, name)
		v := tx.Bucket(bucketResources).Get(key)
		if v == nil || !validKeyPart(kind, namespace, name) {
			return fmt.Errorf("%w: %s", ErrNotFound, ref(kind, namespace, name))
		}
		var err error
		r, err = decodeResource(key, v)
		return err
	})
	return r, err
}

// Delete removes one resource, or returns an error wrapping ErrNotFound.
func (s *Store) Delete(kind, namespace, name string) error {
	return s.mutate(func(tx *bolt.Tx) (bool, error) {
		b := tx.Bucket(bucketResources)
		key := resourceKey(kind, namespace, name)
		if !validKeyPart(kind, namespace, name) || b.Get(key) == nil {
			return false, fmt.Errorf("%w: %s", ErrNotFound, ref(kind, namespace, name))
		}
		return true, b.Delete(key)
	})
}

// validKeyPart rejects lookups whose parts contain NUL, which could
// otherwise alias another key (no stored key has such parts).
func validKeyPart(parts ...string) bool {
	return !slices.ContainsFunc(parts, func(p string) bool { return strings.IndexByte(p, 0) >= 0 })
}

func trunc(s string) string { return truncTo(s, 64) }

// truncTo cuts s to limit bytes, marking the cut with "...".
func truncTo(s string, limit int) string {
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}
