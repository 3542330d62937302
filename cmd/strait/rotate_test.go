package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/identity"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// fakeRotation is a scripted RotationService. statusFn gets the 1-based
// number of the RotationStatus call.
type fakeRotation struct {
	controlplanev1.UnimplementedRotationServiceServer
	statusFn func(n int) (*controlplanev1.RotationStatusResponse, error)
	rotateFn func(*controlplanev1.RotateRequest) (*controlplanev1.RotateResponse, error)
	autoFn   func(*controlplanev1.AutoRotateRequest) (*controlplanev1.AutoRotateResponse, error)

	mu      sync.Mutex
	statusN int
	rotates []*controlplanev1.RotateRequest
	autos   []*controlplanev1.AutoRotateRequest
}

func (f *fakeRotation) RotationStatus(context.Context, *controlplanev1.RotationStatusRequest) (*controlplanev1.RotationStatusResponse, error) {
	f.mu.Lock()
	f.statusN++
	n := f.statusN
	f.mu.Unlock()
	return f.statusFn(n)
}

func (f *fakeRotation) Rotate(_ context.Context, req *controlplanev1.RotateRequest) (*controlplanev1.RotateResponse, error) {
	f.mu.Lock()
	f.rotates = append(f.rotates, req)
	f.mu.Unlock()
	return f.rotateFn(req)
}

func (f *fakeRotation) AutoRotate(_ context.Context, req *controlplanev1.AutoRotateRequest) (*controlplanev1.AutoRotateResponse, error) {
	f.mu.Lock()
	f.autos = append(f.autos, req)
	f.mu.Unlock()
	return f.autoFn(req)
}

// rotationFixture serves a fakeRotation over mTLS as east's control plane
// (an SVID from a real test CA) and writes a strait.config whose context
// "east" reaches it with admin credentials, so the commands run exactly as
// against a real control plane.
type rotationFixture struct {
	fake   *fakeRotation
	config string
	addr   string
	creds  credentials.TransportCredentials

	mu    sync.Mutex
	srv   *grpc.Server
	admin controlplanev1.AdminServiceServer // also served, if set before start
}

func newRotationFixture(t *testing.T, fake *fakeRotation) *rotationFixture {
	t.Helper()
	c := catest.New(t, "strait.example")
	td := c.Bundle().TrustDomain()
	cpID, err := identity.ControlPlane(td, "east")
	if err != nil {
		t.Fatal(err)
	}
	adminID, err := identity.Admin(td, "east")
	if err != nil {
		t.Fatal(err)
	}
	server := c.SVID(t, cpID.String(), 0)
	admin := c.SVID(t, adminID.String(), 0)
	dir := t.TempDir()
	certPEM, keyPEM, err := admin.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{"admin.pem": certPEM, "admin-key.pem": keyPEM, "bundle.pem": c.Bundle().MarshalPEM()} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var chain [][]byte
	for _, cert := range server.Certificates {
		chain = append(chain, cert.Raw)
	}
	fx := &rotationFixture{
		fake: fake,
		addr: "127.0.0.1:0",
		creds: credentials.NewTLS(&tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{{Certificate: chain, PrivateKey: server.PrivateKey}},
			ClientAuth:   tls.RequireAnyClientCert,
		}),
	}
	fx.start(t)
	t.Cleanup(fx.stop)
	fx.config = filepath.Join(dir, "strait.config")
	err = writeClientConfig(fx.config, &clientConfig{CurrentContext: "east", Contexts: []clientContext{{
		Name: "east", Cluster: "east", Server: fx.addr, TrustDomain: td.Name(),
		TrustBundle: "bundle.pem", ClientCertificate: "admin.pem", ClientKey: "admin-key.pem",
	}}})
	if err != nil {
		t.Fatal(err)
	}
	return fx
}

