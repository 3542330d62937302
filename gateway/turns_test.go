package gateway

import (
	"context"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"

	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/svid"
	"github.com/straitmesh/strait/internal/clock"
)

// quicPair returns both ends of a QUIC connection on loopback, mTLS with
// workload SVIDs; server configures the accepting end (flow-control
// windows).
func quicPair(t *testing.T, server *quic.Config) (dialed, accepted *quic.Conn) {
	t.Helper()
	ca := catest.New(t, testTD)
	srv, cli := newCreds(t, ca, workloadID("default", "server"), nil), newCreds(t, ca, workloadID("default", "client"), nil)
	ln, err := quic.ListenAddr("127.0.0.1:0", srv.ServerTLS([]string{"turns"}, srv.Verifier().VerifyConnection(svid.RoleClient, nil)), server)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dialed, err = quic.DialAddr(ctx, ln.Addr().String(), cli.ClientTLS([]string{"turns"}, cli.Verifier().VerifyConnection(svid.RoleServer, nil)), &quic.Config{})
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
// through (first come, first served; about three quarters in practice),
// and every write after a stream's first bulkAfter bytes took the turn.
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
		if _, err := str.Write([]byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
		writers.Go(func() {
			<-start
			// A run may hold the turn for a second: on a loaded machine
			// a 10 ms overrun would put its stream round robin, where
			// it gets half the connection against the others' runs.
			w := &streamWriter{str: str, turns: turns, now: time.Now, outcome: outcome, hold: time.Second}
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
	// Every write after a stream's first bulkAfter bytes takes the turn,
	// unless a run overran (a loaded machine, -race): its stream then cools
	// down, round robin.
	runs, overran := metricValue(vec.WithLabelValues(turnRun)), metricValue(vec.WithLabelValues(turnOverran))
	t.Logf("runs %v, overruns %v", runs, overran)
	if most := float64(streams * (per - bulkAfter) / chunk); runs+overran < streams || runs+overran > most {
		t.Errorf("bulk writes that took the turn: %v, want %d to %v", runs+overran, streams, most)
	}
	if overran == 0 && runs != float64(streams*(per-bulkAfter)/chunk) {
		t.Errorf("runs: %v with no overrun, want %d (every write after a stream's first %d bytes)", runs, streams*(per-bulkAfter)/chunk, bulkAfter)
	}
}

// A run that overruns (here, a peer that stopped reading) gives the turn
// back at once and finishes round robin; its stream then takes no turn for
// a cool-down that doubles with each overrun and is forgotten after a run
// on time.
func TestOverrunningStreamsGiveTheTurnBackAndCoolDown(t *testing.T) {
	const window = 3 << 19 // 1.5 MiB
	dialed, accepted := quicPair(t, &quic.Config{InitialStreamReceiveWindow: window, MaxStreamReceiveWindow: window, InitialConnectionReceiveWindow: 64 << 20, MaxConnectionReceiveWindow: 64 << 20})
	outcome, vec := turnCounters()
	turns := newSendTurns()
	clk := clock.NewManual(time.Unix(1e9, 0))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	str, err := dialed.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	w := &streamWriter{str: str, turns: turns, now: clk.Now, outcome: outcome}
	if _, err := w.Write(make([]byte, bulkAfter)); err != nil { // round robin, into the window
		t.Fatal(err)
	}
	in, err := accepted.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	drain := func(n int) {
		t.Helper()
		if _, err := io.ReadFull(in, make([]byte, n)); err != nil {
			t.Fatal(err)
		}
	}
	drain(bulkAfter)
	count := func(outcome string) float64 { return metricValue(vec.WithLabelValues(outcome)) }
	// write writes n bytes, the peer reading only once the write overran
	// (stalled) or at once.
	write := func(n int, stalled bool) {
		t.Helper()
		overran := count(turnOverran)
		done := make(chan error, 1)
		go func() {
			_, err := w.Write(make([]byte, n))
			done <- err
		}()
		if stalled {
			eventually(t, "the stalled run to overrun", func() error {
				if count(turnOverran) == overran {
					return errors.New("not yet")
				}
				if len(turns) != 0 {
					return errors.New("the turn is still held")
				}
				return nil
			})
		}
		drain(n)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}

	write(2<<20, true) // more than the window: the peer does not read
	if w.cooldown != minCooldown || count(turnRun) != 0 {
		t.Fatalf("after an overrun: cool-down %s, runs %v; want %s, 0", w.cooldown, count(turnRun), minCooldown)
	}
	write(256<<10, false) // cooling down: round robin
	if count(turnRun)+count(turnOverran) != 1 {
		t.Fatalf("a cooling stream took the turn (runs %v, overruns %v)", count(turnRun), count(turnOverran))
	}
	clk.Advance(minCooldown)
	write(2<<20, true) // overruns again: twice the cool-down
	if w.cooldown != 2*minCooldown {
		t.Fatalf("after a second overrun: cool-down %s, want %s", w.cooldown, 2*minCooldown)
	}
	// A run on time forgets the cool-down. (A slow machine may overrun even
	// this one: then the cool-down doubles, and it is tried again.)
	for try := 0; count(turnRun) == 0; try++ {
		if try == 5 {
			t.Fatalf("no run on time in 5 tries (overruns %v)", count(turnOverran))
		}
		clk.Advance(w.cooldown)
		write(64<<10, false)
	}
	if w.cooldown != 0 {
		t.Fatalf("after a run on time: cool-down %s, want 0", w.cooldown)
	}
}

// Small writes, and bulk writes on a stream that has not carried bulkAfter
// yet, take no turn: they go through while another stream holds it.
func TestSmallWritesAndYoungStreamsTakeNoTurn(t *testing.T) {
	dialed, accepted := quicPair(t, &quic.Config{})
	outcome, vec := turnCounters()
	turns := newSendTurns()
	turns <- struct{}{} // held elsewhere
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	str, err := dialed.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	w := &streamWriter{str: str, turns: turns, now: time.Now, outcome: outcome}
	for _, n := range []int{bulkWrite - 1, 256 << 10} { // within the stream window: read after
		if _, err := w.Write(make([]byte, n)); err != nil {
			t.Fatal(err)
		}
	}
	in, err := accepted.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(in, make([]byte, bulkWrite-1+256<<10)); err != nil {
		t.Fatal(err)
	}
	if n := metricValue(vec.WithLabelValues(turnRun)) + metricValue(vec.WithLabelValues(turnOverran)); n != 0 {
		t.Errorf("%v writes took the turn, want none", n)
	}
}

// A bulk write that waited for the turn takes along what its TCP source
// received meanwhile: one run, not one per read.
func TestBulkWriteTakesWhatArrivedWhileItWaited(t *testing.T) {
	dialed, accepted := quicPair(t, &quic.Config{})
	outcome, vec := turnCounters()
	turns := newSendTurns()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	str, err := dialed.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	client, server := tcpPair(t)
	pumped := make(chan error, 1)
	go func() {
		_, werr := pump(&streamWriter{str: str, turns: turns, now: time.Now, outcome: outcome}, server, prometheus.NewCounter(prometheus.CounterOpts{Name: "sent"}))
		str.Close()
		pumped <- werr
	}()
	write := func(n int) {
		t.Helper()
		if _, err := client.Write(make([]byte, n)); err != nil {
			t.Fatal(err)
		}
	}
	// The stream's first bulkAfter bytes go round robin.
	write(bulkAfter)
	in, err := accepted.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(in, make([]byte, bulkAfter)); err != nil {
		t.Fatal(err)
	}
	took := func() float64 {
		return metricValue(vec.WithLabelValues(turnRun)) + metricValue(vec.WithLabelValues(turnOverran))
	}
	before := took()
	turns <- struct{}{}     // the turn is taken elsewhere
	write(bulkWrite + 1024) // read, then waits for the turn
	time.Sleep(100 * time.Millisecond)
	write(20 << 10) // arrives while it waits
	time.Sleep(100 * time.Millisecond)
	<-turns // the turn comes free
	if _, err := io.ReadFull(in, make([]byte, bulkWrite+1024+20<<10)); err != nil {
		t.Fatal(err)
	}
	client.Close()
	if err := <-pumped; err != nil {
		t.Fatal(err)
	}
	if n := took() - before; n != 1 {
		t.Errorf("writes that took the turn: %v, want 1 (what arrived while the first read waited goes with it)", n)
	}
}

// A run's hold is per quarter MiB piece, not per run: a 2 MiB run to a
// peer that reads a quarter MiB every 100 ms (the stream's window is a
// quarter MiB) takes about 800 ms, longer than the hold of 400 ms, yet each
// piece is on time, so it is one run and no overrun. A stalled reader is
// thus found within one piece's hold however long the run.
func TestRunHoldIsPerPiece(t *testing.T) {
	const window, run, hold = runPiece, 2 << 20, 400 * time.Millisecond
	dialed, accepted := quicPair(t, &quic.Config{InitialStreamReceiveWindow: window, MaxStreamReceiveWindow: window, InitialConnectionReceiveWindow: 64 << 20, MaxConnectionReceiveWindow: 64 << 20})
	outcome, vec := turnCounters()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	str, err := dialed.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	w := &streamWriter{str: str, turns: newSendTurns(), now: time.Now, outcome: outcome, hold: hold}
	read := make(chan error, 1)
	go func() {
		in, err := accepted.AcceptStream(ctx)
		if err != nil {
			read <- err
			return
		}
		buf := make([]byte, runPiece)
		for left := bulkAfter + run; left > 0; left -= len(buf) {
			if _, err := io.ReadFull(in, buf); err != nil {
				read <- err
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		read <- nil
	}()
	if _, err := w.Write(make([]byte, bulkAfter)); err != nil { // round robin: a young stream
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := w.Write(make([]byte, run)); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if err := <-read; err != nil {
		t.Fatal(err)
	}
	runs, overran := metricValue(vec.WithLabelValues(turnRun)), metricValue(vec.WithLabelValues(turnOverran))
	if took <= hold {
		t.Skipf("the run took %s, not longer than the hold %s: nothing to show", took, hold)
	}
	if runs != 1 || overran != 0 {
		t.Fatalf("a %s run whose every piece kept up: %v runs, %v overruns; want 1 run", took, runs, overran)
	}
}
