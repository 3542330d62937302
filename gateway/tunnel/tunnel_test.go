package tunnel

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/straitmesh/strait/internal/deptest"
)

func data(cluster, ns, svc string, port uint16) Header {
	return Header{Kind: KindData, Cluster: cluster, Namespace: ns, Service: svc, Port: port}
}

// raw builds a header prefix and body by hand.
func raw(version, kind byte, body []byte) []byte {
	b := []byte{version, kind, byte(len(body) >> 8), byte(len(body))}
	return append(b, body...)
}

// dataBody encodes the fixed fields of a data header without validation.
func dataBody(cluster, ns, svc string, port uint16, extra ...byte) []byte {
	var b []byte
	for _, s := range []string{cluster, ns, svc} {
		b = append(b, byte(len(s)))
		b = append(b, s...)
	}
	b = append(b, byte(port>>8), byte(port))
	return append(b, extra...)
}

func TestHeaderRoundTrip(t *testing.T) {
	long := strings.Repeat("a", 63)
	for _, h := range []Header{
		data("west", "default", "api", 8080),
		data("w", "n", "s", 1),
		data(long, long, long, 65535),
		data("cluster-2", "ns-1", "a-b-c", 443),
		{Kind: KindControl},
	} {
		t.Run(h.String(), func(t *testing.T) {
			var w countingWriter
			if err := WriteHeader(&w, h); err != nil {
				t.Fatalf("WriteHeader: %v", err)
			}
			if w.writes != 1 {
				t.Errorf("WriteHeader made %d Write calls, want 1", w.writes)
			}
			trailer := []byte("payload after the header")
			r := bytes.NewReader(append(w.buf.Bytes(), trailer...))
			got, err := ReadHeader(iotest.OneByteReader(r), 0)
			if err != nil {
				t.Fatalf("ReadHeader: %v", err)
			}
			if got != h {
				t.Errorf("got %+v, want %+v", got, h)
			}
			rest, _ := io.ReadAll(r)
			if !bytes.Equal(rest, trailer) {
				t.Errorf("ReadHeader consumed past the header: %q left, want %q", rest, trailer)
			}
		})
	}
}

func TestHeaderSkipsOptionalFields(t *testing.T) {
	body := dataBody("west", "default", "api", 80, 7, 3, 'x', 'y', 'z', 200, 0)
	got, err := ReadHeader(bytes.NewReader(raw(Version, byte(KindData), body)), 0)
	if err != nil {
		t.Fatalf("ReadHeader: %v", err)
	}
	if want := data("west", "default", "api", 80); got != want {
		t.Errorf("got %+v, want %+v", got, want)
	}
	got, err = ReadHeader(bytes.NewReader(raw(Version, byte(KindControl), []byte{1, 1, 9})), 0)
	if err != nil || got != (Header{Kind: KindControl}) {
		t.Errorf("control header with an optional field: got %+v, %v", got, err)
	}
}

type countingWriter struct {
	buf    bytes.Buffer
	writes int
}

func (w *countingWriter) Write(b []byte) (int, error) { w.writes++; return w.buf.Write(b) }

