//go:build linux

package workloadapi_test

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	spiffewl "github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/straitmesh/strait/proxy/workloadapi"
)

// wait bounds every wait for something asynchronous.
const wait = 10 * time.Second

// socketPath is a fresh socket path short enough for sun_path.
func socketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "wl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "api.sock")
}

type running struct {
	path string
	stop func() error // cancels Run and returns its error
}

// start runs a server for cfg (Path filled in if empty) until the test ends
// and waits until its socket accepts connections.
func start(t *testing.T, cfg workloadapi.Config) running {
	t.Helper()
	if cfg.Path == "" {
		cfg.Path = socketPath(t)
	}
	srv, err := workloadapi.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- srv.Run(ctx) }()
	stop := func() error {
		cancel()
		select {
		case err := <-errc:
			errc <- err
			return err
		case <-time.After(wait):
			t.Fatalf("Run did not return within %s of cancellation", wait)
			return nil
		}
	}
	t.Cleanup(func() { stop() })
	deadline := time.Now().Add(wait)
	for {
		// Dial rather than stat: a stale socket left at Path refuses.
		if c, err := net.Dial("unix", cfg.Path); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-errc:
			t.Fatalf("Run returned before listening: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("socket %s did not accept connections within %s", cfg.Path, wait)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return running{path: cfg.Path, stop: stop}
}

func addr(path string) spiffewl.ClientOption { return spiffewl.WithAddr("unix://" + path) }

func timeout(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	t.Cleanup(cancel)
	return ctx
}

// rawClient is a plain gRPC client, for calls go-spiffe's client will not make.
func rawClient(t *testing.T, path string) workload.SpiffeWorkloadAPIClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return workload.NewSpiffeWorkloadAPIClient(conn)
}

func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, workloadapi.SecurityHeader, "true")
}

func sameSVID(got, want *x509svid.SVID) bool {
	if got == nil || want == nil || got.ID != want.ID || len(got.Certificates) != len(want.Certificates) {
		return false
	}
	for i := range got.Certificates {
		if !got.Certificates[i].Equal(want.Certificates[i]) {
			return false
		}
	}
	_, gotKey, err1 := got.MarshalRaw()
	_, wantKey, err2 := want.MarshalRaw()
	return err1 == nil && err2 == nil && bytes.Equal(gotKey, wantKey)
}

// awaitSVID waits until src serves want.
func awaitSVID(t *testing.T, src *spiffewl.X509Source, want *x509svid.SVID) {
	t.Helper()
	deadline := time.After(wait)
	for {
		updated := src.Updated()
		if got, err := src.GetX509SVID(); err == nil && sameSVID(got, want) {
			return
		}
		select {
		case <-updated:
		case <-deadline:
			t.Fatalf("source did not serve the new SVID (serial %v) within %s", want.Certificates[0].SerialNumber, wait)
		}
	}
}

