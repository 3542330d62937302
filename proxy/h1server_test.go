package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http/httpguts"
)

// startH1 serves h with an h1Server on a loopback listener. The path
// /probe answers "probe" whatever h is, to check a connection is still
// in step after a case.
func startH1(t *testing.T, h http.Handler) (*h1Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &h1Server{
		handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/probe" {
				io.WriteString(w, "probe")
				return
			}
			h.ServeHTTP(w, r)
		}),
		log:           slog.New(slog.DiscardHandler),
		headerTimeout: 5 * time.Second,
		idleTimeout:   5 * time.Second,
	}
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go s.serveConn(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-accepted
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	return s, ln.Addr().String()
}

// h1Client is the test's side of one connection.
type h1Client struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

func dialH1(t *testing.T, addr string) *h1Client {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(3 * time.Second))
	t.Cleanup(func() { c.Close() })
	return &h1Client{t: t, c: c, br: bufio.NewReader(c)}
}

func (c *h1Client) send(s string) {
	c.t.Helper()
	if _, err := io.WriteString(c.c, s); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// resp reads one response (interim ones included) and its whole body.
func (c *h1Client) resp(method string) (*http.Response, string) {
	c.t.Helper()
	resp, err := http.ReadResponse(c.br, &http.Request{Method: method})
	if err != nil {
		c.t.Fatalf("reading response: %v", err)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatalf("reading response body: %v (read %q)", err, b)
	}
	return resp, string(b)
}

// head reads a status line and header block as they are on the wire.
func (c *h1Client) head() (string, http.Header) {
	c.t.Helper()
	tp := textproto.NewReader(c.br)
	line, err := tp.ReadLine()
	if err != nil {
		c.t.Fatalf("reading status line: %v", err)
	}
	h, err := tp.ReadMIMEHeader()
	if err != nil {
		c.t.Fatalf("reading header: %v", err)
	}
	return line, http.Header(h)
}

func (c *h1Client) raw(n int) string {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.t.Fatalf("reading %d bytes: %v (read %q)", n, err, b)
	}
	return string(b)
}

// closed checks the server ends the connection with nothing more sent.
func (c *h1Client) closed() {
	c.t.Helper()
	b, err := c.br.ReadByte()
	if err == nil {
		rest, _ := c.br.Peek(c.br.Buffered())
		c.t.Fatalf("connection not closed: read %q", append([]byte{b}, rest...))
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		c.t.Fatalf("connection not closed: %v", err)
	}
}

// probe checks the connection still serves requests in step.
func (c *h1Client) probe() {
	c.t.Helper()
	c.send("GET /probe HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp, body := c.resp("GET"); resp.StatusCode != 200 || body != "probe" {
		c.t.Fatalf("probe: got %d %q, want 200 probe", resp.StatusCode, body)
	}
}

// echo answers "METHOD PATH BODY", chunked.
func echo(w http.ResponseWriter, r *http.Request) {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	fmt.Fprintf(w, "%s %s %s", r.Method, r.URL.Path, b)
}

type wantResp struct {
	method  string            // of the request, for reading the response
	status  int               // 0: 200
	header  map[string]string // "-" means absent
	body    string            // "*": any
	trailer map[string]string
	rawBody string // the bytes after the header block, compared as is when wire
	wire    bool   // read as on the wire (set by a rawBody)
	short   bool   // the body ends early (a close)
}