func TestReadHeaderErrors(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      []byte
		max     int
		want    error  // sentinel, or an I/O error
		message string // substring of the error
	}{
		{"empty", nil, 0, io.EOF, "read: EOF"},
		{"version 0", []byte{0, 1, 0, 0}, 0, ErrUnsupportedVersion, "unsupported version 0"},
		{"version 7", []byte{7}, 0, ErrUnsupportedVersion, "tunnel header: unsupported version 7"},
		{"truncated prefix", []byte{1, 1}, 0, io.ErrUnexpectedEOF, "unexpected EOF"},
		{"kind 0", raw(1, 0, nil), 0, ErrUnknownKind, "unknown kind 0"},
		{"kind 9", raw(1, 9, nil), 0, ErrUnknownKind, "unknown kind 9"},
		{"oversize for default", []byte{1, 1, 0x04, 0x00}, 0, ErrTooLarge, "1028 bytes, more than the limit of 1024"},
		{"oversize for configured", raw(1, 1, dataBody("west", "default", "api", 80)), 20, ErrTooLarge, "more than the limit of 20"},
		{"max length", []byte{1, 1, 0xff, 0xff}, 65538, ErrTooLarge, "65539 bytes, more than the limit of 65538"},
		{"truncated body", []byte{1, 1, 0, 20, 4, 'w'}, 0, io.ErrUnexpectedEOF, "unexpected EOF"},
		{"cluster overruns", raw(1, 1, []byte{9, 'w'}), 0, ErrMalformed, "cluster name overruns"},
		{"namespace overruns", raw(1, 1, []byte{1, 'w', 5, 'n'}), 0, ErrMalformed, "namespace overruns"},
		{"service overruns", raw(1, 1, []byte{1, 'w', 1, 'n', 3}), 0, ErrMalformed, "service overruns"},
		{"port overruns", raw(1, 1, []byte{1, 'w', 1, 'n', 1, 's', 0}), 0, ErrMalformed, "port overruns"},
		{"no body", raw(1, 1, nil), 0, ErrMalformed, "cluster name overruns"},
		{"port 0", raw(1, 1, dataBody("west", "default", "api", 0)), 0, ErrMalformed, "tunnel header: port 0 out of range"},
		{"empty cluster", raw(1, 1, dataBody("", "default", "api", 80)), 0, ErrMalformed, "cluster name is empty"},
		{"empty namespace", raw(1, 1, dataBody("west", "", "api", 80)), 0, ErrMalformed, "namespace is empty"},
		{"empty service", raw(1, 1, dataBody("west", "default", "", 80)), 0, ErrMalformed, "service is empty"},
		{"long cluster", raw(1, 1, dataBody(strings.Repeat("a", 64), "default", "api", 80)), 0, ErrMalformed, "cluster name is 64 bytes, more than the limit of 63"},
		{"upper case", raw(1, 1, dataBody("West", "default", "api", 80)), 0, ErrMalformed, `cluster name "West" is not a DNS label`},
		{"leading dash", raw(1, 1, dataBody("west", "-ns", "api", 80)), 0, ErrMalformed, `namespace "-ns" is not a DNS label`},
		{"trailing dash", raw(1, 1, dataBody("west", "ns", "api-", 80)), 0, ErrMalformed, `service "api-" is not a DNS label`},
		{"dot", raw(1, 1, dataBody("west", "a.b", "api", 80)), 0, ErrMalformed, `namespace "a.b"`},
		{"nul byte", raw(1, 1, dataBody("we\x00t", "ns", "api", 80)), 0, ErrMalformed, `cluster name "we\x00t"`},
		{"one trailing byte", raw(1, 1, dataBody("west", "ns", "api", 80, 1)), 0, ErrMalformed, "1 trailing bytes are not an optional field"},
		{"optional field overruns", raw(1, 1, dataBody("west", "ns", "api", 80, 1, 5, 'x')), 0, ErrMalformed, "optional field of type 1 declares 5 bytes, 1 left"},
		{"control with garbage", raw(1, 2, []byte{1}), 0, ErrMalformed, "1 trailing bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, err := ReadHeader(bytes.NewReader(tc.in), tc.max)
			if err == nil {
				t.Fatalf("got %+v, want an error", h)
			}
			if !errors.Is(err, tc.want) {
				t.Errorf("got %v, want an error wrapping %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.message) {
				t.Errorf("got %q, want it to contain %q", err, tc.message)
			}
			if !strings.HasPrefix(err.Error(), "tunnel header: ") {
				t.Errorf("got %q, want the prefix %q", err, "tunnel header: ")
			}
		})
	}
}

// TestReadHeaderBounded shows an oversize header is refused after its 4-byte
// prefix, and an unknown version after its first byte.
func TestReadHeaderBounded(t *testing.T) {
	for _, tc := range []struct {
		name     string
		in       []byte
		consumed int
	}{
		{"oversize", append([]byte{1, 1, 0xff, 0xff}, make([]byte, 1<<16)...), 4},
		{"unknown version", []byte{2, 1, 0, 0, 0, 0}, 1},
		{"unknown kind", []byte{1, 3, 0, 5, 0, 0, 0, 0, 0}, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := bytes.NewReader(tc.in)
			if _, err := ReadHeader(r, 0); err == nil {
				t.Fatal("ReadHeader succeeded, want an error")
			}
			if got := len(tc.in) - r.Len(); got != tc.consumed {
				t.Errorf("consumed %d bytes, want %d", got, tc.consumed)
			}
		})
	}
	var before, after runtime.MemStats
	in := []byte{1, 1, 0xff, 0xff}
	runtime.ReadMemStats(&before)
	const runs = 100
	for range runs {
		_, _ = ReadHeader(bytes.NewReader(in), 0)
	}
	runtime.ReadMemStats(&after)
	if got := (after.TotalAlloc - before.TotalAlloc) / runs; got > 512 {
		t.Errorf("refusing a 64 KiB header allocated %d bytes, want at most 512", got)
	}
}

func TestReadHeaderReaderError(t *testing.T) {
	_, err := ReadHeader(iotest.TimeoutReader(bytes.NewReader([]byte{1, 1, 0, 0})), 0)
	if !errors.Is(err, iotest.ErrTimeout) {
		t.Errorf("got %v, want the reader's error", err)
	}
	_, err = ReadHeader(iotest.ErrReader(os.ErrDeadlineExceeded), 0)
	if got := CodeFor(err).Code; got != CodeTimeout {
		t.Errorf("CodeFor(%v) = %v, want %v", err, got, CodeTimeout)
	}
}

