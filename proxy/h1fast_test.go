package proxy

import (
	"bufio"
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"net/url"
	"strings"
	"testing"
	"time"
)

var fastRequestSeeds = []string{
	"GET / HTTP/1.1\r\nHost: backend\r\n\r\n",
	"POST /api?x=1 HTTP/1.1\r\nHost: backend\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
	"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: backend\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n",
	"GET /%41b HTTP/1.1\r\nhost:backend\r\nX-Empty:\r\nX-Tab: \ta b\t\r\n\r\n",
	// Outside the subset: the net/http path judges these.
	"GET / HTTP/1.0\r\nHost: backend\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
	"POST / HTTP/1.1\r\nHost: backend\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
	"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: backend\r\nConnection: X-Secret\r\nX-Secret: 1\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: backend\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: backend\r\nExpect: 100-continue\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: backend\r\n folded\r\n\r\n",
	"GET / HTTP/1.1\nHost: backend\n\n",
	"GET http://backend/ HTTP/1.1\r\nHost: backend\r\n\r\n",
	"CONNECT backend:443 HTTP/1.1\r\nHost: backend\r\n\r\n",
	"GET /%zz HTTP/1.1\r\nHost: backend\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: backend\r\nContent-Length: +5\r\n\r\nhello",
	"GET / HTTP/1.1\r\nHost: back end\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: backend\r\nBad Name: x\r\n\r\n",
	"GET / HTTP/1.1\r\nHost: backend\r\nX: a\x00b\r\n\r\n",
	"GET / HTTP/1.1\r\n\r\n",
	"GET /a#frag HTTP/1.1\r\nHost: backend\r\n\r\n",
	"GET /a?x=1;y=2 HTTP/1.1\r\nHost: backend\r\n\r\n",
	"GET /a?x=%zz HTTP/1.1\r\nHost: backend\r\n\r\n",
	"GET /a\"<>{} HTTP/1.1\r\nHost: backend\r\n\r\n",
}

// TestH1FastRequestSubset checks which requests the fast path takes.
func TestH1FastRequestSubset(t *testing.T) {
	for i, s := range fastRequestSeeds {
		var h h1Head
		got := h.peekRequest(bufio.NewReaderSize(strings.NewReader(s), 4096))
		if want := i < 5; got != want {
			t.Errorf("%q: fast path %v, want %v", s, got, want)
		}
	}
	// A head or a body beyond the buffer is left to net/http.
	big := "POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 5000\r\n\r\n" + strings.Repeat("x", 5000)
	var h h1Head
	if h.peekRequest(bufio.NewReaderSize(strings.NewReader(big), 4096)) {
		t.Error("a body larger than the read buffer was taken")
	}
	long := "GET / HTTP/1.1\r\nHost: b\r\nX-Long: " + strings.Repeat("x", 5000) + "\r\n\r\n"
	if h.peekRequest(bufio.NewReaderSize(strings.NewReader(long), 4096)) {
		t.Error("a head larger than the read buffer was taken")
	}
	// A head in pieces is read whole before it is judged; a body that is
	// not there with the head is streamed by net/http, not waited for.
	for _, tc := range []struct {
		pieces []string
		taken  bool
	}{
		{[]string{"POST / HTTP/1.1\r\nHo", "st: b\r\nContent-Length: 3\r\n\r", "\nabc"}, true},
		{[]string{"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\n\r\n", "abc"}, false},
	} {
		pr, pw := io.Pipe()
		go func() {
			for _, piece := range tc.pieces {
				pw.Write([]byte(piece))
			}
			pw.Close()
		}()
		br := bufio.NewReaderSize(pr, 4096)
		if got := h.peekRequest(br); got != tc.taken {
			t.Errorf("%q: taken %v, want %v", tc.pieces, got, tc.taken)
		}
		io.Copy(io.Discard, br)
	}
}

// FuzzH1FastRequest checks that every request the fast path takes is one
// net/http reads without complaint, and reads the same way: method,
// target, host, framing, and fields.
func FuzzH1FastRequest(f *testing.F) {
	for _, s := range fastRequestSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var h h1Head
		br := bufio.NewReaderSize(bytes.NewReader(b), 4096)
		if !h.peekRequest(br) {
			return
		}
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(b)))
		if err != nil {
			t.Fatalf("fast path took a request net/http refuses (%v): %q", err, b)
		}
		if msg := checkRequest(req); msg != "" {
			t.Fatalf("fast path took a request the sidecar refuses (%s): %q", msg, b)
		}
		_, rest, _ := bytes.Cut(h.line, []byte(" "))
		target, _, _ := bytes.Cut(rest, []byte(" "))
		// The net/http path sends req.URL.RequestURI() after
		// httputil.ReverseProxy dropped what url.ParseQuery refuses.
		if _, err := url.ParseQuery(req.URL.RawQuery); err != nil || req.Method != string(h.method) || req.URL.RequestURI() != string(target) {
			t.Fatalf("request line: fast %q %q, net/http %q %q (query: %v)", h.method, target, req.Method, req.URL.RequestURI(), err)
		}
		if len(req.TransferEncoding) > 0 {
			t.Fatalf("fast path took a request with Transfer-Encoding %q", req.TransferEncoding)
		}
		if want := max(h.length, 0); req.ContentLength != want {
			t.Fatalf("length: fast %d, net/http %d", want, req.ContentLength)
		}
		if req.Close != h.close {
			t.Fatalf("close: fast %v, net/http %v", h.close, req.Close)
		}
		counts := map[string]int{}
		for _, fl := range h.fields {
			k := textproto.CanonicalMIMEHeaderKey(string(fl.name))
			if k == "Host" {
				if req.Host != string(fl.value) {
					t.Fatalf("host: fast %q, net/http %q", fl.value, req.Host)
				}
				continue
			}
			vv := req.Header[k]
			if counts[k] >= len(vv) || vv[counts[k]] != string(fl.value) {
				t.Fatalf("field %q: fast %q, net/http %q", k, fl.value, vv)
			}
			counts[k]++
		}
		for k, vv := range req.Header {
			if counts[k] != len(vv) {
				t.Fatalf("field %q: net/http has %d values, the fast path %d", k, len(vv), counts[k])
			}
		}
	})
}