// start serves on fx.addr (the same port again after stop).
func (fx *rotationFixture) start(t *testing.T) {
	var lis net.Listener
	var err error
	for range 50 {
		if lis, err = net.Listen("tcp", fx.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Errorf("listen %s: %v", fx.addr, err)
		return
	}
	srv := grpc.NewServer(grpc.Creds(fx.creds))
	controlplanev1.RegisterRotationServiceServer(srv, fx.fake)
	if fx.admin != nil {
		controlplanev1.RegisterAdminServiceServer(srv, fx.admin)
	}
	go srv.Serve(lis)
	fx.mu.Lock()
	fx.addr, fx.srv = lis.Addr().String(), srv
	fx.mu.Unlock()
}

func (fx *rotationFixture) stop() {
	fx.mu.Lock()
	srv := fx.srv
	fx.mu.Unlock()
	srv.Stop()
}

// strait runs the CLI against the fixture's config with ctx.
func (fx *rotationFixture) strait(ctx context.Context, args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := run(ctx, append(args, "--config", fx.config), &out, &errOut)
	return code, out.String(), errOut.String()
}

const (
	digest1 = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	digest2 = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
)

// rotStatus is east's answer: bundle seq with digest, clusters' reports.
func rotStatus(seq uint64, ready bool, next string, clusters ...*controlplanev1.ClusterRotation) *controlplanev1.RotationStatusResponse {
	d := digest1
	if seq >= 2 {
		d = digest2
	}
	return &controlplanev1.RotationStatusResponse{
		Cluster: "east", RootAuthority: true, BundleSequence: seq, BundleDigest: d,
		Roots: []*controlplanev1.RootInfo{
			{Id: "r1", State: "active", InBundle: true, Fingerprint: "sha256:0123456789abcdef0123", NotAfter: timestamppb.New(time.Date(2035, 1, 2, 3, 4, 0, 0, time.UTC))},
			{Id: "r2", State: "prepared", InBundle: seq >= 2, Fingerprint: "sha256:fedcba9876543210fedc", NotAfter: timestamppb.New(time.Date(2036, 1, 2, 3, 4, 0, 0, time.UTC))},
		},
		Clusters: clusters, Next: next, Ready: ready,
	}
}

// clusterAt is a cluster whose control plane holds bundle seq and whose
// nodes hold it (bundleCur) and present a current SVID (svidCur), compared
// with a root authority at bundle sequence want, as the server sets the
// flags; waiting is the server's words ("" to let the CLI say it).
func clusterAt(name string, seq, want uint64, nodes, bundleCur, svidCur uint32, waiting string) *controlplanev1.ClusterRotation {
	d := digest1
	if seq >= 2 {
		d = digest2
	}
	return &controlplanev1.ClusterRotation{
		Report: &federationv1.RotationReport{Cluster: name, BundleSequence: seq, BundleDigest: d,
			Nodes: nodes, NodesBundleCurrent: bundleCur, NodesSvidCurrent: svidCur},
		BundleInSync:      (seq >= 2) == (want >= 2) && bundleCur == nodes,
		SvidsOnActiveRoot: svidCur == nodes,
		Waiting:           waiting,
	}
}

func TestRotateStepWaitsForAcknowledgement(t *testing.T) {
	fake := &fakeRotation{}
	fake.rotateFn = func(req *controlplanev1.RotateRequest) (*controlplanev1.RotateResponse, error) {
		return &controlplanev1.RotateResponse{Status: rotStatus(2, false, "activate once every cluster holds the new bundle")}, nil
	}
	fake.statusFn = func(n int) (*controlplanev1.RotationStatusResponse, error) {
		const next = "activate once every cluster holds the new bundle"
		switch n {
		case 1: // the root-authority check before the step
			return rotStatus(1, true, "prepare", clusterAt("east", 1, 1, 3, 3, 3, ""), clusterAt("west", 1, 1, 5, 5, 5, ""), clusterAt("south", 1, 1, 2, 2, 2, "")), nil
		case 2:
			return rotStatus(2, false, next, clusterAt("east", 2, 2, 3, 3, 3, ""), clusterAt("west", 1, 2, 5, 5, 5, ""), clusterAt("south", 2, 2, 2, 1, 2, "")), nil
		case 3, 4:
			return rotStatus(2, false, next, clusterAt("east", 2, 2, 3, 3, 3, ""), clusterAt("west", 2, 2, 5, 2, 5, "2 of 5 nodes hold bundle sha256:222222222222 [w3: old bundle; w4: old bundle; w5: old bundle]"), clusterAt("south", 2, 2, 2, 2, 2, "")), nil
		default:
			return rotStatus(2, true, "activate: ready", clusterAt("east", 2, 2, 3, 3, 3, ""), clusterAt("west", 2, 2, 5, 5, 5, ""), clusterAt("south", 2, 2, 2, 2, 2, "")), nil
		}
	}
	fx := newRotationFixture(t, fake)
	code, out, errOut := fx.strait(t.Context(), "ca", "rotate", "prepare", "--root-ttl", "30d")
	if code != 0 {
		t.Fatalf("prepare: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	for _, want := range []string{
		"prepare: taken; bundle sequence 2, roots r1 (active), r2 (prepared)\n",
		"prepare acknowledged by 3 clusters (east, west, south) in ",
		"next: activate: ready\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("stdout lacks %q:\n%s", want, out)
		}
	}
	for _, want := range []string{
		"prepare: waiting for west (its control plane holds bundle sequence 1, not 2)\n",
		"prepare: waiting for south (1 of 2 nodes hold bundle sha256:222222222222…)\n",
		"prepare: south caught up\n",
		"prepare: waiting for west (2 of 5 nodes hold bundle sha256:222222222222 [w3: old bundle; w4: old bundle; w5: old bundle])\n",
		"prepare: west caught up\n",
	} {
		if !strings.Contains(errOut, want) {
			t.Errorf("stderr lacks %q:\n%s", want, errOut)
		}
	}
	// One line per change: west stayed at 2 of 5 for two polls.
	if n := strings.Count(errOut, "waiting for west (2 of 5"); n != 1 {
		t.Errorf("west's 2 of 5 printed %d times, want once:\n%s", n, errOut)
	}
	if strings.Contains(errOut, "waiting for east") {
		t.Errorf("east was never behind, yet:\n%s", errOut)
	}
	if len(fake.rotates) != 1 || fake.rotates[0].GetStep() != "prepare" || fake.rotates[0].GetForce() ||
		fake.rotates[0].GetRootTtl().AsDuration() != 30*24*time.Hour {
		t.Fatalf("Rotate requests %v, want one prepare with root_ttl 720h and no force", fake.rotates)
	}
}

func TestRotateGateRefused(t *testing.T) {
	fake := &fakeRotation{}
	var gateOpen, autoRunning atomic.Bool
	fake.statusFn = func(int) (*controlplanev1.RotationStatusResponse, error) {
		st := rotStatus(2, gateOpen.Load(), "activate once every cluster holds the new bundle")
		if autoRunning.Load() {
			st.Auto = &controlplanev1.AutoRotation{Running: true, Step: "prepare"}
		}
		return st, nil
	}
	fake.rotateFn = func(req *controlplanev1.RotateRequest) (*controlplanev1.RotateResponse, error) {
		if req.GetStep() == "taint" {
			return nil, status.Error(codes.FailedPrecondition, `ca: transition not allowed: no root "r9"`)
		}
		if autoRunning.Load() {
			return nil, status.Error(codes.FailedPrecondition, "an automatic rotation is in progress (step prepare); cancel it first")
		}
		if !req.GetForce() {
			return nil, status.Error(codes.FailedPrecondition, "prepare is not acknowledged everywhere: west (3 of 5 nodes hold an older bundle), south (gateway link down)")
		}
		return &controlplanev1.RotateResponse{Status: rotStatus(2, false, "retire once every cluster's SVIDs chain to r2")}, nil
	}
	fx := newRotationFixture(t, fake)
	code, out, errOut := fx.strait(t.Context(), "ca", "rotate", "activate")
	if code != 1 {
		t.Fatalf("activate behind the gate: exit %d, want 1\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	for _, want := range []string{"activate refused: prepare is not acknowledged everywhere: west (3 of 5 nodes hold an older bundle), south (gateway link down)",
		"strait ca rotate status", "--force"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("stderr lacks %q:\n%s", want, errOut)
		}
	}
	if out != "" {
		t.Errorf("a refused step printed on stdout: %q", out)
	}

	code, out, errOut = fx.strait(t.Context(), "ca", "rotate", "activate", "--force", "--wait=false")
	if code != 0 || !strings.Contains(out, "activate: taken") || !strings.Contains(out, "next: retire once") {
		t.Fatalf("activate --force: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	if last := fake.rotates[len(fake.rotates)-1]; !last.GetForce() || last.GetStep() != "activate" {
		t.Fatalf("last Rotate %v, want a forced activate", last)
	}

	// Refused for another reason than the gate: no hint about --force.
	gateOpen.Store(true)
	code, _, errOut = fx.strait(t.Context(), "ca", "rotate", "taint", "r9")
	if code != 1 || !strings.Contains(errOut, `taint refused: ca: transition not allowed: no root "r9"`) || strings.Contains(errOut, "--force") {
		t.Fatalf("taint of an unknown root: exit %d, stderr:\n%s", code, errOut)
	}
	autoRunning.Store(true)
	code, _, errOut = fx.strait(t.Context(), "ca", "rotate", "retire")
	if code != 1 || !strings.Contains(errOut, "an automatic rotation is running") || !strings.Contains(errOut, "--auto --cancel") {
		t.Fatalf("retire during an auto rotation: exit %d, stderr:\n%s", code, errOut)
	}
}

func TestRotateWaitSurvivesUnreachableControlPlane(t *testing.T) {
	fake := &fakeRotation{}
	down := make(chan struct{})
	fake.rotateFn = func(*controlplanev1.RotateRequest) (*controlplanev1.RotateResponse, error) {
		return &controlplanev1.RotateResponse{Status: rotStatus(3, false, "")}, nil
	}
	fake.statusFn = func(n int) (*controlplanev1.RotationStatusResponse, error) {
		switch {
		case n == 1:
			return rotStatus(2, true, "retire"), nil
		case n == 2:
			close(down)
			return rotStatus(3, false, "", clusterAt("east", 3, 3, 1, 1, 1, ""), clusterAt("west", 2, 3, 4, 4, 4, "its control plane holds bundle sha256:222222222222 (sequence 2), not sha256:333333333333")), nil
		default:
			return rotStatus(3, true, "prepare: nothing in progress", clusterAt("east", 3, 3, 1, 1, 1, ""), clusterAt("west", 3, 3, 4, 4, 4, "")), nil
		}
	}
	fx := newRotationFixture(t, fake)
	go func() {
		<-down
		time.Sleep(50 * time.Millisecond)
		fx.stop()
		time.Sleep(1500 * time.Millisecond)
		fx.start(t)
	}()
	code, out, errOut := fx.strait(t.Context(), "ca", "rotate", "retire", "--timeout", "30s")
	if code != 0 {
		t.Fatalf("retire: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	if n := strings.Count(errOut, "root authority unreachable ("); n != 1 {
		t.Errorf("unreachable printed %d times, want once:\n%s", n, errOut)
	}
	for _, want := range []string{"); the rotation waits — nothing changes until it is back\n", "root authority is back after ", "retire: waiting for west ("} {
		if !strings.Contains(errOut, want) {
			t.Errorf("stderr lacks %q:\n%s", want, errOut)
		}
	}
	if !strings.Contains(out, "retire acknowledged by 2 clusters (east, west) in ") {
		t.Errorf("stdout lacks the acknowledgement:\n%s", out)
	}
}

func TestRotateWaitTimesOut(t *testing.T) {
	fake := &fakeRotation{}
	fake.rotateFn = func(*controlplanev1.RotateRequest) (*controlplanev1.RotateResponse, error) {
		return &controlplanev1.RotateResponse{Status: rotStatus(2, false, "")}, nil
	}
	fake.statusFn = func(n int) (*controlplanev1.RotationStatusResponse, error) {
		return rotStatus(2, n == 1, "activate once west holds the new bundle", clusterAt("west", 1, 2, 5, 5, 5, "")), nil
	}
	fx := newRotationFixture(t, fake)
	code, _, errOut := fx.strait(t.Context(), "ca", "rotate", "prepare", "--timeout", "1200ms")
	if code != 1 || !strings.Contains(errOut, "prepare not acknowledged everywhere after 1.2s: waiting for west (its control plane holds bundle sequence 1, not 2); the step stays taken") {
		t.Fatalf("exit %d, stderr:\n%s", code, errOut)
	}
}

// autoStatus is east's answer while an auto rotation has taken the first
// len(taken) steps, each acknowledged when acked[i].
func autoStatus(steps []*controlplanev1.StepTiming, done bool, lastErr string, clusters ...*controlplanev1.ClusterRotation) *controlplanev1.RotationStatusResponse {
	st := rotStatus(2, false, "", clusters...)
	st.Auto = &controlplanev1.AutoRotation{Running: !done, Done: done, LastError: lastErr, Steps: steps,
		Started: timestamppb.New(autoBase)}
	if len(steps) > 0 {
		st.Auto.Step = steps[len(steps)-1].GetStep()
	}
	return st
}

var autoBase = time.Date(2030, 5, 6, 7, 8, 9, 0, time.UTC)

func stepAt(name string, taken, acked time.Duration) *controlplanev1.StepTiming {
	s := &controlplanev1.StepTiming{Step: name, Taken: timestamppb.New(autoBase.Add(taken))}
	if acked > 0 {
		s.Acknowledged = timestamppb.New(autoBase.Add(acked))
	}
	return s
}

func TestRotateAutoFollowsToDone(t *testing.T) {
	fake := &fakeRotation{}
	fake.autoFn = func(*controlplanev1.AutoRotateRequest) (*controlplanev1.AutoRotateResponse, error) {
		return &controlplanev1.AutoRotateResponse{Auto: &controlplanev1.AutoRotation{Running: true, Started: timestamppb.New(autoBase)}}, nil
	}
	east, west := clusterAt("east", 2, 2, 2, 2, 2, ""), clusterAt("west", 2, 2, 3, 3, 3, "")
	westBehind := clusterAt("west", 2, 2, 3, 3, 1, "")
	fake.statusFn = func(n int) (*controlplanev1.RotationStatusResponse, error) {
		switch n {
		case 1:
			return rotStatus(1, true, "prepare"), nil
		case 2:
			return autoStatus(nil, false, "", east, west), nil
		case 3:
			return autoStatus([]*controlplanev1.StepTiming{stepAt("prepare", 100*time.Millisecond, 0)}, false, "", east, west), nil
		case 4:
			return autoStatus([]*controlplanev1.StepTiming{stepAt("prepare", 100*time.Millisecond, 1500*time.Millisecond),
				stepAt("activate", 1600*time.Millisecond, 0)}, false, "", east, westBehind), nil
		case 5:
			return autoStatus([]*controlplanev1.StepTiming{stepAt("prepare", 100*time.Millisecond, 1500*time.Millisecond),
				stepAt("activate", 1600*time.Millisecond, 4100*time.Millisecond), stepAt("retire", 4200*time.Millisecond, 0)}, false, "", east, west), nil
		default:
			return autoStatus([]*controlplanev1.StepTiming{stepAt("prepare", 100*time.Millisecond, 1500*time.Millisecond),
				stepAt("activate", 1600*time.Millisecond, 4100*time.Millisecond), stepAt("retire", 4200*time.Millisecond, 5*time.Second)}, true, "", east, west), nil
		}
	}
	fx := newRotationFixture(t, fake)
	code, out, errOut := fx.strait(t.Context(), "ca", "rotate", "--auto", "--root-ttl", "365d")
	if code != 0 {
		t.Fatalf("--auto: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	wantOrder := []string{
		"auto rotation started",
		"prepare: taken at 07:08:09Z\n",
		"prepare acknowledged by 2 clusters (east, west) in 1.4s\n",
		"activate: taken at 07:08:10Z\n",
		"activate acknowledged by 2 clusters (east, west) in 2.5s\n",
		"retire: taken at 07:08:13Z\n",
		"retire acknowledged by 2 clusters (east, west) in 800ms\n",
		"STEP      TAKEN      ACKNOWLEDGED  TOOK\n",
		"prepare   07:08:09Z  07:08:10Z     1.4s\n",
		"activate  07:08:10Z  07:08:13Z     2.5s\n",
		"retire    07:08:13Z  07:08:14Z     800ms\n",
		"total                              5s\n",
		"auto rotation done\n",
	}
	rest := out
	for _, want := range wantOrder {
		i := strings.Index(rest, want)
		if i < 0 {
			t.Fatalf("stdout lacks %q (in this order):\n%s", want, out)
		}
		rest = rest[i+len(want):]
	}
	if !strings.Contains(errOut, "activate: waiting for west (1 of 3 nodes present an SVID from the current intermediate)") {
		t.Errorf("stderr lacks activate's progress:\n%s", errOut)
	}
	if len(fake.autos) != 1 || fake.autos[0].GetCancel() || fake.autos[0].GetRootTtl().AsDuration() != 365*24*time.Hour {
		t.Fatalf("AutoRotate requests %v, want one start with root_ttl 8760h", fake.autos)
	}
}

func TestRotateAutoInterruptLeavesRotationRunning(t *testing.T) {
	fake := &fakeRotation{}
	fake.autoFn = func(*controlplanev1.AutoRotateRequest) (*controlplanev1.AutoRotateResponse, error) {
		return &controlplanev1.AutoRotateResponse{Auto: &controlplanev1.AutoRotation{Running: true}}, nil
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	fake.statusFn = func(n int) (*controlplanev1.RotationStatusResponse, error) {
		if n == 3 {
			cancel() // Ctrl-C while following
		}
		return autoStatus([]*controlplanev1.StepTiming{stepAt("prepare", 0, 0)}, false, ""), nil
	}
	fx := newRotationFixture(t, fake)
	code, _, errOut := fx.strait(ctx, "ca", "rotate", "--auto")
	if code == 0 || !strings.Contains(errOut, "the rotation continues in the control plane; follow it with `strait ca rotate status`") {
		t.Fatalf("interrupted --auto: exit %d, stderr:\n%s", code, errOut)
	}
	if len(fake.autos) != 1 || fake.autos[0].GetCancel() {
		t.Fatalf("AutoRotate requests %v: an interrupt must not cancel the rotation", fake.autos)
	}

	// --cancel is what stops it.
	fake.autoFn = func(req *controlplanev1.AutoRotateRequest) (*controlplanev1.AutoRotateResponse, error) {
		return &controlplanev1.AutoRotateResponse{Auto: &controlplanev1.AutoRotation{Step: "activate"}}, nil
	}
	code, out, errOut := fx.strait(t.Context(), "ca", "rotate", "--auto", "--cancel")
	if code != 0 || !strings.Contains(out, "auto rotation cancelled; the steps taken stay taken (the last: activate)") {
		t.Fatalf("--auto --cancel: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	if len(fake.autos) != 2 || !fake.autos[1].GetCancel() {
		t.Fatalf("AutoRotate requests %v, want a cancel", fake.autos)
	}
}

func TestRotateAutoPersistentError(t *testing.T) {
	defer func(g time.Duration) { autoErrorGrace = g }(autoErrorGrace)
	autoErrorGrace = time.Second
	fake := &fakeRotation{}
	fake.autoFn = func(*controlplanev1.AutoRotateRequest) (*controlplanev1.AutoRotateResponse, error) {
		return &controlplanev1.AutoRotateResponse{Auto: &controlplanev1.AutoRotation{Running: true}}, nil
	}
	fake.statusFn = func(n int) (*controlplanev1.RotationStatusResponse, error) {
		if n == 1 {
			return rotStatus(1, true, "prepare"), nil
		}
		return autoStatus(nil, false, "prepare: create root: KMS unavailable"), nil
	}
	fx := newRotationFixture(t, fake)
	code, _, errOut := fx.strait(t.Context(), "ca", "rotate", "--auto")
	if code != 1 || strings.Count(errOut, "auto rotation: prepare: create root: KMS unavailable (the control plane retries)") != 1 ||
		!strings.Contains(errOut, "auto rotation failing for 1") || !strings.Contains(errOut, "--auto --cancel") {
		t.Fatalf("exit %d, stderr:\n%s", code, errOut)
	}
}

func TestRotateStatus(t *testing.T) {
	st := rotStatus(2, false, "activate once every cluster holds the new bundle",
		clusterAt("east", 2, 2, 3, 3, 3, ""),
		clusterAt("west", 2, 2, 5, 2, 5, "3 of 5 nodes hold an older bundle"),
		&controlplanev1.ClusterRotation{Report: &federationv1.RotationReport{Cluster: "south", BundleSequence: 1, BundleDigest: digest1, Nodes: 2, NodesBundleCurrent: 2, NodesSvidCurrent: 2},
			Waiting: "gateway link down"},
		&controlplanev1.ClusterRotation{Report: &federationv1.RotationReport{Cluster: "north"}})
	st.Auto = &controlplanev1.AutoRotation{Running: true, Step: "prepare", Started: timestamppb.New(autoBase)}
	fake := &fakeRotation{statusFn: func(int) (*controlplanev1.RotationStatusResponse, error) { return st, nil }}
	fx := newRotationFixture(t, fake)

	code, out, errOut := fx.strait(t.Context(), "ca", "rotate", "status")
	if code != 0 {
		t.Fatalf("status: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	for _, want := range []string{
		"cluster east (root authority)\n",
		"bundle sequence 2, digest " + digest2 + "\n",
		"ROOT  STATE     IN BUNDLE  FINGERPRINT           NOT AFTER\n",
		"r1    active    yes        sha256:0123456789ab…  2035-01-02 03:04Z\n",
		"r2    prepared  yes        sha256:fedcba987654…  2036-01-02 03:04Z\n",
		"CLUSTER  BUNDLE   SVIDS               WAITING\n",
		"east     in sync  3/3 on active root  -\n",
		"west     behind   5/5 on active root  3 of 5 nodes hold an older bundle\n",
		"south    behind   2/2 on active root  gateway link down\n",
		"north    unknown  -                   no rotation report yet\n",
		"next: activate once every cluster holds the new bundle (waiting)\n",
		"auto rotation: running, last step prepare, started 2030-05-06T07:08:09Z\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}

	code, out, errOut = fx.strait(t.Context(), "ca", "rotate", "status", "-o", "json")
	if code != 0 {
		t.Fatalf("status -o json: exit %d\nstderr: %s", code, errOut)
	}
	var got controlplanev1.RotationStatusResponse
	if err := protojson.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("status -o json is not protojson: %v\n%s", err, out)
	}
	if !proto.Equal(&got, st) {
		t.Fatalf("status -o json: got %v, want %v", &got, st)
	}
	if !regexp.MustCompile(`"bundleInSync":\s*false`).MatchString(out) {
		t.Errorf("status -o json leaves out unpopulated fields:\n%s", out)
	}
}

func TestRotateTarget(t *testing.T) {
	t.Setenv(configEnv, "")
	t.Setenv(dataDirEnv, "")
	fake := &fakeRotation{statusFn: func(int) (*controlplanev1.RotationStatusResponse, error) {
		return rotStatus(1, true, "prepare"), nil
	}}
	fx := newRotationFixture(t, fake)
	dir := filepath.Join(t.TempDir(), "ca")
	mustCLI(t, "ca", "init", "--trust-domain", "strait.example", "--data-dir", dir)

	for _, tc := range []struct {
		name     string
		env      map[string]string
		args     []string
		wantCode int
		want     string
	}{
		{"neither", nil, []string{"ca", "rotate", "prepare"}, 2, "--config/--context naming the root authority's control plane is required"},
		{"both on the command line", nil, []string{"ca", "rotate", "prepare", "--config", fx.config, "--data-dir", dir}, 2, "not both"},
		{"auto needs a control plane", nil, []string{"ca", "rotate", "--auto", "--data-dir", dir}, 2, "--auto needs the root authority's control plane"},
		{"cancel needs auto", nil, []string{"ca", "rotate", "--cancel", "--config", fx.config}, 2, "--cancel goes with --auto"},
		{"config env beats data dir env", map[string]string{configEnv: fx.config, dataDirEnv: dir}, []string{"ca", "rotate", "status"}, 0, "cluster east (root authority)"},
		{"data dir flag beats config env", map[string]string{configEnv: fx.config}, []string{"ca", "rotate", "status", "--data-dir", dir}, 0, "Trust domain:  strait.example"},
		{"data dir env alone", map[string]string{dataDirEnv: dir}, []string{"ca", "rotate", "prepare", "--root-ttl", "400d"}, 0, "prepare: done; bundle sequence 2"},
		{"unknown context", nil, []string{"ca", "rotate", "status", "--config", fx.config, "--context", "west"}, 1, `context "west" not found`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			code, out, errOut := cli(t, tc.args...)
			if code != tc.wantCode || !strings.Contains(out+errOut, tc.want) {
				t.Fatalf("exit %d, want %d mentioning %q\nstdout: %s\nstderr: %s", code, tc.wantCode, tc.want, out, errOut)
			}
		})
	}

	// A context that is not the root authority's is refused before any step.
	fake.statusFn = func(int) (*controlplanev1.RotationStatusResponse, error) {
		st := rotStatus(1, true, "")
		st.Cluster, st.RootAuthority = "west", false
		return st, nil
	}
	code, _, errOut := fx.strait(t.Context(), "ca", "rotate", "prepare")
	if code != 1 || !strings.Contains(errOut, "cluster west is not the root authority") || len(fake.rotates) != 0 {
		t.Fatalf("prepare on a non-authority: exit %d, %d Rotate calls, stderr:\n%s", code, len(fake.rotates), errOut)
	}
}
