package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// Sentinel errors. Every decoding error wraps exactly one of them (or an I/O
// error of the reader), so a receiver can pick its reply with errors.Is or
// CodeFor.
var (
	// ErrUnsupportedVersion: the first byte names a major version this
	// package does not speak. Nothing after that byte was read.
	ErrUnsupportedVersion = errors.New("tunnel: unsupported version")
	// ErrUnknownKind: the header's kind is not one of this version's.
	ErrUnknownKind = errors.New("tunnel: unknown kind")
	// ErrTooLarge: the declared length is more than the limit. The body
	// was not read.
	ErrTooLarge = errors.New("tunnel: too large")
	// ErrMalformed: the body breaks the format (bad name, port, lengths
	// or trailing bytes).
	ErrMalformed = errors.New("tunnel: malformed")
)

// FormatError describes what is wrong with a header or reply. It wraps one
// of the package's sentinel errors.
type FormatError struct {
	Part   string // "header" or "reply"
	Err    error  // ErrUnsupportedVersion, ErrUnknownKind, ErrTooLarge or ErrMalformed
	Detail string // what is wrong, e.g. "port 0 out of range"
}

func (e *FormatError) Error() string { return "tunnel " + e.Part + ": " + e.Detail }

// Unwrap returns the sentinel error.
func (e *FormatError) Unwrap() error { return e.Err }

func headerError(sentinel error, format string, args ...any) error {
	return &FormatError{Part: "header", Err: sentinel, Detail: fmt.Sprintf(format, args...)}
}

// Kind says what a stream carries.
type Kind uint8

// Kinds of stream.
const (
	// KindData is a tunnelled connection to Cluster/Namespace/Service:Port.
	KindData Kind = 1
	// KindControl is the per-peer control stream (catalog exchange); it
	// names no target.
	KindControl Kind = 2
)

// String returns "data", "control" or "kind(N)".
func (k Kind) String() string {
	switch k {
	case KindData:
		return "data"
	case KindControl:
		return "control"
	}
	return "kind(" + strconv.Itoa(int(k)) + ")"
}

// Header opens a stream. A data header names its target; a control header
// has only its Kind (the other fields must be empty).
type Header struct {
	Kind      Kind
	Cluster   string // the cluster that serves the target (DNS label)
	Namespace string // DNS label
	Service   string // DNS label
	Port      uint16 // 1..65535
}

// String renders a data header as "namespace/service:port@cluster".
func (h Header) String() string {
	if h.Kind != KindData {
		return h.Kind.String()
	}
	return h.Namespace + "/" + h.Service + ":" + strconv.Itoa(int(h.Port)) + "@" + h.Cluster
}

// Validate reports the first field of h that the format does not allow.
func (h Header) Validate() error {
	switch h.Kind {
	case KindData:
		if err := checkLabel("cluster name", h.Cluster); err != nil {
			return err
		}
		if err := checkLabel("namespace", h.Namespace); err != nil {
			return err
		}
		if err := checkLabel("service", h.Service); err != nil {
			return err
		}
		if h.Port == 0 {
			return headerError(ErrMalformed, "port 0 out of range 1..65535")
		}
	case KindControl:
		if h.Cluster != "" || h.Namespace != "" || h.Service != "" || h.Port != 0 {
			return headerError(ErrMalformed, "a control header names no target")
		}
	default:
		return headerError(ErrUnknownKind, "unknown kind %d", uint8(h.Kind))
	}
	return nil
}

// checkLabel checks that s is an RFC 1123 DNS label: 1..63 bytes of
// lower-case letters, digits and '-', starting and ending with a letter or
// digit.
func checkLabel(what, s string) error {
	if s == "" {
		return headerError(ErrMalformed, "%s is empty", what)
	}
	if len(s) > MaxNameBytes {
		return headerError(ErrMalformed, "%s is %d bytes, more than the limit of %d", what, len(s), MaxNameBytes)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if !alnum && (c != '-' || i == 0 || i == len(s)-1) {
			return headerError(ErrMalformed, "%s %s is not a DNS label (lower-case letters, digits and '-', starting and ending with a letter or digit)", what, quote(s))
		}
	}
	return nil
}

// quote quotes s for an error message, bounded.
func quote(s string) string {
	const max = 64
	if len(s) > max {
		return strconv.Quote(s[:max]) + "..."
	}
	return strconv.Quote(s)
}

// AppendHeader appends the encoding of h to b. It fails (appending nothing)
// if h does not validate.
func AppendHeader(b []byte, h Header) ([]byte, error) {
	if err := h.Validate(); err != nil {
		return b, err
	}
	body := 0
	if h.Kind == KindData {
		body = 3 + len(h.Cluster) + len(h.Namespace) + len(h.Service) + 2
	}
	b = append(b, Version, byte(h.Kind), byte(body>>8), byte(body))
	if h.Kind == KindData {
		b = append(b, byte(len(h.Cluster)))
		b = append(b, h.Cluster...)
		b = append(b, byte(len(h.Namespace)))
		b = append(b, h.Namespace...)
		b = append(b, byte(len(h.Service)))
		b = append(b, h.Service...)
		b = binary.BigEndian.AppendUint16(b, h.Port)
	}
	return b, nil
}

