package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// The HTTP/1.1 fast path forwards the plain, common requests and
// responses as bytes: the head is parsed in place in the connection's
// read buffer (no http.Request, no header map), hop-by-hop fields are
// dropped while it is copied out, and the body is copied by its framing.
// It takes only what it can judge completely: a request whose head and
// body sit whole in the read buffer, HTTP/1.1, an origin-form target, one
// Host, at most one Content-Length, and none of Transfer-Encoding, Expect,
// Upgrade, TE, Trailer or a Connection field naming other fields.
// Everything else, and anything malformed, goes to the net/http based
// path, which parses it afresh from the same untouched buffer and answers
// or refuses it as before. A response outside the subset (a head too
// large for the buffer, a body framed by the close, a Connection field
// naming fields, trailers announced) is read with http.ReadResponse.

// h1Field is one field of a parsed head; both slices point into the read
// buffer and are valid until it is read past.
type h1Field struct{ name, value []byte }

// h1Head is a request or response head parsed in place.
type h1Head struct {
	n      int    // bytes of the head, its empty line included
	line   []byte // the start line, without its CRLF
	method []byte // request
	status int    // response
	fields []h1Field
	length int64 // Content-Length, -1 if none
	// chunked: a response with Transfer-Encoding: chunked; close: a
	// Connection: close.
	chunked, close bool
}

const (
	h1FastMaxFields = 64
	h1FastMaxLength = 1 << 40
	// h1FastMaxChunkLine bounds a chunk-size or trailer line.
	h1FastMaxChunkLine = 4096
)

var crlfcrlf = []byte("\r\n\r\n")

// peekRequest parses the request at the front of br without consuming
// anything, reading more into br's buffer if the head or the body is not
// there yet. It reports false if the request is not one for the fast path
// (or reading failed): the caller then serves it the usual way.
func (h *h1Head) peekRequest(br *bufio.Reader) bool {
	b, ok := peekHead(br)
	if !ok || !h.parse(b, true) {
		return false
	}
	// The body must be there already (it usually comes with the head): a
	// slow one is streamed by the net/http path instead of waited for.
	return h.length <= 0 || int64(br.Buffered()-h.n) >= h.length
}

// peekHead returns the buffered bytes of br up to and including the first
// empty line, reading more as needed; false if the head does not fit in
// the buffer, has a line ending in a bare LF (net/http reads those: no
// waiting for a CRLF that is not coming) or reading fails.
func peekHead(br *bufio.Reader) ([]byte, bool) {
	for {
		b, _ := br.Peek(br.Buffered())
		if i := bytes.Index(b, crlfcrlf); i >= 0 {
			return b[:i+4], true
		}
		if len(b) >= br.Size() || bareLF(b) {
			return nil, false
		}
		if _, err := br.Peek(len(b) + 1); err != nil {
			return nil, false
		}
	}
}

// bareLF reports whether b has an LF not preceded by a CR.
func bareLF(b []byte) bool {
	for i := 0; ; {
		j := bytes.IndexByte(b[i:], '\n')
		if j < 0 {
			return false
		}
		if i+j == 0 || b[i+j-1] != '\r' {
			return true
		}
		i += j + 1
	}
}

// parse parses b, a whole head ending in its empty line, as a request or a
// response. It reports false for anything outside the fast path's subset.
func (h *h1Head) parse(b []byte, request bool) bool {
	*h = h1Head{n: len(b), fields: h.fields[:0], length: -1}
	i := bytes.Index(b, []byte("\r\n"))
	h.line = b[:i]
	if request && !h.parseRequestLine() || !request && !h.parseStatusLine() {
		return false
	}
	hosts, te := 0, false
	rest := b[i+2 : len(b)-2]
	for len(rest) > 0 {
		j := bytes.Index(rest, []byte("\r\n"))
		if j < 0 || len(h.fields) == h1FastMaxFields {
			return false
		}
		name, value, ok := parseField(rest[:j])
		rest = rest[j+2:]
		if !ok {
			return false
		}
		switch {
		case asciiEqualFold(name, "Content-Length"):
			if h.length >= 0 {
				return false
			}
			if h.length = parseLength(value); h.length < 0 {
				return false
			}
		case asciiEqualFold(name, "Transfer-Encoding"):
			if request || te || !asciiEqualFold(value, "chunked") {
				return false
			}
			te, h.chunked = true, true
		case asciiEqualFold(name, "Connection"):
			switch {
			case asciiEqualFold(value, "close"):
				h.close = true
			case asciiEqualFold(value, "keep-alive"):
			default:
				return false // it may name fields to remove
			}
		case asciiEqualFold(name, "Host"):
			hosts++
			if hosts > 1 || len(value) == 0 || !httpguts.ValidHostHeader(string(value)) {
				return false
			}
		case asciiEqualFold(name, "Expect"), asciiEqualFold(name, "Upgrade"), asciiEqualFold(name, "TE"),
			asciiEqualFold(name, "Trailer"), asciiEqualFold(name, "HTTP2-Settings"):
			return false
		}
		h.fields = append(h.fields, h1Field{name, value})
	}
	if request && hosts != 1 {
		return false
	}
	if h.chunked && h.length >= 0 {
		return false // both framings: never forwarded as bytes
	}
	return true
}

