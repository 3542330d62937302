package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

func hello(cluster string) *federationv1.ControlMessage {
	return &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_Hello{Hello: &federationv1.Hello{Cluster: cluster}}}
}

func frame(size uint32, body []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, size)
	return append(b, body...)
}

func TestRoundTripAndRefusals(t *testing.T) {
	var buf bytes.Buffer
	if err := Write(&buf, hello("west"), MaxMessage); err != nil {
		t.Fatal(err)
	}
	whole := slicesClone(buf.Bytes())
	var got federationv1.ControlMessage
	if err := Read(&buf, &got, MaxMessage); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(&got, hello("west")) {
		t.Fatalf("read %v, wrote %v", &got, hello("west"))
	}

	if err := Write(io.Discard, hello(strings.Repeat("w", 100)), 50); err == nil {
		t.Error("Write of a message over the limit succeeded")
	}
	for _, c := range []struct {
		name, in, want string
		max            int
	}{
		{"empty", "", "EOF", MaxMessage},
		{"short length", "\x00\x00", "unexpected EOF", MaxMessage},
		{"over the limit", string(frame(MaxMessage+1, nil)), "more than", MaxMessage},
		{"truncated body", string(whole[:len(whole)-1]), "unexpected EOF", MaxMessage},
		{"limit of the reader", string(whole), "more than", len(whole) - 5},
		{"malformed body", string(frame(2, []byte{0x0a, 0x05})), "malformed message", MaxMessage},
	} {
		err := Read(strings.NewReader(c.in), &got, c.max)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: Read = %v, want an error with %q", c.name, err, c.want)
		}
	}
}

// TestReadHoldsWhatArrives: a length that claims the most a reader takes,
// followed by a few bytes and the end, costs what arrived, not the claim.
func TestReadHoldsWhatArrives(t *testing.T) {
	const max = 4 << 20
	in := frame(max, []byte("only this"))
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range 8 {
		var m federationv1.ControlMessage
		if err := Read(bytes.NewReader(in), &m, max); !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("Read = %v, want unexpected EOF", err)
		}
	}
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 8*4*initialBuffer {
		t.Errorf("8 reads of a frame claiming %d bytes with 9 sent allocated %d bytes", max, grew)
	}
}

func slicesClone(b []byte) []byte { return append([]byte(nil), b...) }

// FuzzRead: any input is read as one frame or refused, without a panic,
// and a frame read back re-encodes to a frame that reads the same.
func FuzzRead(f *testing.F) {
	var buf bytes.Buffer
	if err := Write(&buf, hello("west"), MaxMessage); err != nil {
		f.Fatal(err)
	}
	f.Add(buf.Bytes())
	f.Add(frame(0, nil))
	f.Add(frame(MaxMessage+1, nil))
	f.Add(frame(2, []byte{0x0a, 0x05}))
	f.Add([]byte{0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		var m federationv1.ControlMessage
		if err := Read(bytes.NewReader(in), &m, 1<<16); err != nil {
			return
		}
		var out bytes.Buffer
		if err := Write(&out, &m, 1<<16); err != nil {
			t.Fatalf("a message read back does not write: %v", err)
		}
		var again federationv1.ControlMessage
		if err := Read(&out, &again, 1<<16); err != nil || !proto.Equal(&m, &again) {
			t.Fatalf("re-read %v (%v), first read %v", &again, err, &m)
		}
	})
}
