package resource

import (
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The typed resources are their own schema: a decoder walks a generic value
// (from parseJSON) against a Go type, using the json tags for field names and
// a `range:"min,max"` tag for integer bounds, and records every problem with
// its full path. Semantic checks (enumerations, names, SPIFFE IDs) are made
// afterwards on the typed value, by each kind's validate method.

var (
	durationType   = reflect.TypeFor[Duration]()
	rawMessageType = reflect.TypeFor[json.RawMessage]()
)

// Duration is a time.Duration written as a Go duration string ("1s",
// "500ms", "1m30s"). Negative durations are refused.
type Duration time.Duration

// String returns the duration in Go's notation.
func (d Duration) String() string { return time.Duration(d).String() }

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// UnmarshalJSON reads a duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return errors.New(`resource: a duration must be a string such as "1s" or "500ms"`)
	}
	v, err := parseDuration(s)
	if err != nil {
		return errors.New("resource: " + err.Error())
	}
	*d = Duration(v)
	return nil
}

func parseDuration(s string) (time.Duration, error) {
	v, err := time.ParseDuration(s)
	if err != nil {
		return 0, errors.New(`must be a duration such as "1s" or "500ms", got ` + quote(s))
	}
	if v < 0 {
		return 0, errors.New("must not be negative, got " + quote(s))
	}
	return v, nil
}

// fieldInfo describes one struct field of a schema.
type fieldInfo struct {
	name     string
	index    int
	min, max uint64
	bounded  bool
}

// schemaFields lists the decodable fields of struct type t.
func schemaFields(t reflect.Type) []fieldInfo {
	var fields []fieldInfo
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if !f.IsExported() || name == "" || name == "-" {
			continue
		}
		fi := fieldInfo{name: name, index: i}
		if lo, hi, ok := strings.Cut(f.Tag.Get("range"), ","); ok {
			l, err1 := strconv.ParseUint(lo, 10, 64)
			h, err2 := strconv.ParseUint(hi, 10, 64)
			if err1 == nil && err2 == nil {
				fi.min, fi.max, fi.bounded = l, h, true
			}
		}
		fields = append(fields, fi)
	}
	return fields
}

type decoder struct {
	errs *fieldErrors
}

// value decodes in into out. A null leaves out unset.
func (d decoder) value(path string, in any, out reflect.Value, fi fieldInfo) {
	if in == nil {
		return
	}
	switch out.Type() {
	case durationType:
		s, ok := in.(string)
		if !ok {
			d.wrongType(path, `a duration such as "1s" or "500ms"`, in)
			return
		}
		v, err := parseDuration(s)
		if err != nil {
			d.errs.add(path, "%s", err.Error())
			return
		}
		out.SetInt(int64(v))
		return
	case rawMessageType:
		if _, ok := in.(map[string]any); !ok {
			d.wrongType(path, "an object", in)
			return
		}
		b, err := json.Marshal(in)
		if err != nil {
			d.errs.add(path, "cannot be encoded as JSON: %v", err)
			return
		}
		out.SetBytes(b)
		return
	}
	switch out.Kind() {
	case reflect.Pointer:
		v := reflect.New(out.Type().Elem())
		d.value(path, in, v.Elem(), fi)
		out.Set(v)
	case reflect.Struct:
		d.object(path, in, out)
	case reflect.String:
		s, ok := in.(string)
		if !ok {
			d.wrongType(path, "a string", in)
			return
		}
		out.SetString(s)
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		d.unsigned(path, in, out, fi)
	case reflect.Slice:
		list, ok := in.([]any)
		if !ok {
			d.wrongType(path, "a list", in)
			return
		}
		s := reflect.MakeSlice(out.Type(), len(list), len(list))
		for i, e := range list {
			d.value(index(path, i), e, s.Index(i), fieldInfo{})
		}
		out.Set(s)
	case reflect.Map:
		m, ok := in.(map[string]any)
		if !ok || out.Type().Key().Kind() != reflect.String {
			d.wrongType(path, "an object", in)
			return
		}
		mv := reflect.MakeMapWithSize(out.Type(), len(m))
		for _, k := range sortedKeys(m) {
			ev := reflect.New(out.Type().Elem()).Elem()
			d.value(mapKey(path, k), m[k], ev, fieldInfo{})
			mv.SetMapIndex(reflect.ValueOf(k).Convert(out.Type().Key()), ev)
		}
		out.Set(mv)
	default:
		d.errs.add(path, "cannot be decoded (unsupported field type %s)", out.Type())
	}
}