func (h *h1Head) parseRequestLine() bool {
	l := h.line
	sp := bytes.IndexByte(l, ' ')
	if sp <= 0 || !isToken(l[:sp]) {
		return false
	}
	h.method = l[:sp]
	l = l[sp+1:]
	sp = bytes.IndexByte(l, ' ')
	if sp <= 0 || l[0] != '/' || string(l[sp+1:]) != "HTTP/1.1" {
		return false
	}
	if !validTarget(l[:sp]) {
		return false
	}
	return !bytes.Equal(h.method, []byte("CONNECT"))
}

// validTarget reports whether an origin-form target reaches the next hop
// as the net/http path would send it: a path of characters net/url leaves
// unescaped and well-formed percent escapes, and a query url.ParseQuery
// accepts whole (httputil.ReverseProxy drops the parameters it does not).
// No fragment.
func validTarget(t []byte) bool {
	path := true
	for i := 0; i < len(t); i++ {
		c := t[i]
		switch {
		case c == '%':
			if i+2 >= len(t) || !isHex(t[i+1]) || !isHex(t[i+2]) {
				return false
			}
		case c == '?' && path:
			path = false
		case c <= ' ' || c >= 0x7f || c == '#':
			return false
		case path && !pathChar(c):
			return false
		case !path && c == ';':
			return false
		}
	}
	return true
}

