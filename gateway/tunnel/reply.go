package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Code is the outcome a receiver reports in a Reply. Codes are never
// reused; a receiver that gets a code it does not know treats it as a
// refusal it cannot explain further (only CodeOK lets bytes flow).
type Code uint8

// Reply codes.
const (
	CodeOK           Code = 0  // the target is connected; the relay starts after the reply
	CodeMalformed    Code = 1  // the header broke the format
	CodeUnsupported  Code = 2  // unknown version or kind, or a kind this hop does not carry
	CodeLimit        Code = 3  // a limit was hit: header size, streams, connections
	CodeTimeout      Code = 4  // the header did not arrive in time
	CodeUnauthorized Code = 5  // the caller may not use this gateway (e.g. its cluster is no longer linked)
	CodeNotLinked    Code = 6  // the target cluster is not a linked peer of the caller's cluster
	CodeNotImported  Code = 7  // the caller's cluster does not import the target service
	CodeNotExported  Code = 8  // the target service is not exported to the caller's cluster
	CodeNoEndpoints  Code = 9  // the target service has no healthy endpoint
	CodeDialFailed   Code = 10 // every endpoint tried refused or timed out
	CodeUnavailable  Code = 11 // the target's gateway (or the catalog) cannot be reached
	CodeMisrouted    Code = 12 // the header names a cluster other than the receiver's
)

var codeNames = [...]string{
	CodeOK:           "ok",
	CodeMalformed:    "malformed",
	CodeUnsupported:  "unsupported",
	CodeLimit:        "limit",
	CodeTimeout:      "timeout",
	CodeUnauthorized: "unauthorized",
	CodeNotLinked:    "not_linked",
	CodeNotImported:  "not_imported",
	CodeNotExported:  "not_exported",
	CodeNoEndpoints:  "no_endpoints",
	CodeDialFailed:   "dial_failed",
	CodeUnavailable:  "unavailable",
	CodeMisrouted:    "misrouted",
}

// String returns the code's snake_case name (usable as a metric label), or
// "code(N)" for a code this version does not know.
func (c Code) String() string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return "code(" + strconv.Itoa(int(c)) + ")"
}

// Reply is the receiving side's answer to a header.
type Reply struct {
	Code    Code
	Message string // one line of UTF-8 text, at most MaxMessageBytes
	// Endpoint, in an OK reply, names the endpoint instance the stream was
	// connected to: 1 to MaxEndpointBytes opaque bytes, the same for the
	// same instance while the receiving gateway runs (optional field
	// FieldEndpoint). It is advice: a sidecar picks the TLS session to
	// resume by it, as every instance of a service has its own ticket
	// keys. Empty: not known.
	Endpoint string
}

// Optional fields of a reply.
const (
	// FieldEndpoint carries Reply.Endpoint.
	FieldEndpoint byte = 1
	// MaxEndpointBytes bounds Reply.Endpoint.
	MaxEndpointBytes = 32
)

// Err returns nil for CodeOK and a *ReplyError otherwise.
func (r Reply) Err() error {
	if r.Code == CodeOK {
		return nil
	}
	return &ReplyError{Code: r.Code, Message: r.Message}
}

// ReplyError is a refusal received in a Reply.
type ReplyError struct {
	Code    Code
	Message string
}

func (e *ReplyError) Error() string {
	if e.Message == "" {
		return "tunnel: refused: " + e.Code.String()
	}
	return "tunnel: refused: " + e.Code.String() + ": " + e.Message
}

func replyError(sentinel error, format string, args ...any) error {
	return &FormatError{Part: "reply", Err: sentinel, Detail: fmt.Sprintf(format, args...)}
}

// SanitizeMessage makes s a valid reply message: invalid UTF-8 and control
// characters become replacement characters and spaces, and it is cut (on a
// character boundary) to MaxMessageBytes.
func SanitizeMessage(s string) string {
	if validMessage(s) == nil {
		return s
	}
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	if len(s) > MaxMessageBytes {
		i := MaxMessageBytes
		for i > 0 && !utf8.RuneStart(s[i]) {
			i--
		}
		s = s[:i]
	}
	return s
}

func validMessage(s string) error {
	if len(s) > MaxMessageBytes {
		return fmt.Errorf("message of %d bytes is more than the limit of %d", len(s), MaxMessageBytes)
	}
	for i, r := range s {
		if r == utf8.RuneError {
			if _, size := utf8.DecodeRuneInString(s[i:]); size == 1 {
				return fmt.Errorf("message is not valid UTF-8 at byte %d", i)
			}
		}
		if unicode.IsControl(r) {
			return fmt.Errorf("message holds control character %U at byte %d", r, i)
		}
	}
	return nil
}

