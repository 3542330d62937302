package workloadapi

import (
	"context"
	"errors"
	"net"

	"google.golang.org/grpc/credentials"
)

// peerCredentials is a server-only grpc TransportCredentials that adds no
// security to the connection but records the connecting process's kernel
// credentials (SO_PEERCRED) as its AuthInfo. A failure to read them does not
// fail the handshake: it is recorded, and the call is refused with
// PermissionDenied by Server.authorize, which says why.
type peerCredentials struct{}

// peerAuthInfo is the caller's uid, gid and pid, or why they are unknown.
type peerAuthInfo struct {
	credentials.CommonAuthInfo
	UID, GID, PID int
	err           error
}

func (peerAuthInfo) AuthType() string { return "unix-peercred" }

func (peerCredentials) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("workloadapi: peer credentials are server-side only")
}

func (peerCredentials) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	info := peerAuthInfo{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}
	if conn.LocalAddr().Network() != "unix" {
		info.err = errors.New("not a Unix socket connection")
		return conn, info, nil
	}
	info.UID, info.GID, info.PID, info.err = readPeerCred(conn)
	return conn, info, nil
}

func (peerCredentials) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "unix-peercred"}
}

func (p peerCredentials) Clone() credentials.TransportCredentials { return p }

func (peerCredentials) OverrideServerName(string) error { return nil }
