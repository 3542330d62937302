//go:build linux

package udpgro

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
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
	// info; twice what quic-go gives a packet's, so that the segment size
	// never pushes the others out.
	oobBytes = 256
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

// Conn is a UDP socket with GRO on, for quic-go: ReadBatch, and every
// other read method, returns one packet per message however the kernel
// coalesced them. Its write and other methods are the socket's own.
type Conn struct {
	*net.UDPConn
	batch *ipv4.PacketConn

	mu   sync.Mutex     // the reads below
	msgs []ipv4.Message // the last batch of trains read
	next int            // the next train in msgs to hand out
	rest []byte         // what is left of the train being handed out
	seg  int            // its segment size; 0: a single datagram
	oob  []byte         // its control messages, the segment size taken out
	addr net.Addr       // its source

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
	g.msgs = g.msgs[:0]
	return g, nil
}

// ReadBatch reads packets into ms, one per message, as quic-go asks: it
// blocks until there is at least one, and returns as many as it holds
// already read, up to len(ms). A packet larger than its message's buffer
// is cut, and flagged with MSG_TRUNC, as the kernel would; control
// messages that do not fit whole in a message's OOB are left out.
func (g *Conn) ReadBatch(ms []ipv4.Message, flags int) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for n < len(ms) {
		if len(g.rest) == 0 {
			if g.next < len(g.msgs) {
				m := &g.msgs[g.next]
				g.next++
				g.rest, g.addr = m.Buffers[0][:m.N], m.Addr
				g.seg, g.oob = splitOOB(m.OOB[:m.NN], g.oob[:0])
				g.trainsRead.Add(1)
				continue // an empty datagram has no packet to hand out
			}
			if n > 0 {
				break // hand out what there is; read the socket next time
			}
			g.msgs = g.msgs[:trains]
			k, err := g.batch.ReadBatch(g.msgs, flags)
			if err != nil {
				g.msgs = g.msgs[:0]
				return 0, err
			}
			g.msgs, g.next = g.msgs[:k], 0
			continue
		}
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
		m.NN = copy(m.OOB, whole(g.oob, len(m.OOB)))
		m.Addr = g.addr
		g.rest = g.rest[size:]
		n++
	}
	g.packetsRead.Add(int64(n))
	return n, nil
}

// ReadMsgUDP reads one packet, as ReadBatch does.
func (g *Conn) ReadMsgUDP(b, oob []byte) (n, oobn, flags int, addr *net.UDPAddr, err error) {
	one := []ipv4.Message{{Buffers: [][]byte{b}, OOB: oob}}
	if _, err := g.ReadBatch(one, 0); err != nil {
		return 0, 0, 0, nil, err
	}
	m := one[0]
	addr, _ = m.Addr.(*net.UDPAddr)
	return m.N, m.NN, m.Flags, addr, nil
}

// ReadMsgUDPAddrPort reads one packet, as ReadBatch does.
func (g *Conn) ReadMsgUDPAddrPort(b, oob []byte) (n, oobn, flags int, addr netip.AddrPort, err error) {
	n, oobn, flags, ua, err := g.ReadMsgUDP(b, oob)
	if ua != nil {
		addr = ua.AddrPort()
	}
	return n, oobn, flags, addr, err
}

// ReadFromUDP reads one packet, as ReadBatch does.
func (g *Conn) ReadFromUDP(b []byte) (int, *net.UDPAddr, error) {
	n, _, _, addr, err := g.ReadMsgUDP(b, nil)
	return n, addr, err
}

// ReadFromUDPAddrPort reads one packet, as ReadBatch does.
func (g *Conn) ReadFromUDPAddrPort(b []byte) (int, netip.AddrPort, error) {
	n, _, _, addr, err := g.ReadMsgUDPAddrPort(b, nil)
	return n, addr, err
}

// ReadFrom reads one packet, as ReadBatch does.
func (g *Conn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, addr, err := g.ReadFromUDP(b)
	if addr == nil {
		return n, nil, err
	}
	return n, addr, err
}

// Read reads one packet, as ReadBatch does.
func (g *Conn) Read(b []byte) (int, error) {
	n, _, err := g.ReadFromUDP(b)
	return n, err
}

// whole returns the control messages of oob that fit in max bytes, whole.
func whole(oob []byte, max int) []byte {
	end := 0
	for rest := oob; len(rest) > 0; {
		_, _, next, err := unix.ParseOneSocketControlMessage(rest)
		if err != nil {
			break
		}
		size := len(rest) - len(next)
		if end+size > max {
			break
		}
		end += size
		rest = next
	}
	return oob[:end]
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