// pathChar: unreserved, sub-delims, ':', '@', '/' and the brackets
// net/url lets stand in a path.
func pathChar(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("-._~!$&'()*+,;=:@/[]", c) >= 0
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func (h *h1Head) parseStatusLine() bool {
	l := h.line
	if len(l) < 12 || string(l[:9]) != "HTTP/1.1 " {
		return false
	}
	code := 0
	for _, c := range l[9:12] {
		if c < '0' || c > '9' {
			return false
		}
		code = code*10 + int(c-'0')
	}
	if code < 100 || code > 599 || len(l) > 12 && l[12] != ' ' {
		return false
	}
	for _, c := range l[12:] {
		if c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	h.status = code
	return true
}

// parseField splits a field line; false for anything but name ":" OWS
// value OWS with a token name and a value of visible characters, spaces
// and tabs (obs-text allowed, as net/http allows it).
func parseField(l []byte) (name, value []byte, ok bool) {
	c := bytes.IndexByte(l, ':')
	if c <= 0 || !isToken(l[:c]) {
		return nil, nil, false
	}
	v := l[c+1:]
	for len(v) > 0 && (v[0] == ' ' || v[0] == '\t') {
		v = v[1:]
	}
	for len(v) > 0 && (v[len(v)-1] == ' ' || v[len(v)-1] == '\t') {
		v = v[:len(v)-1]
	}
	for _, ch := range v {
		if ch < ' ' && ch != '\t' || ch == 0x7f {
			return nil, nil, false
		}
	}
	return l[:c], v, true
}

func isToken(b []byte) bool {
	for _, c := range b {
		if !httpguts.IsTokenRune(rune(c)) {
			return false
		}
	}
	return len(b) > 0
}

// parseLength parses a Content-Length value: digits only, -1 if not.
func parseLength(v []byte) int64 {
	if len(v) == 0 || len(v) > 13 {
		return -1
	}
	var n int64
	for _, c := range v {
		if c < '0' || c > '9' {
			return -1
		}
		n = n*10 + int64(c-'0')
	}
	if n > h1FastMaxLength {
		return -1
	}
	return n
}

// asciiEqualFold compares b with an ASCII name, ignoring case.
func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range len(b) {
		x, y := b[i], s[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// hopByHop reports whether a field is about one connection only (as
// httputil.ReverseProxy removes them) and so is never forwarded.
func hopByHop(name []byte) bool {
	switch len(name) {
	case 2:
		return asciiEqualFold(name, "TE")
	case 7:
		return asciiEqualFold(name, "Trailer") || asciiEqualFold(name, "Upgrade")
	case 10:
		return asciiEqualFold(name, "Connection") || asciiEqualFold(name, "Keep-Alive")
	case 16:
		return asciiEqualFold(name, "Proxy-Connection")
	case 17:
		return asciiEqualFold(name, "Transfer-Encoding")
	case 18:
		return asciiEqualFold(name, "Proxy-Authenticate")
	case 19:
		return asciiEqualFold(name, "Proxy-Authorization")
	}
	return false
}

// forwardedField reports the fields httputil.ReverseProxy (in Rewrite
// mode) removes from requests: a caller's claims about the path.
func forwardedField(name []byte) bool {
	return asciiEqualFold(name, "Forwarded") || asciiEqualFold(name, "X-Forwarded-For") ||
		asciiEqualFold(name, "X-Forwarded-Host") || asciiEqualFold(name, "X-Forwarded-Proto")
}

// writeField writes one field line.
func writeField(w *bufio.Writer, name, value []byte) {
	w.Write(name)
	w.WriteString(": ")
	w.Write(value)
	w.WriteString("\r\n")
}

// bodyless reports whether a response to method with status has no body
// whatever its fields say (RFC 9112, section 6.3).
func bodyless(method []byte, status int) bool {
	return status < 200 || status == http.StatusNoContent || status == http.StatusNotModified || string(method) == http.MethodHead
}

// copyChunked copies a chunked body from r to w as it is, checking its
// framing as it goes, up to and including the empty line after the
// trailer section. What was copied is flushed whenever r has nothing more
// buffered (a stream reaches the client as it comes). A malformed body is
// an error (the connection's framing is then lost).
func copyChunked(w *bufio.Writer, r *bufio.Reader) error {
	for {
		if r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return err
			}
		}
		line, err := readChunkLine(r)
		if err != nil {
			return err
		}
		size, err := parseChunkSize(line[:len(line)-2])
		if err != nil {
			return err
		}
		if _, err := w.Write(line); err != nil {
			return err
		}
		if size == 0 {
			break
		}
		if _, err := io.CopyN(w, r, size); err != nil {
			return err
		}
		crlf, err := r.Peek(2)
		if err != nil {
			return err
		}
		if crlf[0] != '\r' || crlf[1] != '\n' {
			return errors.New("proxy: malformed chunked body: chunk not followed by CRLF")
		}
		w.Write(crlf)
		r.Discard(2)
	}
	for n := 0; ; n++ {
		line, err := readChunkLine(r)
		if err != nil {
			return err
		}
		if len(line) == 2 {
			_, err := w.Write(line)
			return err
		}
		if _, _, ok := parseField(line[:len(line)-2]); !ok || n == h1FastMaxFields {
			return errors.New("proxy: malformed trailer in chunked body")
		}
		if _, err := w.Write(line); err != nil {
			return err
		}
	}
}

// readChunkLine reads one CRLF-terminated line of a chunked body (bare LF
// refused); the slice is valid until r is read again.
func readChunkLine(r *bufio.Reader) ([]byte, error) {
	line, err := r.ReadSlice('\n')
	if err == bufio.ErrBufferFull || len(line) > h1FastMaxChunkLine {
		return nil, errors.New("proxy: chunked body line too long")
	}
	if err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	if len(line) < 2 || line[len(line)-2] != '\r' {
		return nil, errors.New("proxy: malformed chunked body: line not ended by CRLF")
	}
	return line, nil
}

// parseChunkSize parses "HEX [; extensions]".
func parseChunkSize(l []byte) (int64, error) {
	i := 0
	var n int64
	for ; i < len(l) && i < 11; i++ {
		c := l[i]
		var d byte
		switch {
		case '0' <= c && c <= '9':
			d = c - '0'
		case 'a' <= c && c <= 'f':
			d = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			d = c - 'A' + 10
		default:
			goto ext
		}
		n = n<<4 | int64(d)
	}
ext:
	if i == 0 || n > h1FastMaxLength {
		return 0, fmt.Errorf("proxy: malformed chunk size %q", l)
	}
	rest := l[i:]
	for len(rest) > 0 && (rest[0] == ' ' || rest[0] == '\t') {
		rest = rest[1:]
	}
	if len(rest) > 0 && rest[0] != ';' {
		return 0, fmt.Errorf("proxy: malformed chunk size %q", l)
	}
	for _, c := range rest {
		if c < ' ' && c != '\t' || c == 0x7f {
			return 0, fmt.Errorf("proxy: malformed chunk extension %q", l)
		}
	}
	return n, nil
}
