// Package wire frames the protobuf messages clusters exchange on a stream
// (the join exchange and the control stream): a 4-byte big-endian length,
// then the message. A receiver refuses a length over its limit before
// reading the body.
package wire

import (
	"encoding/binary"
	"fmt"
	"io"

	"google.golang.org/protobuf/proto"
)

// MaxMessage is the default bound on one message.
const MaxMessage = 1 << 20

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
		return fmt.Errorf("wire: message of %d bytes, more than %d", size, max)
	}
	b := make([]byte, size)
	if _, err := io.ReadFull(r, b); err != nil {
		return fmt.Errorf("wire: read: %w", err)
	}
	if err := proto.Unmarshal(b, m); err != nil {
		return fmt.Errorf("wire: malformed message: %w", err)
	}
	return nil
}
