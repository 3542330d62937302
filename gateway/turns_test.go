package gateway

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
)

// quicPair returns both ends of a QUIC connection on loopback; server
// configures the accepting end (flow-control windows).
func quicPair(t *testing.T, server *quic.Config) (dialed, accepted *quic.Conn) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "turns"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"turns"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	ln, err := quic.ListenAddr("127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, NextProtos: []string{"turns"}}, server)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dialed, err = quic.DialAddr(ctx, ln.Addr().String(), &tls.Config{RootCAs: pool, ServerName: "turns", NextProtos: []string{"turns"}}, &quic.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dialed.CloseWithError(0, "") })
	accepted, err = ln.Accept(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { accepted.CloseWithError(0, "") })
	return dialed, accepted
}

func turnCounters() (map[string]prometheus.Counter, *prometheus.CounterVec) {
	v := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "turns"}, []string{"outcome"})
	return map[string]prometheus.Counter{turnRun: v.WithLabelValues(turnRun), turnOverran: v.WithLabelValues(turnOverran)}, v
}

// Streams writing bulk data at once share the connection: when the first
// has finished, each of the others has had at least half of its data
// through (first come, first served turns; about three quarters in
// practice), and the writes went out as runs.
func TestBulkWritesTakeTurns(t *testing.T) {
	const streams, per, chunk = 4, 4 << 20, 64 << 10
	dialed, accepted := quicPair(t, &quic.Config{})
	outcome, vec := turnCounters()
	turns := newSendTurns()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	var progress [streams]atomic.Int64 // bytes read per stream
	var atFirstDone [streams]int64
	var once sync.Once
	var readers sync.WaitGroup
	readers.Go(func() {
		var wg sync.WaitGroup
		for range streams {
			str, err := accepted.AcceptStream(ctx)
			if err != nil {
				t.Error(err)
				return
			}
			wg.Go(func() {
				var id [1]byte
				if _, err := io.ReadFull(str, id[:]); err != nil {
					t.Error(err)
					return
				}
				buf := make([]byte, 32<<10)
				var got int
				for {
					n, err := str.Read(buf)
					got += n
					progress[id[0]].Store(int64(got))
					if err == io.EOF {
						break
					}
					if err != nil {
						t.Error(err)
						return
					}
				}
				once.Do(func() {
					for i := range progress {
						atFirstDone[i] = progress[i].Load()
					}
				})
				if got != per {
					t.Errorf("stream %d: got %d bytes, want %d", id[0], got, per)
				}
			})
		}
		wg.Wait()
	})

	start := make(chan struct{})
	var writers sync.WaitGroup
	payload := make([]byte, chunk)
	for i := range streams {
		str, err := dialed.OpenStreamSync(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := str.Write([]byte{byte(i)}); err != nil { // small: no turn
			t.Fatal(err)
		}
		writers.Go(func() {
			<-start
			w := &streamWriter{str: str, turns: turns, outcome: outcome}
			for range per / chunk {
				if _, err := w.Write(payload); err != nil {
					t.Error(err)
					return
				}
			}
			str.Close()
		})
	}
	close(start)
	writers.Wait()
	readers.Wait()

	t.Logf("bytes read per stream when the first finished: %v", atFirstDone)
	for i, n := range atFirstDone {
		if n < per/2 {
			t.Errorf("stream %d had %d of %d bytes through when the first stream finished: the connection was not shared", i, n, per)
		}
	}
	runs := metricValue(vec.WithLabelValues(turnRun)) + metricValue(vec.WithLabelValues(turnOverran))
	if want := float64(streams * per / chunk); runs != want {
		t.Errorf("bulk writes counted: %v, want %v", runs, want)
	}
}

// A stream whose reader stopped holds a turn for turnHold at most: with
// every turn taken by such streams, another stream's bulk writes still get
// through, and the overrun is counted.
func TestStalledStreamsGiveTheirTurnsBack(t *testing.T) {
	const window = 64 << 10
	dialed, accepted := quicPair(t, &quic.Config{InitialStreamReceiveWindow: window, MaxStreamReceiveWindow: window})
	outcome, vec := turnCounters()
	turns := newSendTurns()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	payload := make([]byte, 256<<10) // more than the window: blocks unread
	var stalled sync.WaitGroup
	for i := range bulkTurns {
		str, err := dialed.OpenStreamSync(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := str.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		stalled.Go(func() {
			w := &streamWriter{str: str, turns: turns, outcome: outcome}
			w.Write(payload) // returns when the connection closes
		})
	}
	for range bulkTurns { // accepted, never read
		if _, err := accepted.AcceptStream(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// Both turns are taken (or were, and the writes overran).
	time.Sleep(2 * turnHold)

	str, err := dialed.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sent := make(chan error, 1)
	go func() {
		w := &streamWriter{str: str, turns: turns, outcome: outcome}
		for range 4 {
			if _, err := w.Write(payload); err != nil {
				sent <- err
				return
			}
		}
		sent <- str.Close()
	}()
	in, err := accepted.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, in)
	if err != nil || n != 4*int64(len(payload)) {
		t.Fatalf("read %d bytes (%v), want %d", n, err, 4*len(payload))
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if got := metricValue(vec.WithLabelValues(turnOverran)); got < bulkTurns {
		t.Errorf("overran bulk writes: %v, want at least %d (the stalled streams')", got, bulkTurns)
	}
	dialed.CloseWithError(0, "")
	stalled.Wait()
}

// Small writes take no turn: with every turn held by a stalled stream,
// they go straight through.
func TestSmallWritesTakeNoTurn(t *testing.T) {
	dialed, accepted := quicPair(t, &quic.Config{})
	outcome, _ := turnCounters()
	turns := newSendTurns()
	for range bulkTurns {
		turns <- struct{}{}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	str, err := dialed.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	w := &streamWriter{str: str, turns: turns, outcome: outcome}
	if _, err := w.Write(make([]byte, bulkWrite-1)); err != nil {
		t.Fatal(err)
	}
	in, err := accepted.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(in, make([]byte, bulkWrite-1)); err != nil {
		t.Fatal(err)
	}
}

// A bulk write that waited for its turn takes along what its TCP source
// received meanwhile: one run, not one per read.
func TestBulkWriteTakesWhatArrivedWhileItWaited(t *testing.T) {
	dialed, accepted := quicPair(t, &quic.Config{})
	outcome, vec := turnCounters()
	turns := newSendTurns()
	for range bulkTurns {
		turns <- struct{}{} // every turn taken
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	str, err := dialed.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	client, server := tcpPair(t)
	pumped := make(chan error, 1)
	go func() {
		_, werr := pump(&streamWriter{str: str, turns: turns, outcome: outcome}, server, prometheus.NewCounter(prometheus.CounterOpts{Name: "sent"}))
		str.Close()
		pumped <- werr
	}()
	write := func(n int) {
		if _, err := client.Write(make([]byte, n)); err != nil {
			t.Fatal(err)
		}
	}
	// A small write goes through at once (no turn), and steps the
	// relay's buffer up to the large one.
	write(smallBuffer)
	in, err := accepted.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(in, make([]byte, smallBuffer)); err != nil {
		t.Fatal(err)
	}
	write(bulkWrite + 1024) // read, then waits for a turn
	time.Sleep(100 * time.Millisecond)
	write(largeBuffer - bulkWrite - 1024) // arrives while it waits
	time.Sleep(100 * time.Millisecond)
	<-turns // a turn comes free
	if _, err := io.ReadFull(in, make([]byte, largeBuffer)); err != nil {
		t.Fatal(err)
	}
	client.Close()
	if err := <-pumped; err != nil {
		t.Fatal(err)
	}
	if runs := metricValue(vec.WithLabelValues(turnRun)); runs != 1 {
		t.Errorf("runs: %v, want 1 (what arrived while the first read waited goes with it)", runs)
	}
}
