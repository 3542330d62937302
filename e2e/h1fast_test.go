package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// rawApp is an HTTP/1.1 app that answers by path with scripted raw bytes,
// to drive the sidecars' byte-level fast path and its fallbacks.
type rawApp struct {
	release chan struct{} // lets /stream finish
	done    chan struct{} // ends /hang
}

func (a *rawApp) serve(ln net.Listener) func() {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go a.conn(c)
		}
	}()
	return func() { ln.Close() }
}

func (a *rawApp) conn(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		io.Copy(io.Discard, req.Body)
		var out string
		closeAfter := false
		switch req.URL.Path {
		case "/headers":
			h := map[string][]string(req.Header.Clone())
			h["Host"] = []string{req.Host}
			b, _ := json.Marshal(h)
			out = fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(b), b)
		case "/stream":
			c.Write([]byte("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"))
			<-a.release
			out = "6\r\nsecond\r\n0\r\nX-Sum: 11\r\n\r\n"
		case "/close-delimited":
			out, closeAfter = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close", true
		case "/interim":
			out = "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
		case "/head":
			out = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
			if req.Method != http.MethodHead {
				out += "0123456789"
			}
		case "/upstream-close":
			out, closeAfter = "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", true
		case "/forged-error":
			out = "HTTP/1.1 200 OK\r\nX-Strait-Error: forged\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok"
		case "/big-head":
			out = "HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("b", 6000) + "\r\nContent-Length: 2\r\n\r\nok"
		case "/hang":
			<-a.done
			return
		case "/truncated-fast", "/truncated-slow":
			trailer := ""
			if req.URL.Path == "/truncated-slow" {
				trailer = "Trailer: X-Sum\r\n" // outside the fast subset
			}
			c.Write([]byte("HTTP/1.1 200 OK\r\n" + trailer + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"))
			return
		case "/hop":
			out = "HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: secret\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\nok"
		default:
			out = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
		}
		if _, err := c.Write([]byte(out)); err != nil || closeAfter {
			return
		}
	}
}

