package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// The load the demo and the failover tests measure with: who answered
// when, failures, shares, and its bounds.
func TestLoadMeasures(t *testing.T) {
	var cluster atomic.Value
	cluster.Store("east")
	var fail atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if fail.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		json.NewEncoder(w).Encode(echoReply{Cluster: cluster.Load().(string)})
	}))
	defer srv.Close()

	l, err := startLoad([]loadTarget{{"backend", srv.URL + "/"}}, loadOptions{clients: 2, pause: time.Millisecond, limit: 10 * time.Second, perClient: 5000})
	if err != nil {
		t.Fatal(err)
	}
	defer l.stopLoad()
	if !pollUntil(5*time.Second, func() bool { return l.count("", time.Time{}, time.Time{}).ok >= 10 }) {
		t.Fatal("no answers")
	}
	switched := time.Now()
	cluster.Store("west")
	if !pollUntil(5*time.Second, func() bool { return !l.first("west", switched).IsZero() }) {
		t.Fatal("no answer from west")
	}
	fail.Store(true)
	failedFrom := time.Now()
	if !pollUntil(5*time.Second, func() bool { return l.count("", failedFrom, time.Time{}).failed >= 3 }) {
		t.Fatal("no failure recorded")
	}
	if err := l.stopLoad(); err != nil {
		t.Fatal(err)
	}
	end := time.Now()
	c := l.count("", time.Time{}, time.Time{})
	if c.ok != c.byCluster["east"]+c.byCluster["west"] || c.byCluster["east"] < 10 || c.byCluster["west"] < 1 || c.failed < 3 {
		t.Fatalf("count: %+v", c)
	}
	if len(c.errs) == 0 || len(c.errs) > 5 || !strings.Contains(c.errs[0], "backend: HTTP 503") {
		t.Fatalf("errs: %q", c.errs)
	}
	lastEast, firstWest := l.last("east", end), l.first("west", time.Time{})
	if lastEast.IsZero() || firstWest.Before(lastEast) || lastEast.After(switched.Add(time.Second)) {
		t.Fatalf("last east %v, first west %v (switched at %v)", lastEast, firstWest, switched)
	}
	if pct, n := l.share("east", time.Time{}, switched); pct != 100 || n == 0 {
		t.Fatalf("east's share before the switch: %.0f%% of %d", pct, n)
	}
	if pct, n := l.share("east", failedFrom.Add(100*time.Millisecond), end); pct != 0 || n != 0 {
		t.Fatalf("share while every request fails: %.0f%% of %d", pct, n)
	}
	if got := l.count("nothing", time.Time{}, time.Time{}); got.ok+got.failed != 0 {
		t.Fatalf("count of another target: %+v", got)
	}
}

// A load that ran out of its bounds says so when stopped: what it
// measured ended early.
func TestLoadBounds(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		json.NewEncoder(w).Encode(echoReply{Cluster: "east"})
	}))
	defer srv.Close()
	l, err := startLoad([]loadTarget{{"a", srv.URL}}, loadOptions{clients: 3, pause: time.Millisecond, limit: 10 * time.Second, perClient: 4})
	if err != nil {
		t.Fatal(err)
	}
	if !pollUntil(5*time.Second, func() bool { return l.count("", time.Time{}, time.Time{}).ok == 12 }) {
		t.Fatalf("want 3 clients x 4 requests, got %+v", l.count("", time.Time{}, time.Time{}))
	}
	if err := l.stopLoad(); err == nil || !strings.Contains(err.Error(), "bound") {
		t.Fatalf("stop after the bound: %v, want an error naming the bound", err)
	}
	for _, bad := range []string{"http://example.com/", "http://10.0.0.1:80/", "http://localhost:80/"} {
		if _, err := startLoad([]loadTarget{{"x", bad}}, loadOptions{clients: 1, limit: time.Second, perClient: 1}); err == nil {
			t.Errorf("load on %s started, want a refusal (loopback IPs only)", bad)
		}
	}
}
