package profiling

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
)

func TestRegister(t *testing.T) {
	mux := http.NewServeMux()
	Register(mux)
	srv := httptest.NewServer(mux)
	defer srv.Close()
	get := func(path string) (int, []byte) {
		t.Helper()
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, b
	}
	gzipMagic := []byte{0x1f, 0x8b}
	for _, p := range []string{"/debug/pprof/heap", "/debug/pprof/goroutine"} {
		if code, b := get(p); code != http.StatusOK || !bytes.HasPrefix(b, gzipMagic) {
			t.Errorf("GET %s: %d, %d bytes; want 200 and a gzipped profile", p, code, len(b))
		}
	}
	// Two CPU profiles at once: the second is refused, the first completes.
	var wg sync.WaitGroup
	codes := make([]int, 2)
	profiles := make([][]byte, 2)
	for i := range 2 {
		wg.Go(func() { codes[i], profiles[i] = get("/debug/pprof/profile?seconds=1") })
	}
	wg.Wait()
	ok, conflict := 0, 0
	for i, c := range codes {
		switch {
		case c == http.StatusOK && bytes.HasPrefix(profiles[i], gzipMagic):
			ok++
		case c == http.StatusConflict:
			conflict++
		}
	}
	if ok != 1 || conflict != 1 {
		t.Errorf("two CPU profiles at once: statuses %v, want one 200 with a profile and one 409", codes)
	}
	if code, _ := get("/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("GET /debug/pprof/: %d, want 404 (no index is served)", code)
	}
}