func TestH1ServerExchanges(t *testing.T) {
	const host = "Host: x\r\n"
	tests := []struct {
		name    string
		handler http.HandlerFunc
		req     string // sent in one write
		want    []wantResp
		closed  bool // else the connection must still serve /probe
	}{
		{
			name:    "pipelined requests in one write",
			handler: echo,
			req:     "GET /a HTTP/1.1\r\n" + host + "\r\nGET /b HTTP/1.1\r\n" + host + "\r\nPOST /c HTTP/1.1\r\n" + host + "Content-Length: 3\r\n\r\nxyzGET /d HTTP/1.1\r\n" + host + "\r\n",
			want:    []wantResp{{body: "GET /a "}, {body: "GET /b "}, {body: "POST /c xyz"}, {body: "GET /d "}},
		},
		{
			name:    "Content-Length request body",
			handler: echo,
			req:     "POST /cl HTTP/1.1\r\n" + host + "Content-Length: 11\r\n\r\nhello world",
			want:    []wantResp{{body: "POST /cl hello world"}},
		},
		{
			name:    "chunked request body with extension and trailer",
			handler: echo,
			req:     "POST /ch HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n",
			want:    []wantResp{{body: "POST /ch hello world"}},
		},
		{
			name:    "small unread Content-Length body is drained",
			handler: func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ignored") },
			req:     "POST / HTTP/1.1\r\n" + host + "Content-Length: 10\r\n\r\n0123456789",
			want:    []wantResp{{body: "ignored"}},
		},
		{
			name:    "small unread chunked body is drained",
			handler: func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ignored") },
			req:     "POST / HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
			want:    []wantResp{{body: "ignored"}},
		},
		{
			name: "handler Content-Length",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Length", "5")
				io.WriteString(w, "hel")
				io.WriteString(w, "lo")
			},
			req:  "GET / HTTP/1.1\r\n" + host + "\r\n",
			want: []wantResp{{header: map[string]string{"Content-Length": "5", "Transfer-Encoding": "-"}, rawBody: "hello"}},
		},
		{
			name: "no Content-Length: chunked",
			handler: func(w http.ResponseWriter, r *http.Request) {
				io.WriteString(w, "hello")
				w.(http.Flusher).Flush()
				io.WriteString(w, "")
				io.WriteString(w, "world!")
			},
			req:  "GET / HTTP/1.1\r\n" + host + "\r\n",
			want: []wantResp{{header: map[string]string{"Transfer-Encoding": "chunked", "Content-Length": "-"}, rawBody: "5\r\nhello\r\n6\r\nworld!\r\n0\r\n\r\n"}},
		},
		{
			name:    "handler writes nothing",
			handler: func(w http.ResponseWriter, r *http.Request) {},
			req:     "GET / HTTP/1.1\r\n" + host + "\r\n",
			want:    []wantResp{{header: map[string]string{"Content-Length": "0", "Transfer-Encoding": "-"}, wire: true}},
		},
		{
			name: "HEAD has no body",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Length", "5")
				io.WriteString(w, "hello")
			},
			req:  "HEAD / HTTP/1.1\r\n" + host + "\r\nHEAD / HTTP/1.1\r\n" + host + "\r\n",
			want: []wantResp{{method: "HEAD", header: map[string]string{"Content-Length": "5"}, wire: true}, {method: "HEAD", wire: true}},
		},
		{
			name:    "HEAD without Content-Length",
			handler: func(w http.ResponseWriter, r *http.Request) { w.Header().Set("X-A", "b") },
			req:     "HEAD / HTTP/1.1\r\n" + host + "\r\n",
			want:    []wantResp{{method: "HEAD", header: map[string]string{"X-A": "b", "Transfer-Encoding": "-"}, wire: true}},
		},
		{
			name: "204",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Length", "3")
				w.WriteHeader(http.StatusNoContent)
				w.Write([]byte("abc"))
			},
			req:  "GET / HTTP/1.1\r\n" + host + "\r\n",
			want: []wantResp{{status: 204, header: map[string]string{"Content-Length": "-", "Transfer-Encoding": "-"}, wire: true}},
		},
		{
			name: "304",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Etag", `"x"`)
				w.WriteHeader(http.StatusNotModified)
				w.Write([]byte("abc"))
			},
			req:  "GET / HTTP/1.1\r\n" + host + "\r\n",
			want: []wantResp{{status: 304, header: map[string]string{"Etag": `"x"`, "Transfer-Encoding": "-"}, wire: true}},
		},
		{
			name:    "HTTP/1.0: body ends with the close",
			handler: func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "old") },
			req:     "GET / HTTP/1.0\r\n\r\n",
			want:    []wantResp{{header: map[string]string{"Connection": "close", "Transfer-Encoding": "-", "Content-Length": "-"}, rawBody: "old"}},
			closed:  true,
		},
		{
			name: "HTTP/1.0 keep-alive with Content-Length still closes",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Length", "3")
				io.WriteString(w, "old")
			},
			req:    "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
			want:   []wantResp{{header: map[string]string{"Connection": "close", "Content-Length": "3"}, body: "old"}},
			closed: true,
		},
		{
			name:    "Connection: close request",
			handler: echo,
			req:     "GET /a HTTP/1.1\r\n" + host + "Connection: close\r\n\r\nGET /b HTTP/1.1\r\n" + host + "\r\n",
			want:    []wantResp{{header: map[string]string{"Connection": "close"}, body: "GET /a "}},
			closed:  true,
		},
		{
			name: "Connection: close from the handler",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Connection", "close")
				io.WriteString(w, "bye")
			},
			req:    "GET / HTTP/1.1\r\n" + host + "\r\n",
			want:   []wantResp{{header: map[string]string{"Connection": "close"}, body: "bye"}},
			closed: true,
		},
		{
			name: "103 Early Hints then 200",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Link", "</a.css>; rel=preload")
				w.WriteHeader(http.StatusEarlyHints)
				w.Header().Del("Link")
				w.WriteHeader(http.StatusOK)
				io.WriteString(w, "final")
			},
			req: "GET / HTTP/1.1\r\n" + host + "\r\n",
			want: []wantResp{
				{status: 103, header: map[string]string{"Link": "</a.css>; rel=preload"}, wire: true},
				{header: map[string]string{"Link": "-"}, body: "final"},
			},
		},
		{
			name: "no 103 to an HTTP/1.0 client",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(http.StatusEarlyHints)
				io.WriteString(w, "final")
			},
			req:    "GET / HTTP/1.0\r\n\r\n",
			want:   []wantResp{{body: "final"}},
			closed: true,
		},
		{
			name: "trailer declared in the Trailer header",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Trailer", "X-Sum")
				io.WriteString(w, "abc")
				w.Header().Set("X-Sum", "42")
			},
			req:  "GET / HTTP/1.1\r\n" + host + "\r\n",
			want: []wantResp{{header: map[string]string{"Trailer": "X-Sum", "X-Sum": "-"}, rawBody: "3\r\nabc\r\n0\r\nX-Sum: 42\r\n\r\n"}},
		},
		{
			name: "trailer via http.TrailerPrefix",
			handler: func(w http.ResponseWriter, r *http.Request) {
				io.WriteString(w, "abc")
				w.Header().Set(http.TrailerPrefix+"X-Late", "7")
			},
			req:  "GET / HTTP/1.1\r\n" + host + "\r\n",
			want: []wantResp{{rawBody: "3\r\nabc\r\n0\r\nX-Late: 7\r\n\r\n"}},
		},
		{
			name: "trailers of both kinds",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Trailer", "x-a, X-B")
				w.Header().Set("X-B", "early")
				w.WriteHeader(200)
				io.WriteString(w, "abc")
				w.Header().Set("X-A", "1")
				w.Header().Set("X-B", "2")
				w.Header().Set(http.TrailerPrefix+"X-C", "3")
			},
			req:  "GET / HTTP/1.1\r\n" + host + "\r\n",
			want: []wantResp{{header: map[string]string{"X-A": "-", "X-B": "-"}, body: "abc", trailer: map[string]string{"X-A": "1", "X-B": "2", "X-C": "3"}}},
		},
		{
			name: "a framing header declared as a trailer stays in the header",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Trailer", "Transfer-Encoding, Content-Length, Connection, X-A")
				io.WriteString(w, "abc")
				w.Header().Set("X-A", "1")
			},
			req:  "GET / HTTP/1.1\r\n" + host + "\r\n",
			want: []wantResp{{header: map[string]string{"Transfer-Encoding": "chunked"}, rawBody: "3\r\nabc\r\n0\r\nX-A: 1\r\n\r\n"}},
		},
		{
			name: "fewer bytes than Content-Length: close",
			handler: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Length", "10")
				io.WriteString(w, "12345")
			},
			req:    "GET / HTTP/1.1\r\n" + host + "\r\n",
			want:   []wantResp{{header: map[string]string{"Content-Length": "10"}, body: "12345", short: true}},
			closed: true,
		},
		{
			name:    "unsupported Expect: 417",
			handler: echo,
			req:     "POST / HTTP/1.1\r\n" + host + "Expect: 200-ok\r\nContent-Length: 1\r\n\r\nx",
			want:    []wantResp{{status: 417, header: map[string]string{"Connection": "close"}, body: "*"}},
			closed:  true,
		},
		{
			name:    "Expect: 100-continue on a request with no body is ignored",
			handler: echo,
			req:     "GET /x HTTP/1.1\r\n" + host + "Expect: 100-continue\r\n\r\n",
			want:    []wantResp{{body: "GET /x "}},
		},
		{
			name:    "repeated identical Content-Length",
			handler: echo,
			req:     "POST / HTTP/1.1\r\n" + host + "Content-Length: 2\r\nContent-Length: 2\r\n\r\nab",
			want:    []wantResp{{body: "POST / ab"}},
		},
		{
			name:    "absolute form: the target's host wins",
			handler: func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Host) },
			req:     "GET http://target/ HTTP/1.1\r\nHost: other\r\n\r\n",
			want:    []wantResp{{body: "target"}},
		},
		{
			name:    "bare LF line endings",
			handler: echo,
			req:     "POST /lf HTTP/1.1\n" + "Host: x\nContent-Length: 2\n\nab",
			want:    []wantResp{{body: "POST /lf ab"}},
		},
		{
			name:    "malformed chunked body: close",
			handler: echo,
			req:     "POST / HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
			want:    []wantResp{{status: 400}},
			closed:  true,
		},
		{
			name:    "chunk size overflow: close",
			handler: echo,
			req:     "POST / HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nhello\r\n0\r\n\r\n",
			want:    []wantResp{{status: 400}},
			closed:  true,
		},
	}

	// Requests refused before the handler: a 400 (or the given status),
	// then the close, whatever was pipelined after.
	refused := []struct {
		name   string
		req    string
		status int
	}{
		{"Content-Length and Transfer-Encoding", "POST / HTTP/1.1\r\n" + host + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\n" + host + "\r\n", 400},
		{"Transfer-Encoding and Content-Length", "POST / HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\ncontent-length: 3\r\n\r\n0\r\n\r\n", 400},
		{"two differing Content-Length", "POST / HTTP/1.1\r\n" + host + "Content-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400},
		{"Content-Length list", "POST / HTTP/1.1\r\n" + host + "Content-Length: 1, 2\r\n\r\nab", 400},
		{"signed Content-Length", "POST / HTTP/1.1\r\n" + host + "Content-Length: +2\r\n\r\nab", 400},
		{"negative Content-Length", "POST / HTTP/1.1\r\n" + host + "Content-Length: -1\r\n\r\n", 400},
		{"Transfer-Encoding: gzip, chunked", "POST / HTTP/1.1\r\n" + host + "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501},
		{"Transfer-Encoding: identity", "POST / HTTP/1.1\r\n" + host + "Transfer-Encoding: identity\r\nContent-Length: 1\r\n\r\nx", 501},
		{"two Transfer-Encoding headers", "POST / HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400},
		{"Transfer-Encoding with a space before the colon", "POST / HTTP/1.1\r\n" + host + "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400},
		{"missing Host", "GET / HTTP/1.1\r\n\r\n", 400},
		{"two Host headers", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400},
		{"malformed Host", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400},
		{"bad header name", "GET / HTTP/1.1\r\n" + host + "Bad(Name): x\r\n\r\n", 400},
		{"header name with a space", "GET / HTTP/1.1\r\n" + host + "Bad Name: x\r\n\r\n", 400},
		{"control byte in a header value", "GET / HTTP/1.1\r\n" + host + "X-A: a\x01b\r\n\r\n", 400},
		{"NUL in a header value", "GET / HTTP/1.1\r\n" + host + "X-A: a\x00b\r\n\r\n", 400},
		{"HTTP/2 preface", h2Preface, 400},
		{"HTTP/2.0 request line", "GET / HTTP/2.0\r\n" + host + "\r\n", 400},
		{"garbage", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400},
		{"no version", "GET /\r\n" + host + "\r\n", 400},
		{"space in the target", "GET /a b HTTP/1.1\r\n" + host + "\r\n", 400},
	}
	for _, r := range refused {
		tests = append(tests, struct {
			name    string
			handler http.HandlerFunc
			req     string
			want    []wantResp
			closed  bool
		}{
			name:    "refused: " + r.name,
			handler: func(w http.ResponseWriter, req *http.Request) { http.Error(w, "handler called", 599) },
			req:     r.req,
			want:    []wantResp{{status: r.status, header: map[string]string{"Connection": "close"}, body: "*"}},
			closed:  true,
		})
	}

	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, addr := startH1(t, tc.handler)
			c := dialH1(t, addr)
			c.send(tc.req)
			for i, w := range tc.want {
				method := w.method
				if method == "" {
					method = "GET"
				}
				status := w.status
				if status == 0 {
					status = 200
				}
				var (
					gotStatus int
					header    http.Header
					body      string
					trailer   http.Header
				)
				if w.wire || w.rawBody != "" {
					line, h := c.head()
					if !strings.HasPrefix(line, "HTTP/1.1 ") || len(line) < 12 {
						t.Fatalf("response %d: status line %q", i, line)
					}
					gotStatus, _ = strconv.Atoi(line[9:12])
					header = h
					if w.rawBody != "" {
						body = c.raw(len(w.rawBody))
						if body != w.rawBody {
							t.Errorf("response %d: body on the wire %q, want %q", i, body, w.rawBody)
						}
					} else if cl := h.Get("Content-Length"); cl != "" && method != "HEAD" && status != 304 {
						n, _ := strconv.Atoi(cl)
						body = c.raw(n)
					} else if h.Get("Transfer-Encoding") != "" {
						t.Fatalf("response %d: unexpected chunked body", i)
					}
				} else {
					resp, err := http.ReadResponse(c.br, &http.Request{Method: method})
					if err != nil {
						t.Fatalf("response %d: %v", i, err)
					}
					b, err := io.ReadAll(resp.Body)
					if w.short {
						if !errors.Is(err, io.ErrUnexpectedEOF) {
							t.Errorf("response %d: short body read: %v, want io.ErrUnexpectedEOF", i, err)
						}
					} else if err != nil {
						t.Fatalf("response %d: body: %v", i, err)
					}
					if resp.Proto != "HTTP/1.1" {
						t.Errorf("response %d: proto %q", i, resp.Proto)
					}
					gotStatus, header, body, trailer = resp.StatusCode, resp.Header, string(b), resp.Trailer
					if resp.TransferEncoding != nil {
						header.Set("Transfer-Encoding", strings.Join(resp.TransferEncoding, ","))
					}
					if resp.Close {
						header.Set("Connection", "close")
					}
					if w.body != "*" && w.body != body {
						t.Errorf("response %d: body %q, want %q", i, body, w.body)
					}
				}
				if gotStatus != status {
					t.Fatalf("response %d: status %d, want %d (body %q)", i, gotStatus, status, body)
				}
				for k, v := range w.header {
					got, ok := header[k]
					switch {
					case v == "-" && ok:
						t.Errorf("response %d: header %s: %q, want none", i, k, got)
					case v != "-" && (len(got) != 1 || got[0] != v):
						t.Errorf("response %d: header %s: %q, want %q", i, k, got, v)
					}
				}
				for k, v := range w.trailer {
					if got := trailer.Get(k); got != v {
						t.Errorf("response %d: trailer %s: %q, want %q", i, k, got, v)
					}
				}
			}
			if tc.closed {
				c.closed()
			} else {
				c.probe()
			}
		})
	}
}

func TestH1ServerKeepAlive(t *testing.T) {
	var mu sync.Mutex
	remotes := map[string]int{}
	_, addr := startH1(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		remotes[r.RemoteAddr]++
		mu.Unlock()
		echo(w, r)
	}))
	c := dialH1(t, addr)
	for i := range 5 {
		body := strings.Repeat("b", i)
		c.send(fmt.Sprintf("POST /%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", i, len(body), body))
		if resp, got := c.resp("POST"); resp.StatusCode != 200 || got != fmt.Sprintf("POST /%d %s", i, body) || resp.Close {
			t.Fatalf("request %d: %d %q close=%v", i, resp.StatusCode, got, resp.Close)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(remotes) != 1 || remotes[c.c.LocalAddr().String()] != 5 {
		t.Errorf("requests per remote address: %v, want 5 from %s", remotes, c.c.LocalAddr())
	}
}

func TestH1ServerLargeUnreadBody(t *testing.T) {
	tests := []struct {
		name    string
		size    int
		chunked bool
		closed  bool
	}{
		{"Content-Length at the drain limit", h1MaxDrain, false, false},
		{"Content-Length over the drain limit", h1MaxDrain + 1, false, true},
		{"Content-Length far over the limit", 4 << 20, false, true},
		{"chunked over the drain limit", h1MaxDrain + 1024, true, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, addr := startH1(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ignored") }))
			c := dialH1(t, addr)
			body := strings.Repeat("x", tc.size)
			var req string
			if tc.chunked {
				req = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + strconv.FormatInt(int64(len(body)), 16) + "\r\n" + body + "\r\n0\r\n\r\n"
			} else {
				req = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
			}
			// The server may stop reading: write from the side.
			go io.WriteString(c.c, req)
			if resp, got := c.resp("POST"); resp.StatusCode != 200 || got != "ignored" {
				t.Fatalf("got %d %q", resp.StatusCode, got)
			}
			if tc.closed {
				c.closed()
			} else {
				c.probe()
			}
		})
	}
}

func TestH1ServerHeaderTooLarge(t *testing.T) {
	_, addr := startH1(t, http.HandlerFunc(echo))
	tests := []struct {
		name   string
		size   int
		status int
	}{
		{"just under 1 MiB", h1MaxHeaderBytes - 1024, 200},
		{"over 1 MiB", h1MaxHeaderBytes + 1024, 431},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := dialH1(t, addr)
			req := "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", tc.size) + "\r\n\r\n"
			go io.WriteString(c.c, req)
			resp, _ := c.resp("GET")
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.status)
			}
			if tc.status != 200 {
				c.closed()
			}
		})
	}
}

