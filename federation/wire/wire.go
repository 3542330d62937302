// Package wire frames the protobuf messages clusters exchange on a stream
// (the join exchange and the control stream): a 4-byte big-endian length,
// then the message. A receiver refuses a length over its limit before
// reading the body.
package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"google.golang.org/protobuf/proto"
)

// MaxMessage is the default bound on one message.
const MaxMessage = 1 << 20

// ErrMalformed is wrapped by Read's error when what arrived is not a
// message within the limit (a length over it, a body that does not
// decode), as opposed to a stream that ended or failed.
var ErrMalformed = errors.New("wire: malformed message")

// initialBuffer is what a frame's buffer starts at before its bytes arrive.
const initialBuffer = 64 << 10

// Write writes m as one frame, in one Write call.
func Write(w io.Writer, m proto.Message, max int) error {
	b, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	if len(b) > max {
		return fmt.Errorf("wire: message of %d bytes, more than %d", len(b), max)
	}
	out := make([]byte, 4+len(b))
	binary.BigEndian.PutUint32(out, uint32(len(b)))
	copy(out[4:], b)
	_, err = w.Write(out)
	return err
}

// Read reads one frame of at most max bytes into m.
func Read(r io.Reader, m proto.Message, max int) error {
	var n [4]byte
	if _, err := io.ReadFull(r, n[:]); err != nil {
		return fmt.Errorf("wire: read: %w", err)
	}
	size := binary.BigEndian.Uint32(n[:])
	if uint64(size) > uint64(max) {
		return fmt.Errorf("%w: %d bytes, more than %d", ErrMalformed, size, max)
	}
	// The buffer grows with what arrives, not with what the length
	// claims: a peer that sends only a length holds no more than that.
	var buf bytes.Buffer
	buf.Grow(int(min(size, initialBuffer)))
	if _, err := buf.ReadFrom(io.LimitReader(r, int64(size))); err != nil {
		return fmt.Errorf("wire: read: %w", err)
	}
	if buf.Len() < int(size) {
		return fmt.Errorf("wire: read: %w", io.ErrUnexpectedEOF)
	}
	if err := proto.Unmarshal(buf.Bytes(), m); err != nil {
		return fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	return nil
}