func TestWriteHeaderErrors(t *testing.T) {
	for _, tc := range []struct {
		name    string
		h       Header
		want    error
		message string
	}{
		{"zero", Header{}, ErrUnknownKind, "unknown kind 0"},
		{"port 0", data("west", "ns", "api", 0), ErrMalformed, "tunnel header: port 0 out of range"},
		{"bad cluster", data("West", "ns", "api", 80), ErrMalformed, "cluster name"},
		{"bad namespace", data("west", "", "api", 80), ErrMalformed, "namespace is empty"},
		{"bad service", data("west", "ns", strings.Repeat("x", 64), 80), ErrMalformed, "service is 64 bytes"},
		{"control with target", Header{Kind: KindControl, Cluster: "west"}, ErrMalformed, "a control header names no target"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var w countingWriter
			err := WriteHeader(&w, tc.h)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.message) {
				t.Errorf("got %v, want %v containing %q", err, tc.want, tc.message)
			}
			if w.writes != 0 {
				t.Errorf("an invalid header made %d writes, want 0", w.writes)
			}
		})
	}
	if err := WriteHeader(failWriter{}, data("w", "n", "s", 1)); err == nil {
		t.Error("WriteHeader to a failing writer succeeded")
	}
}

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errors.New("broken pipe") }

func TestReplyRoundTrip(t *testing.T) {
	for _, r := range []Reply{
		{Code: CodeOK},
		{Code: CodeNotExported, Message: "default/api is not exported to east"},
		{Code: Code(200), Message: "a code from a newer gateway"},
		{Code: CodeUnavailable, Message: strings.Repeat("é", MaxMessageBytes/2)},
		{Code: CodeOK, Endpoint: "\x8a\x00\xff\x10 \x30\x40\x50"},
		{Code: Code(201), Message: strings.Repeat("é", MaxMessageBytes/2), Endpoint: strings.Repeat("e", MaxEndpointBytes)},
	} {
		t.Run(r.Code.String(), func(t *testing.T) {
			var w countingWriter
			if err := WriteReply(&w, r); err != nil {
				t.Fatal(err)
			}
			if w.writes != 1 {
				t.Errorf("WriteReply made %d writes, want 1", w.writes)
			}
			in := bytes.NewReader(append(w.buf.Bytes(), "rest"...))
			got, err := ReadReply(iotest.OneByteReader(in))
			if err != nil {
				t.Fatal(err)
			}
			if got != r {
				t.Errorf("got %+v, want %+v", got, r)
			}
			if in.Len() != 4 {
				t.Errorf("ReadReply left %d bytes, want 4", in.Len())
			}
		})
	}
}

// A reply's endpoint field is read beside fields this version does not
// know; one it cannot take (empty, too long, a second one) is skipped, as
// advice it does not need, not refused; and an Endpoint too long to send is
// left out, not cut.
func TestReplyEndpointField(t *testing.T) {
	long := append([]byte{FieldEndpoint, MaxEndpointBytes + 1}, strings.Repeat("e", MaxEndpointBytes+1)...)
	for _, tc := range []struct {
		name   string
		fields []byte
		want   string
	}{
		{"beside unknown fields", []byte{9, 2, 'x', 'y', FieldEndpoint, 3, 'a', 'b', 'c', 200, 0}, "abc"},
		{"empty", []byte{FieldEndpoint, 0}, ""},
		{"too long", long, ""},
		{"too long, then one", append(long, FieldEndpoint, 1, 'b'), "b"},
		{"two", []byte{FieldEndpoint, 1, 'a', FieldEndpoint, 1, 'b'}, "a"},
	} {
		got, err := ReadReply(bytes.NewReader(raw(1, byte(CodeOK), append([]byte{0, 0}, tc.fields...))))
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if want := (Reply{Code: CodeOK, Endpoint: tc.want}); got != want {
			t.Errorf("%s: got %+v, want %+v", tc.name, got, want)
		}
	}
	b := AppendReply(nil, Reply{Code: CodeOK, Endpoint: strings.Repeat("e", MaxEndpointBytes+1)})
	if got, err := ReadReply(bytes.NewReader(b)); err != nil || got != (Reply{Code: CodeOK}) {
		t.Errorf("an oversize Endpoint: got %+v, %v; want it left out", got, err)
	}
}

func TestReplySanitizes(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"line one\nline two", "line one line two"},
		{"bad \xff utf8", "bad \uFFFD utf8"},
		{strings.Repeat("x", 300), strings.Repeat("x", MaxMessageBytes)},
		{strings.Repeat("x", 255) + "é", strings.Repeat("x", 255)},
	} {
		b := AppendReply(nil, Reply{Code: CodeMalformed, Message: tc.in})
		got, err := ReadReply(bytes.NewReader(b))
		if err != nil {
			t.Fatalf("ReadReply(AppendReply(%q)): %v", tc.in, err)
		}
		if got.Message != tc.want {
			t.Errorf("message %q: got %q, want %q", tc.in, got.Message, tc.want)
		}
	}
}