func TestH1ServerExpectContinue(t *testing.T) {
	const req = "POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"

	t.Run("100 sent when the handler reads", func(t *testing.T) {
		_, addr := startH1(t, http.HandlerFunc(echo))
		c := dialH1(t, addr)
		for range 2 {
			c.send(req)
			if resp, _ := c.resp("POST"); resp.StatusCode != 100 {
				t.Fatalf("got %d, want 100 Continue", resp.StatusCode)
			}
			c.send("hello")
			if resp, body := c.resp("POST"); resp.StatusCode != 200 || body != "POST /e hello" || resp.Close {
				t.Fatalf("got %d %q close=%v", resp.StatusCode, body, resp.Close)
			}
		}
		c.probe()
	})

	t.Run("no 100 when the handler does not read", func(t *testing.T) {
		_, addr := startH1(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusUnauthorized)
		}))
		c := dialH1(t, addr)
		c.send(req)
		if resp, _ := c.resp("POST"); resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("got %d, want 401", resp.StatusCode)
		}
		c.closed()
	})

	t.Run("no 100 once the final response began", func(t *testing.T) {
		_, addr := startH1(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "early;")
			w.(http.Flusher).Flush()
			b, _ := io.ReadAll(r.Body)
			w.Write(b)
		}))
		c := dialH1(t, addr)
		c.send(req)
		line, h := c.head()
		if line != "HTTP/1.1 200 OK" || h.Get("Transfer-Encoding") != "chunked" {
			t.Fatalf("got %q %v, want a chunked 200", line, h)
		}
		c.send("hello")
		if got, want := c.raw(len("6\r\nearly;\r\n5\r\nhello\r\n0\r\n\r\n")), "6\r\nearly;\r\n5\r\nhello\r\n0\r\n\r\n"; got != want {
			t.Fatalf("body %q, want %q", got, want)
		}
		c.closed()
	})

	t.Run("body read concurrently with the response", func(t *testing.T) {
		// As a transport writing the request body from its own goroutine.
		_, addr := startH1(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			done := make(chan []byte)
			go func() {
				b, _ := io.ReadAll(r.Body)
				done <- b
			}()
			w.Header().Set("Content-Length", "5")
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
			w.Write(<-done)
		}))
		c := dialH1(t, addr)
		c.send(req)
		resp, err := http.ReadResponse(c.br, &http.Request{Method: "POST"})
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode == 100 {
			c.send("hello")
			if resp, err = http.ReadResponse(c.br, &http.Request{Method: "POST"}); err != nil {
				t.Fatal(err)
			}
		} else {
			c.send("hello")
		}
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 || string(b) != "hello" {
			t.Fatalf("got %d %q %v", resp.StatusCode, b, err)
		}
	})

	t.Run("HTTP/1.0 gets no 100", func(t *testing.T) {
		_, addr := startH1(t, http.HandlerFunc(echo))
		c := dialH1(t, addr)
		c.send("POST /e HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
		if resp, body := c.resp("POST"); resp.StatusCode != 200 || body != "POST /e hello" {
			t.Fatalf("got %d %q", resp.StatusCode, body)
		}
		c.closed()
	})
}

