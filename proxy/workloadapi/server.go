package workloadapi

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// SecurityHeader is the gRPC metadata key every Workload API call must carry
// with the value "true" (SPIFFE Workload API §5.2).
const SecurityHeader = "workload.spiffe.io"

// maxSocketPath is the longest path a Unix socket address holds on Linux
// (sun_path is 108 bytes including the terminating NUL).
const maxSocketPath = 107

// Config configures a Server. Zero values mean what each field says.
type Config struct {
	// Source provides the SVID and bundles served. Required.
	Source Source
	// Logger receives the server's logs. Nil discards them.
	Logger *slog.Logger
	// Path is the Unix socket Run listens on. Required by Run; Serve ignores
	// it. Its parent directory is created (0755) if missing; a socket left
	// at Path by an earlier run is replaced; any other file there is an
	// error.
	Path string
	// AllowedUIDs are the uids whose processes may call the API, checked
	// with SO_PEERCRED. Nil or empty allows only the sidecar's own uid and
	// root; otherwise exactly these uids (root is not added).
	AllowedUIDs []int
	// ShutdownTimeout bounds the graceful stop once the context is done,
	// after which connections are closed hard. Zero means 5s.
	ShutdownTimeout time.Duration
}

// Server serves the SPIFFE Workload API. Create it with New.
type Server struct {
	src     Source
	log     *slog.Logger
	path    string
	allowed []int
	grace   time.Duration
}

// New validates cfg and returns a Server. It does no I/O.
func New(cfg Config) (*Server, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &Server{
		src:     cfg.Source,
		log:     cfg.Logger,
		path:    cfg.Path,
		allowed: slices.Clone(cfg.AllowedUIDs),
		grace:   cfg.ShutdownTimeout,
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if len(s.allowed) == 0 {
		s.allowed = []int{os.Getuid(), 0}
	}
	if s.grace == 0 {
		s.grace = 5 * time.Second
	}
	return s, nil
}

func (c *Config) validate() error {
	if c.Source == nil {
		return errors.New("workloadapi: config: Source is required")
	}
	if len(c.Path) > maxSocketPath || len(tempSocketPath(c.Path)) > maxSocketPath {
		return fmt.Errorf("workloadapi: config: socket path %q is too long (at most %d bytes, with a short temporary name in its directory)", c.Path, maxSocketPath)
	}
	for _, uid := range c.AllowedUIDs {
		if uid < 0 {
			return fmt.Errorf("workloadapi: config: invalid uid %d in AllowedUIDs", uid)
		}
	}
	if c.ShutdownTimeout < 0 {
		return fmt.Errorf("workloadapi: config: negative ShutdownTimeout %s", c.ShutdownTimeout)
	}
	return nil
}

// Run listens on the socket at Config.Path and serves until ctx is done,
// then stops gracefully within the shutdown timeout, closes what is left,
// and removes the socket. It returns nil after a shutdown caused by ctx.
//
// The socket is created with mode 0600 whatever the umask: it is bound under
// a temporary name, chmod-ed, then renamed over Path (which also replaces a
// stale socket atomically). Peer attestation applies to every connection,
// including any made to the temporary name.
func (s *Server) Run(ctx context.Context) error {
	if s.path == "" {
		return errors.New("workloadapi: no socket path configured")
	}
	lis, cleanup, err := listenUnix(s.path)
	if err != nil {
		return err
	}
	defer cleanup()
	s.log.InfoContext(ctx, "workload API listening", "path", s.path)
	return s.Serve(ctx, lis)
}

// Serve serves on lis until ctx is done, as Run does, and closes lis. Peers
// are attested by SO_PEERCRED, so a listener that is not a Unix socket (or a
// platform other than Linux) has every call refused with PermissionDenied.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	stopping := make(chan struct{})
	gs := grpc.NewServer(
		grpc.Creds(peerCredentials{}),
		grpc.ChainUnaryInterceptor(s.unaryAuth),
		grpc.ChainStreamInterceptor(s.streamAuth),
	)
	workload.RegisterSpiffeWorkloadAPIServer(gs, &service{src: s.src, log: s.log, stopping: stopping})

	errc := make(chan error, 1)
	go func() { errc <- gs.Serve(lis) }()
	select {
	case err := <-errc:
		close(stopping)
		gs.Stop()
		return fmt.Errorf("workloadapi: serve: %w", err)
	case <-ctx.Done():
	}

	// End the long-lived streams first (clients see Unavailable and retry
	// elsewhere or later), so the graceful stop does not wait on them.
	close(stopping)
	stopped := make(chan struct{})
	go func() {
		gs.GracefulStop()
		close(stopped)
	}()
	timer := time.NewTimer(s.grace)
	defer timer.Stop()
	select {
	case <-stopped:
	case <-timer.C:
		s.log.Warn("workload API: graceful stop timed out; closing connections", "timeout", s.grace)
		gs.Stop()
		<-stopped
	}
	<-errc // nil once stopped
	return nil
}

