//go:build linux

package udpgro

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"io"
	"math/big"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// cmsg encodes one control message as the kernel lays it out.
func cmsg(level, typ int, data []byte) []byte {
	b := make([]byte, unix.CmsgSpace(len(data)))
	h := unix.CmsgLen(len(data))
	if unix.SizeofCmsghdr == 16 {
		binary.NativeEndian.PutUint64(b, uint64(h))
		binary.NativeEndian.PutUint32(b[8:], uint32(level))
		binary.NativeEndian.PutUint32(b[12:], uint32(typ))
	} else {
		binary.NativeEndian.PutUint32(b, uint32(h))
		binary.NativeEndian.PutUint32(b[4:], uint32(level))
		binary.NativeEndian.PutUint32(b[8:], uint32(typ))
	}
	copy(b[unix.CmsgLen(0):], data)
	return b
}

func listen(t *testing.T) *Conn {
	t.Helper()
	pc, err := Listen("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	c, ok := pc.(*Conn)
	if !ok {
		t.Skip("this kernel offers no UDP GRO")
	}
	return c
}

// A train sent with GSO is read as one, and handed out a packet per
// message, the last one shorter; a packet too large for its message is cut
// and flagged.
func TestReadBatchSplitsATrain(t *testing.T) {
	c := listen(t)
	out, err := net.DialUDP("udp", nil, c.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	payload := make([]byte, 2500)
	for i := range payload {
		payload[i] = byte(i / 1000)
	}
	var seg [2]byte
	binary.NativeEndian.PutUint16(seg[:], 1000)
	if _, _, err := out.WriteMsgUDP(payload, cmsg(unix.SOL_UDP, unix.UDP_SEGMENT, seg[:]), nil); err != nil {
		t.Skipf("this kernel does not send with GSO: %v", err)
	}
	ms := make([]ipv4.Message, 8)
	for i := range ms {
		size := 1452
		if i == 1 {
			size = 600 // too small for the second packet
		}
		ms[i].Buffers = [][]byte{make([]byte, size)}
		ms[i].OOB = make([]byte, oobBytes)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.ReadBatch(ms, 0)
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 {
		t.Fatalf("read %d packets, want 3", n)
	}
	for i, want := range []struct{ n, flags int }{{1000, 0}, {600, unix.MSG_TRUNC}, {500, 0}} {
		m := ms[i]
		if m.N != want.n || m.Flags != want.flags {
			t.Errorf("packet %d: %d bytes, flags %#x; want %d, %#x", i, m.N, m.Flags, want.n, want.flags)
		}
		if !bytes.Equal(m.Buffers[0][:m.N], bytes.Repeat([]byte{byte(i)}, m.N)) {
			t.Errorf("packet %d holds other bytes", i)
		}
		if m.Addr.String() != out.LocalAddr().String() {
			t.Errorf("packet %d from %v, want %v", i, m.Addr, out.LocalAddr())
		}
		if seg, _ := splitOOB(m.OOB[:m.NN], nil); seg != 0 {
			t.Errorf("packet %d still carries the segment size", i)
		}
	}
	if got := c.trainsRead.Load(); got != 1 {
		t.Errorf("%d trains read, want 1", got)
	}
}

// Every other way to read the socket hands out packets too, never a whole
// train; and one ReadBatch hands out the packets of every train read.
func TestOtherReadsSplitTrainsToo(t *testing.T) {
	c := listen(t)
	out, err := net.DialUDP("udp", nil, c.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	var seg [2]byte
	binary.NativeEndian.PutUint16(seg[:], 1000)
	if _, _, err := out.WriteMsgUDP(make([]byte, 2500), cmsg(unix.SOL_UDP, unix.UDP_SEGMENT, seg[:]), nil); err != nil {
		t.Skipf("this kernel does not send with GSO: %v", err)
	}
	out.Write([]byte("single"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 1500)
	var sizes []int
	n, err := c.Read(b)
	sizes = append(sizes, n)
	n, _, err2 := c.ReadFrom(b)
	sizes = append(sizes, n)
	n, _, _, _, err3 := c.ReadMsgUDP(b, make([]byte, 64))
	sizes = append(sizes, n)
	n, _, err4 := c.ReadFromUDPAddrPort(b)
	sizes = append(sizes, n)
	if err := errors.Join(err, err2, err3, err4); err != nil {
		t.Fatal(err)
	}
	if want := []int{1000, 1000, 500, 6}; !slices.Equal(sizes, want) {
		t.Errorf("read %v, want %v", sizes, want)
	}

	// Two trains queued: one ReadBatch returns the packets of both.
	out.Write([]byte("one"))
	out.Write([]byte("two"))
	time.Sleep(50 * time.Millisecond) // both queued before the read
	ms := make([]ipv4.Message, 8)
	for i := range ms {
		ms[i].Buffers = [][]byte{make([]byte, 1452)}
		ms[i].OOB = make([]byte, 128)
	}
	if n, err := c.ReadBatch(ms, 0); err != nil || n != 2 {
		t.Fatalf("ReadBatch: %d packets, %v; want 2", n, err)
	}
}

// The segment size is taken out of a train's control messages; the others
// are kept whole and in order.
func TestSplitOOB(t *testing.T) {
	var seg [2]byte
	binary.NativeEndian.PutUint16(seg[:], 1452)
	tos := cmsg(unix.IPPROTO_IP, unix.IP_TOS, []byte{2})
	info := cmsg(unix.IPPROTO_IP, unix.IP_PKTINFO, make([]byte, 12))
	in := append(append(append([]byte{}, tos...), cmsg(unix.SOL_UDP, unix.UDP_GRO, seg[:])...), info...)
	got, keep := splitOOB(in, nil)
	if got != 1452 {
		t.Errorf("segment size %d, want 1452", got)
	}
	if want := append(append([]byte{}, tos...), info...); !bytes.Equal(keep, want) {
		t.Errorf("kept %x, want %x", keep, want)
	}
	if got, keep := splitOOB(tos[:5], nil); got != 0 || len(keep) != 0 {
		t.Errorf("a truncated message: segment %d, kept %x; want neither", got, keep)
	}
}

// quic-go reads through Conn's ReadBatch (it would read the socket itself,
// trains and all, if it stopped looking for one: this fails then), and a
// transfer from a peer sending with GSO arrives whole, in trains.
func TestQUICReadsThroughReadBatch(t *testing.T) {
	// On a wildcard socket quic-go also asks for each packet's destination
	// (packet info), which must come through beside the ECN bits.
	for _, tc := range []struct{ listen, client string }{{"127.0.0.1:0", "127.0.0.1"}, {"[::]:0", "::1"}} {
		t.Run(tc.listen, func(t *testing.T) { testQUICReadsThroughReadBatch(t, tc.listen, tc.client) })
	}
}

func testQUICReadsThroughReadBatch(t *testing.T, listenAddr, clientIP string) {
	pc, err := Listen("udp", listenAddr)
	if err != nil {
		t.Skipf("listen on %s: %v", listenAddr, err)
	}
	t.Cleanup(func() { pc.Close() })
	c, ok := pc.(*Conn)
	if !ok {
		t.Skip("this kernel offers no UDP GRO")
	}
	cert := selfSigned(t)
	tr := &quic.Transport{Conn: c}
	defer tr.Close()
	ln, err := tr.Listen(&tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"t"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	const size = 8 << 20
	got := make(chan []byte, 1)
	go func() {
		conn, err := ln.Accept(context.Background())
		if err != nil {
			got <- nil
			return
		}
		s, err := conn.AcceptStream(context.Background())
		if err != nil {
			got <- nil
			return
		}
		b, _ := io.ReadAll(s)
		s.Write([]byte{1})
		s.Close()
		got <- b
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(clientIP)})
	if err != nil {
		t.Skipf("no %s here: %v", clientIP, err)
	}
	ctr := &quic.Transport{Conn: udp}
	defer ctr.Close()
	server := &net.UDPAddr{IP: net.ParseIP(clientIP), Port: c.LocalAddr().(*net.UDPAddr).Port}
	conn, err := ctr.Dial(ctx, server, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"t"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseWithError(0, "")
	s, err := conn.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	rand.Read(want)
	if _, err := s.Write(want); err != nil {
		t.Fatal(err)
	}
	s.Close()
	io.ReadAll(s)
	select {
	case b := <-got:
		if !bytes.Equal(b, want) {
			t.Fatalf("received %d bytes, not the %d sent", len(b), len(want))
		}
	case <-ctx.Done():
		t.Fatal("transfer did not finish")
	}
	trains, packets := c.trainsRead.Load(), c.packetsRead.Load()
	t.Logf("%d packets in %d trains", packets, trains)
	if trains == 0 {
		t.Fatal("quic-go did not read through Conn.ReadBatch")
	}
	if packets < 2*trains {
		t.Errorf("%d packets in %d trains: the sender's GSO trains were not read whole", packets, trains)
	}
}

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), DNSNames: []string{"localhost"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