func TestH1ServerWriteErrors(t *testing.T) {
	errc := make(chan error, 1)
	_, addr := startH1(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "3")
		io.WriteString(w, "ab")
		_, err := io.WriteString(w, "cd")
		errc <- err
		io.WriteString(w, "c")
	}))
	c := dialH1(t, addr)
	c.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp, body := c.resp("GET"); body != "abc" || resp.ContentLength != 3 {
		t.Fatalf("got %q (length %d)", body, resp.ContentLength)
	}
	if err := <-errc; !errors.Is(err, http.ErrContentLength) {
		t.Errorf("writing past Content-Length: %v, want http.ErrContentLength", err)
	}
	c.probe()
}

func TestH1ServerShutdown(t *testing.T) {
	t.Run("idle connections close at once", func(t *testing.T) {
		s, addr := startH1(t, http.HandlerFunc(echo))
		c := dialH1(t, addr)
		c.probe()
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		s.Shutdown(ctx)
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("Shutdown took %v", d)
		}
		c.closed()
		// New connections are refused.
		c2 := dialH1(t, addr)
		io.WriteString(c2.c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		c2.closed()
	})

	t.Run("an in-flight request finishes", func(t *testing.T) {
		started, release := make(chan struct{}), make(chan struct{})
		s, addr := startH1(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			close(started)
			<-release
			io.WriteString(w, "done")
		}))
		c := dialH1(t, addr)
		c.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		<-started
		shut := make(chan struct{})
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			s.Shutdown(ctx)
			close(shut)
		}()
		select {
		case <-shut:
			t.Fatal("Shutdown returned with a request in flight")
		case <-time.After(50 * time.Millisecond):
		}
		close(release)
		if resp, body := c.resp("GET"); resp.StatusCode != 200 || body != "done" {
			t.Fatalf("got %d %q", resp.StatusCode, body)
		}
		c.closed()
		select {
		case <-shut:
		case <-time.After(time.Second):
			t.Fatal("Shutdown did not return after the request")
		}
	})

	t.Run("context end closes busy connections", func(t *testing.T) {
		started, release := make(chan struct{}), make(chan struct{})
		s, addr := startH1(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			close(started)
			<-release
		}))
		t.Cleanup(func() { close(release) }) // before startH1's
		c := dialH1(t, addr)
		c.send("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n")
		<-started
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		go func() {
			// The handler is stuck; Shutdown waits for it after closing.
			s.Shutdown(ctx)
		}()
		c.closed()
	})
}

