package gateway

import (
	"errors"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"
)

// Bulk writes on a peer connection take turns.
//
// quic-go sends the streams of a connection round robin, a packet each
// (incremental, in RFC 9218's terms). When many tunnelled streams move
// bulk data at once, the receiving gateway then finds a little of every
// stream each time it reads the connection, and hands it on to the
// endpoints in small writes: with 16 streams 10 KiB on average, against
// 100 KiB with one, and the receiving gateway and the endpoints behind it
// spent about a third more CPU per byte (make bench, federation).
//
// So a write of bulkWrite bytes or more to a tunnel stream waits for one
// of its connection's bulkTurns turns (taking with it what its source
// received meanwhile, see pump) and goes out as one run: while it
// holds the turn the stream is non-incremental, which quic-go sends
// without interleaving other non-incremental streams. Turns are handed out
// first come, first served (a channel's waiting senders are queued in
// order), so every bulk stream gets its share, one write at a time, and
// none can keep the connection to itself. Smaller writes (requests,
// replies, the tail of a transfer) take no turn and stay round robin;
// quic-go alternates them with the runs packet by packet, so they do not
// wait behind a run either. A write that holds its turn longer than
// turnHold (the peer stopped reading the stream, a slow path) gives it
// back and finishes round robin: a stalled stream cannot hold up the
// others.
const (
	bulkWrite = 8 << 10
	bulkTurns = 2
	turnHold  = 10 * time.Millisecond
	// streamUrgency is quic-go's default urgency, kept for every stream:
	// only the incremental flag changes.
	streamUrgency = 3
)

// sendTurns are the turns of one peer connection.
type sendTurns chan struct{}

func newSendTurns() sendTurns { return make(sendTurns, bulkTurns) }

// streamWriter writes to a tunnel stream, bulk writes taking turns. It is
// used by one goroutine at a time (a relay's connection-to-stream side).
type streamWriter struct {
	str   *quic.Stream
	turns sendTurns // nil: every write round robin
	// outcome counts bulk writes by how they went (turnRun, turnOverran).
	outcome map[string]prometheus.Counter
	run     bool // the stream is non-incremental now
	held    bool // a turn is held
}

// Outcomes of a bulk write, as counted.
const (
	turnRun     = "run"
	turnOverran = "overran"
)

func (w *streamWriter) Write(p []byte) (int, error) {
	if len(p) < bulkWrite {
		w.roundRobin()
		return w.str.Write(p)
	}
	if !w.held {
		if !w.take() {
			w.roundRobin()
			return w.str.Write(p) // no turns, or the write side ended: Write says how
		}
		defer w.give()
	}
	if !w.run {
		w.str.SetPriority(streamUrgency, false)
		w.run = true
	}
	// quic-go measures stream deadlines by the wall clock.
	w.str.SetWriteDeadline(time.Now().Add(turnHold))
	n, err := w.str.Write(p)
	w.str.SetWriteDeadline(time.Time{})
	if errors.Is(err, os.ErrDeadlineExceeded) {
		w.outcome[turnOverran].Inc()
		w.give()
		w.roundRobin()
		m, err := w.str.Write(p[n:])
		return n + m, err
	}
	if err == nil {
		w.outcome[turnRun].Inc()
	}
	return n, err
}

// take waits for a turn, and reports whether it holds one: false without
// turns or once the stream's write side ended. A writer that took a turn
// gives it back (give) after its write.
func (w *streamWriter) take() bool {
	if w.turns == nil || w.held {
		return w.held
	}
	select {
	case w.turns <- struct{}{}:
		w.held = true
	case <-w.str.Context().Done():
	}
	return w.held
}

// give hands back the turn held, if any.
func (w *streamWriter) give() {
	if w.held {
		<-w.turns
		w.held = false
	}
}

// roundRobin makes the stream incremental again after a run.
func (w *streamWriter) roundRobin() {
	if w.run {
		w.str.SetPriority(streamUrgency, true)
		w.run = false
	}
}