// AppendReply appends the encoding of r to b, sanitizing the message (see
// SanitizeMessage) and leaving out an Endpoint longer than
// MaxEndpointBytes.
func AppendReply(b []byte, r Reply) []byte {
	msg := SanitizeMessage(r.Message)
	body := 2 + len(msg)
	ep := r.Endpoint
	if len(ep) > MaxEndpointBytes {
		ep = ""
	}
	if ep != "" {
		body += 2 + len(ep)
	}
	b = append(b, Version, byte(r.Code), byte(body>>8), byte(body))
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	if ep != "" {
		b = append(b, FieldEndpoint, byte(len(ep)))
		b = append(b, ep...)
	}
	return b
}

// WriteReply writes r to w in a single Write call.
func WriteReply(w io.Writer, r Reply) error {
	var buf [prefixBytes + 2 + MaxMessageBytes + 2 + MaxEndpointBytes]byte
	if _, err := w.Write(AppendReply(buf[:0], r)); err != nil {
		return fmt.Errorf("tunnel reply: write: %w", err)
	}
	return nil
}

// ReadReply reads one reply from r, reading nothing past it and refusing
// one of more than MaxReplyBytes before reading its body. Any code is
// accepted (see Code); the message must be valid (see SanitizeMessage).
func ReadReply(r io.Reader) (Reply, error) {
	var prefix [prefixBytes]byte
	if _, err := io.ReadFull(r, prefix[:1]); err != nil {
		return Reply{}, fmt.Errorf("tunnel reply: read: %w", err)
	}
	if v := prefix[0]; v != Version {
		return Reply{}, replyError(ErrUnsupportedVersion, "unsupported version %d (this gateway speaks %d)", v, Version)
	}
	if err := readFull(r, prefix[1:]); err != nil {
		return Reply{}, fmt.Errorf("tunnel reply: read: %w", err)
	}
	code := Code(prefix[1])
	n := int(binary.BigEndian.Uint16(prefix[2:]))
	if prefixBytes+n > MaxReplyBytes {
		return Reply{}, replyError(ErrTooLarge, "%d bytes, more than the limit of %d", prefixBytes+n, MaxReplyBytes)
	}
	var buf [MaxReplyBytes - prefixBytes]byte
	body := buf[:n]
	if err := readFull(r, body); err != nil {
		return Reply{}, fmt.Errorf("tunnel reply: read: %w", err)
	}
	d := decoder{b: body}
	m, ok := d.uint16()
	if !ok {
		return Reply{}, replyError(ErrMalformed, "message length overruns the reply")
	}
	if int(m) > MaxMessageBytes {
		return Reply{}, replyError(ErrMalformed, "message of %d bytes is more than the limit of %d", m, MaxMessageBytes)
	}
	if int(m) > len(d.b) {
		return Reply{}, replyError(ErrMalformed, "message of %d bytes overruns the reply (%d left)", m, len(d.b))
	}
	msg := string(d.b[:m])
	d.b = d.b[m:]
	if err := validMessage(msg); err != nil {
		return Reply{}, replyError(ErrMalformed, "%v", err)
	}
	rep := Reply{Code: code, Message: msg}
	// The endpoint field is advice: one this version cannot take (empty,
	// longer than it keeps, a second one) is skipped like an unknown
	// field, and never fails the stream.
	err := d.optional(func(typ byte, v []byte) error {
		if typ == FieldEndpoint && rep.Endpoint == "" && len(v) > 0 && len(v) <= MaxEndpointBytes {
			rep.Endpoint = string(v)
		}
		return nil
	})
	if err != nil {
		return Reply{}, replyError(ErrMalformed, "%v", err)
	}
	return rep, nil
}

// CodeFor picks the reply for a header that ReadHeader refused: the code
// that names the fault and a message that says what it was.
func CodeFor(err error) Reply {
	var code Code
	switch {
	case err == nil:
		return Reply{Code: CodeOK}
	case errors.Is(err, ErrUnsupportedVersion), errors.Is(err, ErrUnknownKind):
		code = CodeUnsupported
	case errors.Is(err, ErrTooLarge):
		code = CodeLimit
	case isTimeout(err):
		code = CodeTimeout
	default:
		code = CodeMalformed
	}
	return Reply{Code: code, Message: SanitizeMessage(err.Error())}
}

func isTimeout(err error) bool {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
