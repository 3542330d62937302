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
	// Control, not Read: it neither takes the read lock nor minds a
	// deadline a past request left on the connection (MSG_DONTWAIT keeps
	// it from waiting).
	err = rc.Control(func(fd uintptr) {
		for {
			_, _, perr = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			if perr != syscall.EINTR {
				return
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
