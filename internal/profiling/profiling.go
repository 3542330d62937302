// Package profiling serves the profiles a sidecar or gateway offers on its
// admin port when started with --profiling: a CPU profile over a bounded
// time, the heap and the goroutines. It uses runtime/pprof directly, so
// nothing is registered on http.DefaultServeMux.
package profiling

import (
	"net/http"
	"runtime/pprof"
	"strconv"
	"time"
)

// Paths are the endpoints Register adds.
var Paths = []string{"/debug/pprof/profile", "/debug/pprof/heap", "/debug/pprof/goroutine"}

// Register adds to mux:
//   - GET /debug/pprof/profile?seconds=N: a CPU profile of the next N
//     seconds (default 10, at most 120; one at a time);
//   - GET /debug/pprof/heap: the heap profile;
//   - GET /debug/pprof/goroutine: every goroutine's stack, as a profile.
func Register(mux *http.ServeMux) {
	mux.HandleFunc("GET /debug/pprof/profile", cpuProfile)
	mux.HandleFunc("GET /debug/pprof/heap", lookup("heap"))
	mux.HandleFunc("GET /debug/pprof/goroutine", lookup("goroutine"))
}

func lookup(name string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		pprof.Lookup(name).WriteTo(w, 0)
	}
}

// cpuProfile writes a CPU profile of the next ?seconds=N seconds.
func cpuProfile(w http.ResponseWriter, r *http.Request) {
	secs, err := strconv.Atoi(r.URL.Query().Get("seconds"))
	if err != nil || secs <= 0 {
		secs = 10
	}
	secs = min(secs, 120)
	w.Header().Set("Content-Type", "application/octet-stream")
	if err := pprof.StartCPUProfile(w); err != nil {
		http.Error(w, err.Error(), http.StatusConflict)
		return
	}
	t := time.NewTimer(time.Duration(secs) * time.Second)
	defer t.Stop()
	select {
	case <-t.C:
	case <-r.Context().Done():
	}
	pprof.StopCPUProfile()
}