var fastResponseSeeds = []string{
	"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
	"HTTP/1.1 204 No Content\r\n\r\n",
	"HTTP/1.1 404\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
	"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
	"HTTP/1.1 200 OK\r\n\r\nuntil the close",
	"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
	"HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Sum: 1\r\n\r\n",
	"HTTP/1.1 600 Odd\r\n\r\n",
	"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n",
}

// FuzzH1FastResponse checks that every response head the fast path takes
// is one net/http reads the same way: status, framing and fields.
func FuzzH1FastResponse(f *testing.F) {
	for _, s := range fastResponseSeeds {
		f.Add([]byte(s), false)
	}
	f.Add([]byte("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n"), true)
	f.Fuzz(func(t *testing.T, b []byte, head bool) {
		var h h1Head
		hb, ok := peekHead(bufio.NewReaderSize(bytes.NewReader(b), 4096))
		if !ok || !h.parse(hb, false) {
			return
		}
		method := "GET"
		if head {
			method = "HEAD"
		}
		resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(b)), &http.Request{Method: method})
		if err != nil {
			t.Fatalf("fast path took a response net/http refuses (%v): %q", err, b)
		}
		if resp.StatusCode != h.status {
			t.Fatalf("status: fast %d, net/http %d", h.status, resp.StatusCode)
		}
		if !bodyless([]byte(method), h.status) {
			if got := len(resp.TransferEncoding) == 1 && resp.TransferEncoding[0] == "chunked"; got != h.chunked {
				t.Fatalf("chunked: fast %v, net/http %q", h.chunked, resp.TransferEncoding)
			}
			if h.length >= 0 && resp.ContentLength != h.length {
				t.Fatalf("length: fast %d, net/http %d", h.length, resp.ContentLength)
			}
		}
		if h.close && !resp.Close {
			t.Fatalf("close: fast %v, net/http %v", h.close, resp.Close)
		}
		for _, fl := range h.fields {
			k := textproto.CanonicalMIMEHeaderKey(string(fl.name))
			if k == "Transfer-Encoding" || k == "Content-Length" || k == "Connection" {
				continue // net/http moves or drops these
			}
			if !contains(resp.Header[k], string(fl.value)) {
				t.Fatalf("field %q: fast %q, net/http %q", k, fl.value, resp.Header[k])
			}
		}
	})
}

func contains(vv []string, v string) bool {
	for _, x := range vv {
		if x == v {
			return true
		}
	}
	return false
}

// FuzzCopyChunked checks that a chunked body copyChunked accepts is copied
// byte for byte, and is one net/http decodes to its end with exactly the
// bytes copied.
func FuzzCopyChunked(f *testing.F) {
	for _, s := range []string{
		"0\r\n\r\n",
		"5\r\nhello\r\n0\r\n\r\nnext",
		"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n",
		"5\r\nhello\n0\r\n\r\n",
		"5\nhello\r\n0\r\n\r\n",
		"fffffffffffffffff\r\n",
		"-1\r\n",
		"0\r\nX Bad: 1\r\n\r\n",
		"3\r\nabc\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		src := bytes.NewReader(b)
		r := bufio.NewReaderSize(src, 4096)
		var out bytes.Buffer
		w := bufio.NewWriter(&out)
		err := copyChunked(w, r)
		w.Flush()
		if err != nil {
			return
		}
		consumed := len(b) - src.Len() - r.Buffered()
		if !bytes.Equal(out.Bytes(), b[:consumed]) {
			t.Fatalf("copied %q, consumed %q", out.Bytes(), b[:consumed])
		}
		br := bufio.NewReader(bytes.NewReader(b[:consumed]))
		if _, err := io.ReadAll(httputil.NewChunkedReader(br)); err != nil {
			t.Fatalf("net/http refuses a chunked body copied as valid (%v): %q", err, b[:consumed])
		}
		if _, err := textproto.NewReader(br).ReadMIMEHeader(); err != nil && err != io.EOF {
			t.Fatalf("net/http refuses the trailer of a chunked body copied as valid (%v): %q", err, b[:consumed])
		}
		if br.Buffered() != 0 {
			t.Fatalf("net/http's framing ends before the fast path's: %q left of %q", b[consumed-br.Buffered():consumed], b[:consumed])
		}
	})
}

// A connection whose request was served by the fast path waits for the
// next one for the whole idle timeout, not the header timeout left over
// from the request, even with timeouts short enough that the tolerance
// on moving the deadline matters.
func TestH1FastIdleAfterHeaderTimeout(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	s := &h1Server{
		handler: http.NotFoundHandler(),
		fast: func(fc *fastConn) (bool, bool) {
			fc.bw.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			return true, true
		},
		log:           slog.New(slog.DiscardHandler),
		headerTimeout: 300 * time.Millisecond,
		idleTimeout:   900 * time.Millisecond,
	}
	go func() {
		c, err := ln.Accept()
		if err == nil {
			s.serveConn(c)
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	for i, wait := range []time.Duration{0, 500 * time.Millisecond} {
		time.Sleep(wait)
		c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("request %d, %s after the previous: %v", i, wait, err)
		}
		io.Copy(io.Discard, resp.Body)
	}
}