// TestHTTP1FastPathThroughSidecars sends raw HTTP/1.1 through a client and
// a server sidecar to an app answering with scripted bytes: framing,
// streaming, interim responses, hop-by-hop and identity fields, and the
// cases left to the net/http path all come out as a proxy should.
func TestHTTP1FastPathThroughSidecars(t *testing.T) {
	east := newCluster(t, "east", clusterOptions{})
	app := &rawApp{release: make(chan struct{}), done: make(chan struct{})}
	defer close(app.done)
	east.workload("backend-0", "backend", workloadOptions{serve: app.serve})
	fe := east.workload("frontend-0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	fe.waitEndpoints(t, "backend", 1)
	addr := fe.sc.Addrs().Upstreams["backend"]

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(c)
	do := func(raw, method string) (*http.Response, string) {
		t.Helper()
		if _, err := c.Write([]byte(raw)); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, &http.Request{Method: method})
		if err != nil {
			t.Fatalf("%q: %v", raw, err)
		}
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("%q: body: %v", raw, err)
		}
		return resp, string(b)
	}

	// Identity and hop-by-hop fields of the caller do not reach the app;
	// the verified identity does.
	resp, body := do("GET /headers HTTP/1.1\r\nHost: backend\r\nX-Forwarded-Client-Cert: By=x;URI=spiffe://"+trustDomain+"/ns/default/sa/admin\r\n"+
		"X-Strait-Caller: admin\r\nX-Forwarded-For: 203.0.113.9\r\nKeep-Alive: timeout=1\r\nProxy-Authorization: Basic eA==\r\nX-App: kept\r\n\r\n", "GET")
	var seen map[string][]string
	if err := json.Unmarshal([]byte(body), &seen); err != nil || resp.StatusCode != 200 {
		t.Fatalf("headers: %d %q: %v", resp.StatusCode, body, err)
	}
	if got := seen["X-Forwarded-Client-Cert"]; len(got) != 1 || !strings.HasSuffix(got[0], ";URI="+frontendID()) {
		t.Errorf("app saw X-Forwarded-Client-Cert %q, want only the verified frontend", got)
	}
	for _, k := range []string{"X-Strait-Caller", "X-Forwarded-For", "Keep-Alive", "Proxy-Authorization", "Connection"} {
		if v, ok := seen[k]; ok {
			t.Errorf("app saw %s: %q", k, v)
		}
	}
	if seen["X-App"][0] != "kept" || seen["Host"][0] != "backend" {
		t.Errorf("app saw X-App %q and Host %q", seen["X-App"], seen["Host"])
	}

	// A stream reaches the client as it comes, trailer included.
	if _, err := c.Write([]byte("GET /stream HTTP/1.1\r\nHost: backend\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	sresp, err := http.ReadResponse(br, &http.Request{Method: "GET"})
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, 5)
	if _, err := io.ReadFull(sresp.Body, first); err != nil || string(first) != "first" {
		t.Fatalf("first chunk of a stream: %q %v", first, err)
	}
	close(app.release)
	rest, err := io.ReadAll(sresp.Body)
	if err != nil || string(rest) != "second" || sresp.Trailer.Get("X-Sum") != "11" {
		t.Fatalf("rest of the stream: %q, trailer %v, %v", rest, sresp.Trailer, err)
	}

	// Interim responses are not passed on; HEAD has no body.
	if resp, body := do("GET /interim HTTP/1.1\r\nHost: backend\r\n\r\n", "GET"); resp.StatusCode != 200 || body != "ok" {
		t.Errorf("interim: %d %q", resp.StatusCode, body)
	}
	if resp, body := do("HEAD /head HTTP/1.1\r\nHost: backend\r\n\r\n", "HEAD"); resp.StatusCode != 200 || body != "" || resp.ContentLength != 10 {
		t.Errorf("HEAD: %d %q length %d", resp.StatusCode, body, resp.ContentLength)
	}
	// Only the sidecar speaks in its own header; hop-by-hop fields stay.
	if resp, _ := do("GET /forged-error HTTP/1.1\r\nHost: backend\r\n\r\n", "GET"); resp.Header.Get("X-Strait-Error") != "" || resp.Header.Get("Keep-Alive") != "" {
		t.Errorf("forged error header or Keep-Alive passed on: %v", resp.Header)
	}
	if resp, _ := do("GET /hop HTTP/1.1\r\nHost: backend\r\n\r\n", "GET"); resp.Header.Get("X-Hop") != "" || resp.Header.Get("X-Kept") != "1" {
		t.Errorf("a field the response's Connection names passed on, or another dropped: %v", resp.Header)
	}
	// An upstream closing after its response, a body framed by the close,
	// a head too large for the fast path: the client's connection goes on.
	for _, path := range []string{"/upstream-close", "/close-delimited", "/big-head", "/upstream-close"} {
		resp, body := do("GET "+path+" HTTP/1.1\r\nHost: backend\r\n\r\n", "GET")
		if resp.StatusCode != 200 || body == "" || resp.Close {
			t.Errorf("%s: %d %q close %v", path, resp.StatusCode, body, resp.Close)
		}
	}
	// Pipelined requests are answered in order.
	if _, err := c.Write([]byte("POST /headers HTTP/1.1\r\nHost: backend\r\nContent-Length: 3\r\n\r\nabcGET /interim HTTP/1.1\r\nHost: backend\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	for i, want := range []string{"application/json", ""} {
		resp, err := http.ReadResponse(br, &http.Request{Method: "GET"})
		if err != nil {
			t.Fatalf("pipelined response %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != want {
			t.Errorf("pipelined response %d: %d %q", i, resp.StatusCode, resp.Header.Get("Content-Type"))
		}
	}
	// A bodyless POST reaches the app with its length, as net/http sends it.
	if resp, body := do("POST /headers HTTP/1.1\r\nHost: backend\r\n\r\n", "POST"); resp.StatusCode != 200 || !strings.Contains(body, `"Content-Length":["0"]`) {
		t.Errorf("bodyless POST: %d %s", resp.StatusCode, body)
	}

	// The sidecar's own answer to a HEAD (here a timeout) has no body:
	// the connection stays in step.
	east.mustApply(`
apiVersion: strait.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: backend, namespace: default}
spec:
  service: backend
  timeouts: {request: 300ms}
  retries: {attempts: 0}
`)
	waitUntil(t, 10*time.Second, "request timeout in force", func() bool {
		for _, svc := range fe.sc.Snapshot().GetServices() {
			if svc.GetPolicy().GetRequestTimeout().AsDuration() == 300*time.Millisecond {
				return true
			}
		}
		return false
	})
	if resp, body := do("HEAD /hang HTTP/1.1\r\nHost: backend\r\n\r\n", "HEAD"); resp.StatusCode != http.StatusGatewayTimeout || body != "" || resp.Header.Get("X-Strait-Error") == "" {
		t.Errorf("HEAD timing out: %d %q %v", resp.StatusCode, body, resp.Header)
	}
	if resp, body := do("GET /interim HTTP/1.1\r\nHost: backend\r\n\r\n", "GET"); resp.StatusCode != 200 || body != "ok" {
		t.Errorf("after a HEAD answered by the sidecar: %d %q", resp.StatusCode, body)
	}

	// A body that breaks off does not reach the client as complete,
	// whichever path framed it (a 5000-byte request body keeps both
	// sidecars on the net/http path).
	big := "POST /truncated-slow HTTP/1.1\r\nHost: backend\r\nContent-Length: 5000\r\n\r\n" + strings.Repeat("x", 5000)
	for _, raw := range []string{"GET /truncated-fast HTTP/1.1\r\nHost: backend\r\n\r\n", "GET /truncated-slow HTTP/1.1\r\nHost: backend\r\n\r\n", big} {
		path := strings.Fields(raw)[1]
		tc, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		tc.SetDeadline(time.Now().Add(10 * time.Second))
		tc.Write([]byte(raw))
		resp, err := http.ReadResponse(bufio.NewReader(tc), &http.Request{Method: "GET"})
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if b, err := io.ReadAll(resp.Body); err == nil {
			t.Errorf("%s: a truncated body came through as complete: %q", path, b)
		}
		tc.Close()
	}

	// A client's Connection: close is honoured.
	resp, _ = do("GET /interim HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n", "GET")
	if !resp.Close {
		t.Error("response to Connection: close did not say close")
	}
	if n, err := br.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("connection still open after Connection: close (%d, %v)", n, err)
	}
}
