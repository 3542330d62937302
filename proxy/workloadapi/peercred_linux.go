//go:build linux

package workloadapi

import (
	"errors"
	"fmt"
	"net"
	"syscall"
)

// readPeerCred reads SO_PEERCRED from a Unix socket connection.
func readPeerCred(conn net.Conn) (uid, gid, pid int, err error) {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return 0, 0, 0, errors.New("connection exposes no file descriptor")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return 0, 0, 0, fmt.Errorf("read peer credentials: %w", err)
	}
	var cred *syscall.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return 0, 0, 0, fmt.Errorf("read peer credentials: %w", err)
	}
	if credErr != nil {
		return 0, 0, 0, fmt.Errorf("read peer credentials: %w", credErr)
	}
	return int(cred.Uid), int(cred.Gid), int(cred.Pid), nil
}