func TestX509SourceGetsSVIDAndBundle(t *testing.T) {
	id := newIdentity(t, td)
	st := workloadapi.NewStore()
	svid := id.ca.SVID(t, appID, time.Hour)
	st.SetSVID(svid)
	st.SetBundle(id.bundle)
	srv := start(t, workloadapi.Config{Source: st})

	fi, err := os.Lstat(srv.path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o600 {
		t.Errorf("socket mode = %v, want 0600", got)
	}

	ctx := timeout(t)
	src, err := spiffewl.NewX509Source(ctx, spiffewl.WithClientOptions(addr(srv.path)))
	if err != nil {
		t.Fatalf("NewX509Source: %v", err)
	}
	defer src.Close()
	got, err := src.GetX509SVID()
	if err != nil {
		t.Fatalf("GetX509SVID: %v", err)
	}
	if !sameSVID(got, svid) {
		t.Errorf("got SVID %s (%d certs), want %s with the same chain and key", got.ID, len(got.Certificates), svid.ID)
	}
	b, err := src.GetX509BundleForTrustDomain(td)
	if err != nil || !b.Equal(id.bundle) {
		t.Errorf("source bundle for %s = %v, %v; want the CA's bundle", td, b, err)
	}

	set, err := spiffewl.FetchX509Bundles(ctx, addr(srv.path))
	if err != nil {
		t.Fatalf("FetchX509Bundles: %v", err)
	}
	if set.Len() != 1 {
		t.Errorf("FetchX509Bundles returned %d bundles, want 1", set.Len())
	}
	if b, ok := set.Get(td); !ok || !b.Equal(id.bundle) {
		t.Errorf("FetchX509Bundles bundle for %s = %v, %v; want the CA's bundle", td, b, ok)
	}
}

func TestFederatedBundles(t *testing.T) {
	id, other := newIdentity(t, td), newIdentity(t, otherTD)
	st := workloadapi.NewStore()
	st.SetSVID(id.ca.SVID(t, appID, time.Hour))
	st.SetBundle(id.bundle)
	st.SetBundle(other.bundle)
	srv := start(t, workloadapi.Config{Source: st})
	ctx := timeout(t)

	x509ctx, err := spiffewl.FetchX509Context(ctx, addr(srv.path))
	if err != nil {
		t.Fatalf("FetchX509Context: %v", err)
	}
	set, err := spiffewl.FetchX509Bundles(ctx, addr(srv.path))
	if err != nil {
		t.Fatalf("FetchX509Bundles: %v", err)
	}
	for name, got := range map[string]*x509bundle.Set{"FetchX509Context": x509ctx.Bundles, "FetchX509Bundles": set} {
		if got.Len() != 2 {
			t.Errorf("%s: got %d bundles, want 2", name, got.Len())
		}
		for _, want := range []identity{id, other} {
			b, err := got.GetX509BundleForTrustDomain(want.bundle.TrustDomain())
			if err != nil || !b.Equal(want.bundle) {
				t.Errorf("%s: bundle for %s = %v, %v; want its CA's bundle", name, want.bundle.TrustDomain(), b, err)
			}
		}
	}
}

func TestRotation(t *testing.T) {
	id := newIdentity(t, td)
	st := workloadapi.NewStore()
	st.SetSVID(id.ca.SVID(t, appID, time.Hour))
	st.SetBundle(id.bundle)
	srv := start(t, workloadapi.Config{Source: st})

	src, err := spiffewl.NewX509Source(timeout(t), spiffewl.WithClientOptions(addr(srv.path)))
	if err != nil {
		t.Fatalf("NewX509Source: %v", err)
	}
	defer src.Close()

	t.Run("SVID renewed", func(t *testing.T) {
		renewed := id.ca.SVID(t, appID, time.Hour)
		st.SetSVID(renewed)
		awaitSVID(t, src, renewed)
	})
	t.Run("bundle changed", func(t *testing.T) {
		other := newIdentity(t, td) // a new root for the same trust domain
		both := id.bundle.Clone()
		for _, root := range other.bundle.X509Authorities() {
			both.AddX509Authority(root)
		}
		st.SetBundle(both)
		deadline := time.After(wait)
		for {
			updated := src.Updated()
			if b, err := src.GetX509BundleForTrustDomain(td); err == nil && b.Equal(both) {
				return
			}
			select {
			case <-updated:
			case <-deadline:
				t.Fatalf("source did not see the new bundle within %s", wait)
			}
		}
	})
}

// signalingStore reports when a server goroutine first waits on it.
type signalingStore struct {
	*workloadapi.Store
	waiting chan struct{}
}

func (s *signalingStore) Changed() <-chan struct{} {
	ch := s.Store.Changed()
	select {
	case s.waiting <- struct{}{}:
	default:
	}
	return ch
}

func TestWaitsForFirstSVID(t *testing.T) {
	id := newIdentity(t, td)
	st := &signalingStore{Store: workloadapi.NewStore(), waiting: make(chan struct{}, 1)}
	srv := start(t, workloadapi.Config{Source: st})

	ctx := withHeader(timeout(t))
	stream, err := rawClient(t, srv.path).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatalf("FetchX509SVID: %v", err)
	}
	select {
	case <-st.waiting:
	case <-time.After(wait):
		t.Fatal("server did not start waiting for an SVID")
	}
	svid := id.ca.SVID(t, appID, time.Hour)
	st.SetSVID(svid)
	st.SetBundle(id.bundle)
	resp, err := stream.Recv()
	if err != nil {
		t.Fatalf("Recv: %v", err)
	}
	if len(resp.Svids) != 1 || resp.Svids[0].SpiffeId != appID {
		t.Fatalf("got %d SVIDs (%v), want one for %s", len(resp.Svids), resp.Svids, appID)
	}
	got, err := x509svid.ParseRaw(resp.Svids[0].X509Svid, resp.Svids[0].X509SvidKey)
	if err != nil || !sameSVID(got, svid) {
		t.Errorf("ParseRaw of the response = %v, %v; want the SVID set", got, err)
	}
	wantBundle := rawRoots(id)
	if !bytes.Equal(resp.Svids[0].Bundle, wantBundle) {
		t.Errorf("response bundle is not the CA's roots as concatenated DER")
	}
}

func rawRoots(id identity) []byte {
	var out []byte
	for _, c := range id.bundle.X509Authorities() {
		out = append(out, c.Raw...)
	}
	return out
}

func TestSecurityHeaderRequired(t *testing.T) {
	id := newIdentity(t, td)
	st := workloadapi.NewStore()
	st.SetSVID(id.ca.SVID(t, appID, time.Hour))
	st.SetBundle(id.bundle)
	srv := start(t, workloadapi.Config{Source: st})
	client := rawClient(t, srv.path)

	headers := map[string]func(context.Context) context.Context{
		"missing": func(ctx context.Context) context.Context { return ctx },
		"false": func(ctx context.Context) context.Context {
			return metadata.AppendToOutgoingContext(ctx, workloadapi.SecurityHeader, "false")
		},
	}
	calls := map[string]func(context.Context) error{
		"FetchX509SVID": func(ctx context.Context) error {
			s, err := client.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		},
		"FetchX509Bundles": func(ctx context.Context) error {
			s, err := client.FetchX509Bundles(ctx, &workload.X509BundlesRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		},
		"FetchJWTSVID": func(ctx context.Context) error {
			_, err := client.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"x"}})
			return err
		},
	}
	for hname, header := range headers {
		for cname, call := range calls {
			t.Run(hname+"/"+cname, func(t *testing.T) {
				err := call(header(timeout(t)))
				if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), "security header missing from request") {
					t.Errorf("got %v, want InvalidArgument: security header missing from request", err)
				}
			})
		}
	}
}

