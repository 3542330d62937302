package tunnel

import (
	"bytes"
	"io"
	"testing"
	"testing/iotest"
)

// boundedReader counts what is read and fails the test if more than max
// bytes are asked of it in total (a header decoder must stop at its limit).
type boundedReader struct {
	r    io.Reader
	read int
}

func (b *boundedReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.read += n
	return n, err
}

func FuzzReadHeader(f *testing.F) {
	for _, h := range []Header{
		data("west", "default", "api", 8080),
		data("a", "b", "c", 65535),
		{Kind: KindControl},
	} {
		b, _ := AppendHeader(nil, h)
		f.Add(b, uint16(0))
		f.Add(append(b, "trailing payload"...), uint16(64))
	}
	f.Add(raw(1, 1, dataBody("west", "ns", "svc", 80, 1, 2, 'h', 'i')), uint16(1024))
	f.Add([]byte{1, 1, 0xff, 0xff}, uint16(0))
	f.Add([]byte{7}, uint16(0))
	f.Add(raw(1, 1, dataBody("West", "ns", "svc", 0)), uint16(0))
	f.Fuzz(func(t *testing.T, in []byte, max16 uint16) {
		limit := int(max16)
		if limit <= 0 {
			limit = DefaultMaxHeaderBytes
		}
		limit = max(limit, prefixBytes)
		br := &boundedReader{r: bytes.NewReader(in)}
		var r io.Reader = br
		if len(in) > 0 && in[0]&1 == 1 {
			r = iotest.OneByteReader(br)
		}
		h, err := ReadHeader(r, int(max16))
		if br.read > limit {
			t.Fatalf("read %d bytes with a limit of %d", br.read, limit)
		}
		if err != nil {
			return
		}
		// Nothing past the header was consumed.
		if n := prefixBytes + (int(in[2])<<8 | int(in[3])); br.read != n {
			t.Fatalf("read %d bytes of a %d-byte header", br.read, n)
		}
		var out bytes.Buffer
		if err := WriteHeader(&out, h); err != nil {
			t.Fatalf("decoded %+v does not encode: %v", h, err)
		}
		if out.Len() > br.read {
			t.Fatalf("re-encoding %+v took %d bytes, more than the %d decoded", h, out.Len(), br.read)
		}
		h2, err := ReadHeader(&out, int(max16))
		if err != nil {
			t.Fatalf("re-encoded %+v does not decode: %v", h, err)
		}
		if h2 != h {
			t.Fatalf("round trip: got %+v, want %+v", h2, h)
		}
	})
}

func FuzzReadReply(f *testing.F) {
	for _, r := range []Reply{
		{Code: CodeOK},
		{Code: CodeNotExported, Message: "default/api is not exported to east"},
		{Code: Code(250), Message: "ünïcödé"},
		{Code: CodeOK, Endpoint: "\x01\x02\x03\x04\x05\x06\x07\x08"},
	} {
		b := AppendReply(nil, r)
		f.Add(b)
		f.Add(append(b, 0, 1, 2))
	}
	f.Add([]byte{1, 0, 0x02, 0x00})
	f.Add([]byte{1, 0, 0, 5, 0, 3, 'a', 7, 0})
	f.Add([]byte{2})
	f.Fuzz(func(t *testing.T, in []byte) {
		br := &boundedReader{r: bytes.NewReader(in)}
		r, err := ReadReply(br)
		if br.read > MaxReplyBytes {
			t.Fatalf("read %d bytes, more than the limit of %d", br.read, MaxReplyBytes)
		}
		if err != nil {
			return
		}
		if want := prefixBytes + (int(in[2])<<8 | int(in[3])); br.read != want {
			t.Fatalf("read %d bytes of a %d-byte reply", br.read, want)
		}
		if SanitizeMessage(r.Message) != r.Message {
			t.Fatalf("decoded message %q is not what the encoder would send", r.Message)
		}
		b := AppendReply(nil, r)
		r2, err := ReadReply(bytes.NewReader(b))
		if err != nil {
			t.Fatalf("re-encoded %+v does not decode: %v", r, err)
		}
		if r2 != r {
			t.Fatalf("round trip: got %+v, want %+v", r2, r)
		}
	})
}