// halfConn is a net.Conn reading a fixed input, then io.EOF (a client
// that sent everything and half-closed), and collecting what is written.
type halfConn struct {
	r   io.Reader
	mu  sync.Mutex
	out bytes.Buffer
}

func (c *halfConn) Read(p []byte) (int, error) { return c.r.Read(p) }
func (c *halfConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out.Write(p)
}
func (c *halfConn) Close() error                     { return nil }
func (c *halfConn) LocalAddr() net.Addr              { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 80} }
func (c *halfConn) RemoteAddr() net.Addr             { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1234} }
func (c *halfConn) SetDeadline(time.Time) error      { return nil }
func (c *halfConn) SetReadDeadline(time.Time) error  { return nil }
func (c *halfConn) SetWriteDeadline(time.Time) error { return nil }

// fuzzServed is what the fuzz handler answered to one request.
type fuzzServed struct {
	method string
	status int
	body   []byte // as written
	short  bool   // fewer bytes than the declared length
	http10 bool
}

// fuzzHandler answers by path, to reach every way of framing a response,
// and records what it sent.
func fuzzHandler(served *[]fuzzServed) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		rec := fuzzServed{method: r.Method, status: 200, http10: !r.ProtoAtLeast(1, 1)}
		write := func(b []byte) {
			n, _ := w.Write(b)
			rec.body = append(rec.body, b[:n]...)
		}
		defer func() { *served = append(*served, rec) }()
		path := r.URL.Path
		switch {
		case strings.HasPrefix(path, "/cl"):
			b, _ := io.ReadAll(r.Body)
			w.Header().Set("Content-Length", strconv.Itoa(len(b)))
			write(b)
		case strings.HasPrefix(path, "/empty"):
		case strings.HasPrefix(path, "/noread"):
			write([]byte("x"))
		case strings.HasPrefix(path, "/partial"):
			b := make([]byte, 3)
			n, _ := r.Body.Read(b)
			write(b[:n])
		case strings.HasPrefix(path, "/103"):
			w.Header().Set("Link", "</a>; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
			write([]byte("after hints"))
		case strings.HasPrefix(path, "/204"):
			rec.status = 204
			w.WriteHeader(204)
		case strings.HasPrefix(path, "/304"):
			rec.status = 304
			w.Header().Set("Content-Length", "12")
			w.WriteHeader(304)
		case strings.HasPrefix(path, "/404"):
			rec.status = 404
			w.WriteHeader(404)
			b, _ := io.ReadAll(r.Body)
			write(b)
		case strings.HasPrefix(path, "/trailer"):
			// A key that may not be a trailer would make the Trailer
			// header itself unreadable to http.ReadResponse.
			w.Header().Set("Trailer", "X-A")
			if k := r.Header.Get("X-Trailer"); httpguts.ValidTrailerHeader(k) {
				w.Header().Add("Trailer", k)
			}
			b, _ := io.ReadAll(r.Body)
			write(b)
			w.Header().Set("X-A", "1")
			w.Header().Set(r.Header.Get("X-Trailer"), "2")
			w.Header().Set(http.TrailerPrefix+"X-B", "3")
		case strings.HasPrefix(path, "/close"):
			w.Header().Set("Connection", "close")
			write([]byte("bye"))
		case strings.HasPrefix(path, "/late"):
			write([]byte("early"))
			w.(http.Flusher).Flush()
			b, _ := io.ReadAll(r.Body)
			write(b)
		case strings.HasPrefix(path, "/short"):
			w.Header().Set("Content-Length", "10")
			write([]byte("short"))
			rec.short = r.Method != "HEAD"
		case strings.HasPrefix(path, "/header"):
			// Whatever the request says, as response headers.
			for k, vv := range r.Header {
				for _, v := range vv {
					w.Header().Add(k, v)
				}
			}
			b, _ := io.ReadAll(r.Body)
			write(b)
			if v, err := strconv.ParseInt(w.Header().Get("Content-Length"), 10, 64); err == nil && v > int64(len(rec.body)) {
				rec.short = r.Method != "HEAD"
			}
		default:
			b, _ := io.ReadAll(r.Body)
			write([]byte(r.Method + " " + r.URL.Path + " "))
			write(b)
			w.(http.Flusher).Flush()
			write([]byte("."))
		}
		if r.Method == "HEAD" || rec.status == 204 || rec.status == 304 {
			rec.body = nil
		}
	}
}