func TestJWTUnimplemented(t *testing.T) {
	srv := start(t, workloadapi.Config{Source: workloadapi.NewStore()})
	client := rawClient(t, srv.path)
	calls := map[string]func(context.Context) error{
		"FetchJWTSVID": func(ctx context.Context) error {
			_, err := client.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"x"}})
			return err
		},
		"FetchJWTBundles": func(ctx context.Context) error {
			s, err := client.FetchJWTBundles(ctx, &workload.JWTBundlesRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		},
		"ValidateJWTSVID": func(ctx context.Context) error {
			_, err := client.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{Audience: "x", Svid: "a.b.c"})
			return err
		},
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			err := call(withHeader(timeout(t)))
			if status.Code(err) != codes.Unimplemented || !strings.Contains(err.Error(), "X.509-SVIDs only") {
				t.Errorf("got %v, want Unimplemented saying Strait issues X.509-SVIDs only", err)
			}
		})
	}
}

func TestPeerUIDRefused(t *testing.T) {
	srv := start(t, workloadapi.Config{Source: workloadapi.NewStore(), AllowedUIDs: []int{os.Getuid() + 1}})
	_, err := rawClient(t, srv.path).FetchJWTSVID(withHeader(timeout(t)), &workload.JWTSVIDRequest{})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("call from uid %d: got %v, want PermissionDenied", os.Getuid(), err)
	}
}

func TestServeRefusesNonUnixPeers(t *testing.T) {
	srv, err := workloadapi.New(workloadapi.Config{Source: workloadapi.NewStore()})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ctx, lis) }()
	defer func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = workload.NewSpiffeWorkloadAPIClient(conn).FetchJWTSVID(withHeader(timeout(t)), &workload.JWTSVIDRequest{})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("call over TCP: got %v, want PermissionDenied", err)
	}
}

func TestStaleSocketReplaced(t *testing.T) {
	path := socketPath(t)
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	if fi, err := os.Lstat(path); err != nil || fi.Mode().Type() != fs.ModeSocket {
		t.Fatalf("stale socket not left behind: %v, %v", fi, err)
	}

	srv := start(t, workloadapi.Config{Source: workloadapi.NewStore(), Path: path})
	_, err = rawClient(t, srv.path).FetchJWTSVID(withHeader(timeout(t)), &workload.JWTSVIDRequest{})
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("call after replacing the stale socket: got %v, want Unimplemented from the new server", err)
	}
}

func TestRefusesToReplaceNonSocket(t *testing.T) {
	path := socketPath(t)
	if err := os.WriteFile(path, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	srv, err := workloadapi.New(workloadapi.Config{Source: workloadapi.NewStore(), Path: path})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Run(timeout(t)); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Run over a regular file: got %v, want an error saying it is not a socket", err)
	}
	if data, err := os.ReadFile(path); err != nil || string(data) != "keep me" {
		t.Errorf("regular file changed: %q, %v", data, err)
	}
}

func TestRunCleansUp(t *testing.T) {
	id := newIdentity(t, td)
	st := workloadapi.NewStore()
	st.SetSVID(id.ca.SVID(t, appID, time.Hour))
	st.SetBundle(id.bundle)

	tests := []struct {
		name  string
		store workloadapi.Source
	}{
		{"stream sending", st},
		{"stream waiting for an SVID", workloadapi.NewStore()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := start(t, workloadapi.Config{Source: tt.store})
			stream, err := rawClient(t, srv.path).FetchX509Bundles(withHeader(timeout(t)), &workload.X509BundlesRequest{})
			if err != nil {
				t.Fatalf("FetchX509Bundles: %v", err)
			}
			if tt.store == st {
				if _, err := stream.Recv(); err != nil {
					t.Fatalf("first Recv: %v", err)
				}
			}
			begin := time.Now()
			if err := srv.stop(); err != nil {
				t.Errorf("Run = %v, want nil after cancellation", err)
			}
			if d := time.Since(begin); d > 3*time.Second {
				t.Errorf("Run took %s to return with a stream open, want well under the 5s shutdown timeout", d)
			}
			if _, err := stream.Recv(); status.Code(err) != codes.Unavailable {
				t.Errorf("Recv after shutdown: got %v, want Unavailable", err)
			}
			if _, err := os.Lstat(srv.path); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("socket after Run returned: Lstat error = %v, want not exist", err)
			}
			entries, _ := os.ReadDir(filepath.Dir(srv.path))
			for _, e := range entries {
				t.Errorf("left behind in the socket directory: %s", e.Name())
			}
		})
	}
}
