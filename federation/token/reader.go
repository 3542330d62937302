package token

import "encoding/binary"

// reader reads the fields of a payload. Reading past the end sets short and
// yields zero values, so a walk can run to its end and be judged once.
// bytes is only called with the fixed sizes of the format (at most 32).
type reader struct {
	b     []byte
	off   int
	short bool
}

var zeros [32]byte

func (r *reader) bytes(n int) []byte {
	if r.short || len(r.b)-r.off < n {
		r.short = true
		return zeros[:n]
	}
	v := r.b[r.off : r.off+n]
	r.off += n
	return v
}

func (r *reader) byte() byte     { return r.bytes(1)[0] }
func (r *reader) uint16() uint16 { return binary.BigEndian.Uint16(r.bytes(2)) }
func (r *reader) uint64() uint64 { return binary.BigEndian.Uint64(r.bytes(8)) }

// str8 reads a string prefixed by its one-byte length.
func (r *reader) str8() string {
	n := int(r.byte())
	if r.short || len(r.b)-r.off < n {
		r.short = true
		return ""
	}
	v := string(r.b[r.off : r.off+n])
	r.off += n
	return v
}
