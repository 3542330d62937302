//go:build !linux

package workloadapi

import (
	"fmt"
	"net"
	"runtime"
)

// readPeerCred refuses: peer credentials are read on Linux only, and an
// unattested caller must not get the workload's private key.
func readPeerCred(net.Conn) (uid, gid, pid int, err error) {
	return 0, 0, 0, fmt.Errorf("peer credentials are not supported on %s", runtime.GOOS)
}