func TestReadReplyErrors(t *testing.T) {
	replyRaw := func(code byte, body []byte) []byte { return raw(1, code, body) }
	msg := func(n int, s string, extra ...byte) []byte {
		return append(append([]byte{byte(n >> 8), byte(n)}, s...), extra...)
	}
	for _, tc := range []struct {
		name    string
		in      []byte
		want    error
		message string
	}{
		{"empty", nil, io.EOF, "tunnel reply: read: EOF"},
		{"version 3", []byte{3, 0, 0, 2, 0, 0}, ErrUnsupportedVersion, "tunnel reply: unsupported version 3"},
		{"truncated prefix", []byte{1, 0}, io.ErrUnexpectedEOF, "unexpected EOF"},
		{"oversize", []byte{1, 0, 0x02, 0x00}, ErrTooLarge, "516 bytes, more than the limit of 512"},
		{"truncated body", []byte{1, 0, 0, 5, 0}, io.ErrUnexpectedEOF, "unexpected EOF"},
		{"no message length", replyRaw(0, nil), ErrMalformed, "message length overruns"},
		{"message overruns", replyRaw(0, msg(5, "abc")), ErrMalformed, "message of 5 bytes overruns the reply (3 left)"},
		{"message too long", replyRaw(0, msg(300, strings.Repeat("x", 300))), ErrMalformed, "message of 300 bytes is more than the limit of 256"},
		{"invalid utf8", replyRaw(0, msg(2, "\xc3(")), ErrMalformed, "not valid UTF-8 at byte 0"},
		{"control char", replyRaw(0, msg(3, "a\nb")), ErrMalformed, "control character U+000A at byte 1"},
		{"trailing byte", replyRaw(0, msg(1, "a", 9)), ErrMalformed, "1 trailing bytes"},
		{"endpoint overruns", replyRaw(0, msg(0, "", FieldEndpoint, 3, 'a')), ErrMalformed, "optional field of type 1 declares 3 bytes, 1 left"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := ReadReply(bytes.NewReader(tc.in))
			if err == nil {
				t.Fatalf("got %+v, want an error", r)
			}
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.message) {
				t.Errorf("got %q, want %v containing %q", err, tc.want, tc.message)
			}
		})
	}
	if err := WriteReply(failWriter{}, Reply{}); err == nil {
		t.Error("WriteReply to a failing writer succeeded")
	}
}

func TestCodeFor(t *testing.T) {
	read := func(b []byte) error { _, err := ReadHeader(bytes.NewReader(b), 0); return err }
	for _, tc := range []struct {
		name string
		err  error
		want Code
	}{
		{"nil", nil, CodeOK},
		{"version", read([]byte{9}), CodeUnsupported},
		{"kind", read(raw(1, 5, nil)), CodeUnsupported},
		{"too large", read([]byte{1, 1, 9, 9}), CodeLimit},
		{"malformed", read(raw(1, 1, []byte{0})), CodeMalformed},
		{"truncated", read([]byte{1, 1, 0}), CodeMalformed},
		{"deadline", os.ErrDeadlineExceeded, CodeTimeout},
	} {
		if got := CodeFor(tc.err); got.Code != tc.want {
			t.Errorf("%s: CodeFor(%v) = %v, want %v", tc.name, tc.err, got.Code, tc.want)
		}
	}
}

func TestReplyErr(t *testing.T) {
	if err := (Reply{Code: CodeOK, Message: "fine"}).Err(); err != nil {
		t.Errorf("OK reply: got %v, want nil", err)
	}
	err := Reply{Code: CodeNotExported, Message: "no"}.Err()
	var re *ReplyError
	if !errors.As(err, &re) || re.Code != CodeNotExported || err.Error() != "tunnel: refused: not_exported: no" {
		t.Errorf("got %v, want a *ReplyError for not_exported", err)
	}
	if got := Code(99).String(); got != "code(99)" {
		t.Errorf("Code(99).String() = %q", got)
	}
	if got := Kind(9).String(); got != "kind(9)" {
		t.Errorf("Kind(9).String() = %q", got)
	}
}

// TestDependencies keeps the wire format usable by the lean sidecar: the
// standard library only.
func TestDependencies(t *testing.T) {
	const pkg = "github.com/straitmesh/strait/gateway/tunnel"
	deptest.Check(t, pkg, deptest.SmallStep, deptest.ClientGo, deptest.QUIC)
	out, err := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	for _, dep := range strings.Fields(string(out)) {
		if dep != pkg {
			t.Errorf("%s depends on %s; it must use the standard library only", pkg, dep)
		}
	}
}
