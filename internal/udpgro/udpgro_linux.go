//go:build linux

package udpgro

import (
	"encoding/binary"
	"net"
	"sync/atomic"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

const (
	// trains is how many trains one system call may read.
	trains = 8
	// trainBytes holds the largest train the kernel coalesces (a UDP
	// datagram's 64 KiB).
	trainBytes = 1 << 16
	// oobBytes holds a train's control messages: its segment size, its
	// ECN bits and, on a socket bound to a wildcard address, its packet
	// info (IPv6's is the largest, 36 bytes with the header).
	oobBytes = 128
)

// Listen opens a UDP socket on address, reading with GRO where the kernel
// supports it (Linux 5.0 and later), else a plain one. Either is ready for
// quic.Transport.Conn.
func Listen(network, address string) (net.PacketConn, error) {
	pc, err := net.ListenPacket(network, address)
	if err != nil {
		return nil, err
	}
	uc, ok := pc.(*net.UDPConn)
	if !ok {
		return pc, nil
	}
	c, err := New(uc)
	if err != nil {
		return pc, nil // no GRO here: read datagram by datagram
	}
	return c, nil
}

// On reports whether pc reads with GRO (is a Conn).
func On(pc net.PacketConn) bool {
	_, ok := pc.(*Conn)
	return ok
}

// Conn is a UDP socket with GRO on, for quic-go: ReadBatch returns one
// packet per message, however the kernel coalesced them. It has a single
// reader (quic-go's transport reads from one goroutine); its other methods
// are the socket's own. Only ReadBatch reads trains apart: read it no
// other way.
type Conn struct {
	*net.UDPConn
	batch *ipv4.PacketConn

	msgs []ipv4.Message // the last batch of trains read
	next int            // the train in msgs being handed out
	rest []byte         // what is left of it
	seg  int            // its segment size; 0: a single datagram
	oob  []byte         // its control messages, the segment size taken out

	// For tests: trains read, and the packets in them.
	trainsRead, packetsRead atomic.Int64
}

// New turns GRO on for c and returns it wrapped for quic-go, or an error
// if the kernel does not offer GRO.
func New(c *net.UDPConn) (*Conn, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_UDP, unix.UDP_GRO, 1)
	}); err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, serr
	}
	g := &Conn{UDPConn: c, batch: ipv4.NewPacketConn(c), msgs: make([]ipv4.Message, trains), oob: make([]byte, 0, oobBytes)}
	for i := range g.msgs {
		g.msgs[i].Buffers = [][]byte{make([]byte, trainBytes)}
		g.msgs[i].OOB = make([]byte, oobBytes)
	}
	g.next = trains
	return g, nil
}

// ReadBatch reads packets into ms, one per message, as quic-go asks: it
// blocks until there is at least one, and returns as many as it holds
// already read, up to len(ms). A packet larger than its message's buffer
// is cut, and flagged with MSG_TRUNC, as the kernel would.
func (g *Conn) ReadBatch(ms []ipv4.Message, flags int) (int, error) {
	if len(ms) == 0 {
		return 0, nil
	}
	for len(g.rest) == 0 {
		if g.next >= len(g.msgs) {
			g.msgs = g.msgs[:trains]
			n, err := g.batch.ReadBatch(g.msgs, flags)
			if err != nil {
				return 0, err
			}
			g.msgs, g.next = g.msgs[:n], 0
			continue
		}
		m := &g.msgs[g.next]
		g.next++
		g.rest = m.Buffers[0][:m.N]
		g.seg, g.oob = splitOOB(m.OOB[:m.NN], g.oob[:0])
		g.trainsRead.Add(1)
	}
	n := 0
	addr := g.msgs[g.next-1].Addr
	for n < len(ms) && len(g.rest) > 0 {
		size := len(g.rest)
		if g.seg > 0 && g.seg < size {
			size = g.seg
		}
		m := &ms[n]
		m.N = copy(m.Buffers[0], g.rest[:size])
		m.Flags = 0
		if m.N < size {
			m.Flags = unix.MSG_TRUNC
		}
		m.NN = 0
		if len(g.oob) <= len(m.OOB) {
			m.NN = copy(m.OOB, g.oob)
		}
		m.Addr = addr
		g.rest = g.rest[size:]
		n++
	}
	g.packetsRead.Add(int64(n))
	return n, nil
}

// splitOOB returns the segment size a train's control messages carry (0:
// none, a single datagram), and appends the others, whole, to keep.
func splitOOB(oob, keep []byte) (int, []byte) {
	seg := 0
	for len(oob) > 0 {
		h, body, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			break // the kernel's own; a truncated tail is dropped
		}
		whole := oob[:len(oob)-len(rest)]
		oob = rest
		if h.Level == unix.SOL_UDP && h.Type == unix.UDP_GRO {
			switch len(body) {
			case 2:
				seg = int(binary.NativeEndian.Uint16(body))
			case 4:
				seg = int(binary.NativeEndian.Uint32(body))
			}
			continue
		}
		keep = append(keep, whole...)
	}
	return seg, keep
}
