package proxy

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"maps"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/catest"
)

func obs2Handshakes(t *testing.T, m *Metrics) map[string]float64 {
	t.Helper()
	ch := make(chan prometheus.Metric, 64)
	m.handshakeFails.Collect(ch)
	close(ch)
	out := map[string]float64{}
	for c := range ch {
		var d dto.Metric
		if err := c.Write(&d); err != nil {
			t.Fatal(err)
		}
		var dir, reason string
		for _, l := range d.GetLabel() {
			switch l.GetName() {
			case "direction":
				dir = l.GetValue()
			case "reason":
				reason = l.GetValue()
			}
		}
		out[dir+"/"+reason] += d.GetCounter().GetValue()
	}
	return out
}

// Every failed inbound handshake is counted in
// strait_proxy_tls_handshake_failures_total, not only those refused by
// the sidecar's own verification: a caller presenting no certificate, or
// an application speaking plaintext to the inbound port (the commonest
// misconfiguration), is refused by crypto/tls before VerifyConnection runs.
func TestInboundHandshakeFailuresAllCounted(t *testing.T) {
	c := catest.New(t, "strait.example")
	creds, err := NewCredentials(spiffeid.RequireTrustDomainFromString("strait.example"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := creds.SetBundle(c.Bundle()); err != nil {
		t.Fatal(err)
	}
	if err := creds.SetSVID(c.SVID(t, "spiffe://strait.example/ns/default/sa/backend", time.Hour)); err != nil {
		t.Fatal(err)
	}
	m := NewMetrics(prometheus.NewRegistry())
	in := newInbound(creds, m, slog.New(slog.DiscardHandler), "backend", "127.0.0.1:1", false)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { in.run(ctx, ln); close(done) }()
	defer func() { cancel(); <-done }()

	// A TLS client with no certificate.
	cc, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{alpnHTTP1}, MinVersion: tls.VersionTLS13})
	if err == nil {
		cc.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(cc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		io.ReadAll(cc) // the server's alert
		cc.Close()
	}
	// Plaintext HTTP to the mTLS port.
	pc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	pc.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(pc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	io.ReadAll(pc)
	pc.Close()

	// A certificate of another CA: refused by the sidecar's verification,
	// counted once, as untrusted.
	forged := catest.New(t, "strait.example").SVID(t, "spiffe://strait.example/ns/default/sa/frontend", time.Hour)
	fc := tls.Certificate{PrivateKey: forged.PrivateKey}
	for _, x := range forged.Certificates {
		fc.Certificate = append(fc.Certificate, x.Raw)
	}
	if fcc, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{fc}, NextProtos: []string{alpnHTTP1}}); err == nil {
		fcc.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(fcc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		io.ReadAll(fcc)
		fcc.Close()
	}

	want := map[string]float64{"inbound/no_certificate": 1, "inbound/not_tls": 1, "inbound/untrusted": 1}
	var got map[string]float64
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		got = obs2Handshakes(t, m)
		if maps.Equal(got, want) {
			return
		}
	}
	t.Errorf("handshake failures counted: %v, want %v", got, want)
}
