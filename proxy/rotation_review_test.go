package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	strca "github.com/straitmesh/strait/ca"
	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/proxy/balance"
)

// A root rotation re-issues every sidecar's SVID under the new root
// before retire; retire must then fail no request. A request sent after
// both sidecars were re-issued must not ride a pooled connection on which
// the caller presented its pre-activate chain: the upstream sidecar's
// inbound side closes such connections at once when the old root leaves
// its bundle, with the request in flight.
func TestRetireFailsNoRequestAfterReissue(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		name := "http1"
		if h2 {
			name = "http2"
		}
		t.Run(name, func(t *testing.T) { testRetireFailsNoRequest(t, h2) })
	}
}

func testRetireFailsNoRequest(t *testing.T, h2 bool) {
	const td = "strait.example"
	c := catest.New(t, td, catest.Options{Cluster: "east"})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// The application behind the upstream sidecar: /slow answers after a
	// while.
	appLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var slowHits atomic.Int32
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			slowHits.Add(1)
			time.Sleep(1500 * time.Millisecond)
		}
		io.WriteString(w, "ok")
	})}
	go app.Serve(appLn)
	defer app.Close()

	backend, frontend := newCPlessSidecar(t, c, "backend", appLn.Addr().String()), newCPlessSidecar(t, c, "frontend", appLn.Addr().String())
	go backend.credentialsLoop(ctx)
	go frontend.credentialsLoop(ctx)
	backend.in.setPolicy(compileAuthorization(&controlplanev1.Authorization{}))
	inAddr := serveInbound(ctx, t, backend)

	o := frontend.out
	st := &upstreamState{svc: &controlplanev1.Service{Name: "backend"}, policy: &controlplanev1.TrafficPolicy{}}
	ep := balance.Endpoint{Key: "backend-0", Address: inAddr, SPIFFEID: "spiffe://" + td + "/ns/default/sa/backend"}
	get := func(path string) error {
		p, err := o.transport(ep, st, h2)
		if err != nil {
			return err
		}
		req, _ := http.NewRequest("GET", "https://backend"+path, nil)
		resp, err := p.RoundTrip(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		_, err = io.ReadAll(resp.Body)
		return err
	}
	if err := get("/"); err != nil { // a pooled connection, before the rotation
		t.Fatal(err)
	}

	a := c.Authority
	setBundle := func() {
		t.Helper()
		for _, s := range []*Sidecar{backend, frontend} {
			if _, err := s.creds.SetBundle(a.Bundle()); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := a.Prepare(ctx, strca.PrepareOptions{}); err != nil {
		t.Fatal(err)
	}
	setBundle()
	if err := a.Activate(ctx); err != nil {
		t.Fatal(err)
	}
	iss, err := a.Issuer("east")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []*Sidecar{backend, frontend} { // re-issued, as the retire gate waits for
		sv, err := iss.MintSVID(s.creds.SVID().ID, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.creds.SetSVID(sv); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(300 * time.Millisecond)
	if err := get("/"); err != nil {
		t.Fatal(err)
	}

	slow := make(chan error, 1)
	go func() { slow <- get("/slow") }()
	time.Sleep(300 * time.Millisecond) // in flight
	if err := a.Retire(ctx, strca.RetireOptions{Acknowledged: true}); err != nil {
		t.Fatal(err)
	}
	setBundle()
	if err := <-slow; err != nil {
		t.Fatalf("a request sent after every sidecar was re-issued failed at retire: %v", err)
	}
	if n := slowHits.Load(); n != 1 {
		t.Fatalf("the application received the request %d times: its connection was cut at retire and the request sent again", n)
	}
}
