//go:build !linux

package udpgro

import "net"

// Listen opens a plain UDP socket: GRO is read only on Linux.
func Listen(network, address string) (net.PacketConn, error) {
	return net.ListenPacket(network, address)
}

// On reports whether pc reads with GRO: never here.
func On(net.PacketConn) bool { return false }