// object decodes a JSON object into struct out, refusing unknown fields.
func (d decoder) object(path string, in any, out reflect.Value) {
	m, ok := in.(map[string]any)
	if !ok {
		d.wrongType(path, "an object", in)
		return
	}
	fields := schemaFields(out.Type())
	names := make([]string, len(fields))
	for i, f := range fields {
		names[i] = f.name
		if v, ok := m[f.name]; ok {
			d.value(field(path, f.name), v, out.Field(f.index), f)
		}
	}
	for _, k := range sortedKeys(m) {
		if slices.Contains(names, k) {
			continue
		}
		msg := "unknown field"
		if s := suggest(k, names); s != "" {
			msg += "; did you mean " + strconv.Quote(s) + "?"
		} else {
			msg += "; known fields: " + strings.Join(names, ", ")
		}
		d.errs.add(field(path, k), "%s", msg)
	}
}

// unsigned decodes an unsigned integer, checking the type's bounds and any
// range tag.
func (d decoder) unsigned(path string, in any, out reflect.Value, fi fieldInfo) {
	n, ok := in.(json.Number)
	if !ok {
		d.wrongType(path, "an integer", in)
		return
	}
	lo, hi := uint64(0), uint64(math.MaxUint64)>>(64-out.Type().Bits())
	if fi.bounded {
		lo, hi = max(lo, fi.min), min(hi, fi.max)
	}
	outOfRange := func() {
		if hi == uint64(math.MaxUint64)>>(64-out.Type().Bits()) {
			d.errs.add(path, "must be at least %d, got %s", lo, describe(in))
		} else {
			d.errs.add(path, "must be between %d and %d, got %s", lo, hi, describe(in))
		}
	}
	s := n.String()
	u, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		f, ferr := strconv.ParseFloat(s, 64)
		switch {
		case ferr != nil && !errors.Is(ferr, strconv.ErrRange):
			d.wrongType(path, "an integer", in)
			return
		case math.IsNaN(f) || f != math.Trunc(f):
			d.wrongType(path, "an integer", in)
			return
		case f < 0 || f >= 1<<64:
			outOfRange()
			return
		}
		u = uint64(f)
	}
	if u < lo || u > hi {
		outOfRange()
		return
	}
	out.SetUint(u)
}

func (d decoder) wrongType(path, want string, got any) {
	msg := "must be " + want + ", got " + describe(got)
	if _, ok := got.(bool); ok && want != "a boolean" {
		msg += ` (YAML reads unquoted true/false/yes/no/on/off as booleans: quote the value)`
	}
	d.errs.add(path, "%s", msg)
}

// describe renders a generic value for a message.
func describe(v any) string {
	switch v := v.(type) {
	case nil:
		return "null"
	case string:
		return quote(v)
	case json.Number:
		s := v.String()
		if len(s) > 32 {
			s = s[:32] + "..."
		}
		return s
	case bool:
		return strconv.FormatBool(v)
	case map[string]any:
		return "an object"
	case []any:
		return "a list"
	}
	return "a value of an unexpected type"
}

func sortedKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// suggest returns the candidate closest to got, if it is close enough to be
// a likely misspelling (case is ignored).
func suggest(got string, candidates []string) string {
	if len(got) == 0 || len(got) > 64 {
		return ""
	}
	g := strings.ToLower(got)
	best, bestDist := "", -1
	for _, c := range candidates {
		d := editDistance(g, strings.ToLower(c))
		if bestDist < 0 || d < bestDist {
			best, bestDist = c, d
		}
	}
	limit := 0
	if len(got) >= 3 {
		limit = 1
	}
	if len(got) >= 5 {
		limit = 2
	}
	if len(got) >= 10 {
		limit = 3
	}
	if bestDist < 0 || bestDist > limit {
		return ""
	}
	return best
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
