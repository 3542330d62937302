package proxy

import (
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/catest"
)

// Bytes relayed on an opaque TCP connection show in
// strait_proxy_tcp_bytes_total while the connection is open, not only once
// it closes: a long-lived connection (a database session) is otherwise
// invisible for its whole life and then appears as one spike.
func TestTCPBytesCountedWhileOpen(t *testing.T) {
	creds := svidCreds(t, "spiffe://strait.example/ns/default/sa/db")
	// An echo application.
	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	go func() {
		for {
			a, err := app.Accept()
			if err != nil {
				return
			}
			go func() { defer a.Close(); io.Copy(a, a) }()
		}
	}()
	m := NewMetrics(prometheus.NewRegistry())
	in := newInbound(creds, m, slog.New(slog.DiscardHandler), "db", app.Addr().String(), true)

	srvRaw, cliRaw := net.Pipe()
	cert, _ := creds.Certificate()
	srv := tls.Server(srvRaw, &tls.Config{Certificates: []tls.Certificate{*cert}, NextProtos: []string{alpnTCP}})
	cli := tls.Client(cliRaw, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{alpnTCP}})
	defer cli.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Handshake(); err != nil {
			return
		}
		in.serveTCP(srv)
	}()
	msg := make([]byte, 1000)
	cli.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := cli.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(cli, make([]byte, len(msg))); err != nil {
		t.Fatal(err)
	}
	// The connection stays open: what went through is counted (a write is
	// counted once it returned, a moment after the client read it).
	var recv, sent float64
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		recv = obsValue(m.tcpBytes.WithLabelValues("inbound", "db", "received"))
		sent = obsValue(m.tcpBytes.WithLabelValues("inbound", "db", "sent"))
		if recv == 1000 && sent == 1000 {
			break
		}
	}
	if recv != 1000 || sent != 1000 {
		t.Errorf("while the connection is open: received %v, sent %v bytes counted, want 1000 each", recv, sent)
	}
	cli.Close()
	<-done
	recv = obsValue(m.tcpBytes.WithLabelValues("inbound", "db", "received"))
	sent = obsValue(m.tcpBytes.WithLabelValues("inbound", "db", "sent"))
	if recv != 1000 || sent != 1000 {
		t.Errorf("after close: received %v, sent %v bytes counted, want 1000 each (no double count)", recv, sent)
	}
}

// obsValue reads a counter's or gauge's value.
func obsValue(c prometheus.Metric) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	if m.Counter != nil {
		return m.Counter.GetValue()
	}
	return m.Gauge.GetValue()
}

// A relayed TCP connection whose caller's side is closed under it (as
// Recheck closes a caller no longer allowed) ends toward the application
// too: the application was only half-closed, and a silent one (a database
// waiting for its next query) held the relay and its connection for good.
func TestTCPRelayEndsBothWaysOnAFailure(t *testing.T) {
	creds := svidCreds(t, "spiffe://strait.example/ns/default/sa/db")
	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	hold := make(chan struct{})
	defer close(hold)
	go func() { // a silent application: reads, and keeps its side open
		a, err := app.Accept()
		if err != nil {
			return
		}
		defer a.Close()
		io.Copy(io.Discard, a)
		<-hold
	}()
	m := NewMetrics(prometheus.NewRegistry())
	in := newInbound(creds, m, slog.New(slog.DiscardHandler), "db", app.Addr().String(), true)
	srvRaw, cliRaw := net.Pipe()
	defer cliRaw.Close()
	cert, _ := creds.Certificate()
	srv := tls.Server(srvRaw, &tls.Config{Certificates: []tls.Certificate{*cert}, NextProtos: []string{alpnTCP}})
	cli := tls.Client(cliRaw, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{alpnTCP}})
	relayed := make(chan struct{})
	go func() {
		defer close(relayed)
		if err := srv.Handshake(); err != nil {
			return
		}
		in.serveTCP(srv)
	}()
	go io.Copy(io.Discard, cli) // the caller reads whatever comes
	if _, err := cli.Write([]byte("query")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // the relay is under way
	srv.Close()                       // as Recheck closes it
	select {
	case <-relayed:
	case <-time.After(5 * time.Second):
		t.Fatal("the relay (and its connection to the application) did not end after the caller's side was closed")
	}
}

// svidCreds returns credentials holding an SVID for id, from a new CA of
// strait.example whose bundle they trust.
func svidCreds(t *testing.T, id string) *Credentials {
	t.Helper()
	c := catest.New(t, "strait.example")
	creds, err := NewCredentials(spiffeid.RequireTrustDomainFromString("strait.example"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := creds.SetBundle(c.Bundle()); err != nil {
		t.Fatal(err)
	}
	if err := creds.SetSVID(c.SVID(t, id, time.Hour)); err != nil {
		t.Fatal(err)
	}
	return creds
}