// WriteHeader writes h to w in a single Write call.
func WriteHeader(w io.Writer, h Header) error {
	var buf [MaxDataHeaderBytes]byte
	b, err := AppendHeader(buf[:0], h)
	if err != nil {
		return err
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("tunnel header: write: %w", err)
	}
	return nil
}

// ReadHeader reads one header from r. It reads exactly the header's bytes
// and nothing after them, and refuses a header of more than max bytes
// (prefix included) before reading its body, so it never allocates more
// than max. A max of zero or less means DefaultMaxHeaderBytes; a max below
// the 4-byte prefix is raised to it.
//
// Errors wrap ErrUnsupportedVersion, ErrUnknownKind, ErrTooLarge or
// ErrMalformed, or the reader's error (io.EOF if r ended before the first
// byte, io.ErrUnexpectedEOF if it ended inside the header).
func ReadHeader(r io.Reader, max int) (Header, error) {
	if max <= 0 {
		max = DefaultMaxHeaderBytes
	}
	max = min(max, prefixBytes+maxBodyBytes)
	var prefix [prefixBytes]byte
	// The version byte is read alone: a header of another major version may
	// have another layout, so nothing beyond it is ours to consume.
	if _, err := io.ReadFull(r, prefix[:1]); err != nil {
		return Header{}, fmt.Errorf("tunnel header: read: %w", err)
	}
	if v := prefix[0]; v != Version {
		return Header{}, headerError(ErrUnsupportedVersion, "unsupported version %d (this gateway speaks %d)", v, Version)
	}
	if err := readFull(r, prefix[1:]); err != nil {
		return Header{}, fmt.Errorf("tunnel header: read: %w", err)
	}
	kind := Kind(prefix[1])
	if kind != KindData && kind != KindControl {
		return Header{}, headerError(ErrUnknownKind, "unknown kind %d", uint8(kind))
	}
	n := int(binary.BigEndian.Uint16(prefix[2:]))
	if prefixBytes+n > max {
		return Header{}, headerError(ErrTooLarge, "%d bytes, more than the limit of %d", prefixBytes+n, max)
	}
	body := make([]byte, n)
	if err := readFull(r, body); err != nil {
		return Header{}, fmt.Errorf("tunnel header: read: %w", err)
	}
	return parseHeaderBody(kind, body)
}

// readFull is io.ReadFull for a read that continues a started message: an
// end of stream there is always unexpected.
func readFull(r io.Reader, b []byte) error {
	_, err := io.ReadFull(r, b)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

func parseHeaderBody(kind Kind, body []byte) (Header, error) {
	h := Header{Kind: kind}
	d := decoder{b: body}
	if kind == KindData {
		var ok bool
		if h.Cluster, ok = d.name(); !ok {
			return Header{}, headerError(ErrMalformed, "cluster name overruns the header")
		}
		if h.Namespace, ok = d.name(); !ok {
			return Header{}, headerError(ErrMalformed, "namespace overruns the header")
		}
		if h.Service, ok = d.name(); !ok {
			return Header{}, headerError(ErrMalformed, "service overruns the header")
		}
		if h.Port, ok = d.uint16(); !ok {
			return Header{}, headerError(ErrMalformed, "port overruns the header")
		}
	}
	if err := d.optional(nil); err != nil {
		return Header{}, headerError(ErrMalformed, "%v", err)
	}
	if err := h.Validate(); err != nil {
		return Header{}, err
	}
	return h, nil
}

// decoder walks a body.
type decoder struct{ b []byte }

func (d *decoder) name() (string, bool) {
	if len(d.b) < 1 || len(d.b) < 1+int(d.b[0]) {
		return "", false
	}
	n := int(d.b[0])
	s := string(d.b[1 : 1+n])
	d.b = d.b[1+n:]
	return s, true
}

func (d *decoder) uint16() (uint16, bool) {
	if len(d.b) < 2 {
		return 0, false
	}
	v := binary.BigEndian.Uint16(d.b)
	d.b = d.b[2:]
	return v, true
}

// optional consumes the optional fields that may follow the fixed fields
// of a version: each is a type byte, a length byte and that many bytes of
// value. known, if not nil, is handed each field's type and value and
// fails a field it knows to be malformed; the rest are skipped. The
// remainder must be made of whole fields.
func (d *decoder) optional(known func(typ byte, v []byte) error) error {
	for len(d.b) > 0 {
		if len(d.b) < 2 {
			return fmt.Errorf("%d trailing bytes are not an optional field", len(d.b))
		}
		typ, n := d.b[0], int(d.b[1])
		if len(d.b) < 2+n {
			return fmt.Errorf("optional field of type %d declares %d bytes, %d left", typ, n, len(d.b)-2)
		}
		if known != nil {
			if err := known(typ, d.b[2:2+n]); err != nil {
				return err
			}
		}
		d.b = d.b[2+n:]
	}
	return nil
}
