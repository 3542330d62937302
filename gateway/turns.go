package gateway

import (
	"errors"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
)

// Bulk transfers on a peer connection take turns.
//
// quic-go sends the streams of a connection round robin, a packet each
// (incremental, in RFC 9218's terms). When many tunnelled streams move
// bulk data at once, the receiving gateway then finds a little of every
// stream each time it reads the connection, and hands it on to the
// endpoints in small writes: with 16 streams 10 KiB on average, against
// 100 KiB with one, and the endpoints behind it spent half as much again
// CPU per byte (make bench, federation).
//
// So once a stream has carried bulkAfter bytes (a transfer, not a request
// or a reply), each write of bulkWrite bytes or more waits for its
// connection's turn and goes out as one run: while it holds the turn the
// stream is non-incremental, which quic-go sends before the round robin
// streams' next packet and without interleaving them, and it takes along
// what its TCP side received while it waited (see pump). The turn is
// handed out first come, first served (a channel's waiting senders are
// queued in order), so every bulk stream gets its share, one run at a
// time. A run is one write, as large as the relay's buffer, so a stream
// with a 1 MiB buffer gets up to 4 times the share of one that found only
// 256 KiB buffers left to lend (more than 16 bulk streams on a gateway),
// and up to 32 times that of one left with 32 KiB (more than 80). Smaller
// writes and younger streams take no turn and stay round robin; quic-go
// alternates them with the run packet by packet, so they do not wait
// behind it.
//
// A run goes in pieces of a quarter MiB (runPiece; a relay's buffer holds
// up to 1 MiB), each of which must be sent within turnHold. A piece that
// takes longer (a reader slower than the path, a slow path, a stalled
// peer) gives the turn back, the rest of the run goes round robin, and its
// stream takes no turn for a cool-down that doubles with every overrun,
// from minCooldown to maxCooldown, and is forgotten after a run on time.
// Slow streams thus hold the others up for turnHold once, then seldom; on
// a path too slow for a piece within turnHold (25 MiB/s) every stream ends
// up round robin, as quic-go sends by default. (While a bulk stream cools
// down it is in the round robin class, which quic-go alternates with the
// run: against the streams taking turns it may get up to half of the
// connection, a skew that lasts the cool-down.)
const (
	bulkWrite   = 8 << 10
	bulkAfter   = 1 << 20
	turnHold    = 10 * time.Millisecond
	runPiece    = 256 << 10
	minCooldown = time.Second
	maxCooldown = time.Minute
	// streamUrgency is quic-go's default urgency, kept for every stream:
	// only the incremental flag changes.
	streamUrgency = 3
)

// sendTurns is the turn of one peer connection: a channel with room for
// one token, sent by the holder.
type sendTurns chan struct{}

func newSendTurns() sendTurns { return make(sendTurns, 1) }

// streamWriter writes to a tunnel stream, bulk writes taking turns. It is
// used by one goroutine at a time (a relay's connection-to-stream side).
type streamWriter struct {
	str   *quic.Stream
	turns sendTurns // nil: every write round robin
	now   func() time.Time
	// outcome counts bulk writes by how they went (turnRun, turnOverran).
	outcome map[string]prometheus.Counter
	hold    time.Duration // how long a piece of a run may take; 0: turnHold

	sent     int64         // bytes written to the stream
	run      bool          // the stream is non-incremental now
	held     bool          // the turn is held
	cooldown time.Duration // after the last overrun; 0 after a run on time
	coolEnd  time.Time     // no turn before
}

// Outcomes of a bulk write, as counted.
const (
	turnRun     = "run"
	turnOverran = "overran"
)

func (w *streamWriter) Write(p []byte) (int, error) {
	if len(p) < bulkWrite {
		return w.roundRobin(p)
	}
	if !w.held {
		if !w.take() {
			return w.roundRobin(p) // not a bulk stream (yet), or the write side ended
		}
		defer w.give()
	}
	if !w.run {
		w.str.SetPriority(streamUrgency, false)
		w.run = true
	}
	hold := w.hold
	if hold == 0 {
		hold = turnHold
	}
	// The run goes in pieces of at most runPiece, each within hold: a
	// stream that stops keeping up (a reader slower than the path) is
	// found within hold however long the run, and gives the turn back.
	var n int
	for n < len(p) {
		w.str.SetWriteDeadline(time.Now().Add(hold)) // quic-go reads deadlines by the real (monotonic) clock, not w.now
		k, err := w.str.Write(p[n:min(len(p), n+runPiece)])
		n += k
		w.sent += int64(k)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			w.str.SetWriteDeadline(time.Time{})
			w.outcome[turnOverran].Inc()
			w.give()
			w.cooldown = min(max(2*w.cooldown, minCooldown), maxCooldown)
			w.coolEnd = w.now().Add(w.cooldown)
			m, err := w.roundRobin(p[n:])
			return n + m, err
		}
		if err != nil {
			w.str.SetWriteDeadline(time.Time{})
			return n, err
		}
	}
	w.str.SetWriteDeadline(time.Time{})
	w.outcome[turnRun].Inc()
	w.cooldown = 0
	return n, nil
}

// take waits for the turn if the stream may take it, and reports whether
// it holds the turn: false without turns, before the stream carried
// bulkAfter bytes, while it cools down after an overrun, or once its write
// side ended. A writer that took the turn gives it back (give) after its
// write.
func (w *streamWriter) take() bool {
	if w.held {
		return true
	}
	if w.turns == nil || w.sent < bulkAfter || (w.cooldown > 0 && w.now().Before(w.coolEnd)) {
		return false
	}
	select {
	case w.turns <- struct{}{}:
		w.held = true
	case <-w.str.Context().Done():
	}
	return w.held
}

// give hands back the turn, if held.
func (w *streamWriter) give() {
	if w.held {
		<-w.turns
		w.held = false
	}
}

// roundRobin writes p round robin, making the stream incremental again
// after a run.
func (w *streamWriter) roundRobin(p []byte) (int, error) {
	if w.run {
		w.str.SetPriority(streamUrgency, true)
		w.run = false
	}
	n, err := w.str.Write(p)
	w.sent += int64(n)
	return n, err
}
