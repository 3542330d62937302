//go:build unix

package proxy

import (
	"errors"
	"net"
	"syscall"
)

// peekIdle looks at the socket under an idle connection without waiting:
// alive is false if the peer closed it or sent anything (for TLS, a
// record of any kind: nothing is due on an idle connection). ok is false
// if the connection has no socket to look at.
func peekIdle(c net.Conn) (alive, ok bool) {
	sc, isSock := socketUnder(c).(syscall.Conn)
	if !isSock {
		return false, false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false, false
	}
	var (
		b    [1]byte
		perr error
	)
	err = rc.Read(func(fd uintptr) bool {
		for {
			_, _, perr = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			if perr != syscall.EINTR {
				return true
			}
		}
	})
	if err != nil {
		return false, true
	}
	// Nothing to read yet: open and quiet. Otherwise a byte, the end or
	// an error such as a reset.
	return errors.Is(perr, syscall.EAGAIN) || errors.Is(perr, syscall.EWOULDBLOCK), true
}