func FuzzH1Server(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
		"GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /cl HTTP/1.1\r\nHost: x\r\n\r\nGET /empty HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloPOST /noread HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /204 HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST /trailer HTTP/1.1\r\nHost: x\r\nX-Trailer: X-Z\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /304 HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST /late HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
		"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabcGET /103 HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST /partial HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\nGET /close HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
		"GET /short HTTP/1.1\r\nHost: x\r\n\r\n",
		"GET /x HTTP/1.0\r\n\r\n",
		"GET /103 HTTP/1.0\r\n\r\n",
		"POST /header HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab",
		"POST /trailer HTTP/1.1\r\nHost: x\r\nX-Trailer: Transfer-Encoding\r\nContent-Length: 2\r\n\r\nabGET / HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
		"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
		"GET / HTTP/1.1\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
		h2Preface,
		"\x16\x03\x01\x00\x05hello",
		"GET / HTTP/1.1\r\nHost: x\r\nExpect: nothing\r\nContent-Length: 1\r\n\r\nx",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		var served []fuzzServed
		s := &h1Server{handler: fuzzHandler(&served), log: slog.New(slog.DiscardHandler), headerTimeout: time.Minute, idleTimeout: time.Minute}
		c := &halfConn{r: bytes.NewReader(in)}
		done := make(chan struct{})
		go func() {
			defer close(done)
			s.serveConn(c)
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatalf("serveConn still running 5s after the input ended; input %q", in)
		}
		out := c.out.Bytes()
		br := bufio.NewReader(bytes.NewReader(out))
		fail := func(format string, args ...any) {
			t.Helper()
			t.Fatalf("%s\ninput:  %q\noutput: %q", fmt.Sprintf(format, args...), in, out)
		}
		final := 0
		for {
			if _, err := br.Peek(1); err == io.EOF {
				break
			}
			method := "GET"
			if final < len(served) {
				method = served[final].method
			}
			resp, err := http.ReadResponse(br, &http.Request{Method: method})
			if err != nil {
				fail("response %d: %v", final, err)
			}
			if resp.Proto != "HTTP/1.1" {
				fail("response %d: proto %q", final, resp.Proto)
			}
			body, err := io.ReadAll(resp.Body)
			if resp.StatusCode >= 100 && resp.StatusCode < 200 {
				if len(body) != 0 || err != nil {
					fail("interim response %d with a body %q (%v)", resp.StatusCode, body, err)
				}
				if final < len(served) && served[final].http10 {
					fail("interim response %d to an HTTP/1.0 request", resp.StatusCode)
				}
				continue
			}
			if final >= len(served) {
				// A refusal, the connection's last words.
				if resp.StatusCode < 400 || !resp.Close || err != nil {
					fail("unexpected response %d beyond the %d served (close=%v, %v)", resp.StatusCode, len(served), resp.Close, err)
				}
				if _, err := br.Peek(1); err != io.EOF {
					fail("bytes after a refusal")
				}
				final++
				break
			}
			want := served[final]
			final++
			if resp.StatusCode != want.status {
				fail("response %d: status %d, want %d", final-1, resp.StatusCode, want.status)
			}
			if want.short {
				if !errors.Is(err, io.ErrUnexpectedEOF) && !bytes.Equal(body, want.body) {
					fail("response %d: short body %q (%v), want %q", final-1, body, err, want.body)
				}
				if _, err := br.Peek(1); err != io.EOF {
					fail("bytes after a short response")
				}
				break
			}
			if err != nil {
				fail("response %d: body: %v", final-1, err)
			}
			if !bytes.Equal(body, want.body) {
				fail("response %d: body %q, want %q", final-1, body, want.body)
			}
		}
		if final < len(served) {
			fail("%d responses for %d requests served", final, len(served))
		}
	})
}