// authorize admits a call from an allowed uid carrying the security header.
// It is where the API's PermissionDenied and InvalidArgument are made.
func (s *Server) authorize(ctx context.Context, method string) error {
	var info peerAuthInfo
	p, ok := peer.FromContext(ctx)
	if ok {
		info, ok = p.AuthInfo.(peerAuthInfo)
	}
	switch {
	case !ok:
		s.log.WarnContext(ctx, "workload API: refused call without peer credentials", "method", method)
		return status.Error(codes.PermissionDenied, "workloadapi: caller could not be attested")
	case info.err != nil:
		s.log.WarnContext(ctx, "workload API: refused unattested caller", "method", method, "error", info.err)
		return status.Errorf(codes.PermissionDenied, "workloadapi: caller could not be attested: %v", info.err)
	case !slices.Contains(s.allowed, info.UID):
		s.log.WarnContext(ctx, "workload API: refused caller", "method", method, "uid", info.UID, "pid", info.PID)
		return status.Errorf(codes.PermissionDenied, "workloadapi: uid %d may not call the workload API", info.UID)
	}
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(SecurityHeader); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	s.log.DebugContext(ctx, "workload API call", "method", method, "uid", info.UID, "pid", info.PID)
	return nil
}

func (s *Server) unaryAuth(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := s.authorize(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (s *Server) streamAuth(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := s.authorize(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}

// tempSocketPath is a short random name in path's directory.
func tempSocketPath(path string) string {
	return filepath.Join(filepath.Dir(path), fmt.Sprintf(".wl-%08x", rand.Uint32()))
}

// listenUnix binds a 0600 Unix socket at path (see Run) and returns it with
// a cleanup that closes it and removes the socket if it is still ours.
func listenUnix(path string) (*net.UnixListener, func(), error) {
	switch fi, err := os.Lstat(path); {
	case err == nil && fi.Mode().Type() != fs.ModeSocket:
		return nil, nil, fmt.Errorf("workloadapi: %s exists and is not a socket; refusing to replace it", path)
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return nil, nil, fmt.Errorf("workloadapi: check socket path: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, nil, fmt.Errorf("workloadapi: create socket directory: %w", err)
	}
	tmp := tempSocketPath(path)
	lis, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, nil, fmt.Errorf("workloadapi: listen: %w", err)
	}
	lis.SetUnlinkOnClose(false) // the file is renamed; cleanup removes it
	fail := func(what string, err error) (*net.UnixListener, func(), error) {
		lis.Close()
		os.Remove(tmp)
		return nil, nil, fmt.Errorf("workloadapi: %s: %w", what, err)
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return fail("restrict socket mode", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail("install socket", err)
	}
	ours, err := os.Lstat(path)
	if err != nil {
		return fail("stat socket", err)
	}
	cleanup := func() {
		lis.Close()
		// Remove the socket unless another server has replaced it since.
		if cur, err := os.Lstat(path); err == nil && os.SameFile(ours, cur) {
			os.Remove(path)
		}
	}
	return lis, cleanup, nil
}