func TestH1ServerHeadWrite(t *testing.T) {
	errc := make(chan error, 1)
	_, addr := startH1(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, err := io.WriteString(w, "hello")
		errc <- err
	}))
	c := dialH1(t, addr)
	c.send("HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
	if resp, body := c.resp("HEAD"); resp.StatusCode != 200 || body != "" {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	if err := <-errc; !errors.Is(err, http.ErrBodyNotAllowed) {
		t.Errorf("Write for HEAD: %v, want http.ErrBodyNotAllowed", err)
	}
	c.probe()
}

// A chunked request also carrying a Content-Length is refused when its
// header block is seen whole; one that came in pieces is answered, and
// the connection closed after.
func TestH1ServerChunkedHeaderInPieces(t *testing.T) {
	tests := []struct {
		name       string
		head, tail string
		refusable  bool
	}{
		{"with Content-Length", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n", "Content-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n", true},
		{"without Content-Length", "POST / HTTP/1.1\r\nHost: x\r\n", "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, addr := startH1(t, http.HandlerFunc(echo))
			c := dialH1(t, addr)
			c.send(tc.head)
			time.Sleep(20 * time.Millisecond)
			c.send(tc.tail)
			resp, body := c.resp("POST")
			switch {
			case resp.StatusCode == 400 && tc.refusable:
				// The server happened to read both writes at once.
			case resp.StatusCode != 200 || body != "POST / abc":
				t.Fatalf("got %d %q", resp.StatusCode, body)
			case !resp.Close:
				t.Fatal("no Connection: close")
			}
			c.closed()
		})
	}
}

func TestH1ServerShutdownNewConnection(t *testing.T) {
	s, addr := startH1(t, http.HandlerFunc(echo))
	c := dialH1(t, addr)
	time.Sleep(20 * time.Millisecond) // accepted and waiting for a request
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s.Shutdown(ctx)
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("Shutdown took %v with a connection that sent nothing", d)
	}
	c.closed()
}
