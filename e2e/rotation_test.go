package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/local"
	"github.com/straitmesh/strait/internal/wiring"
)

// rotationMesh is three linked clusters: east (the root authority) runs a
// frontend whose only backends are in west and south, so every request
// crosses a gateway and both ends verify chains from another cluster.
type rotationMesh struct {
	east, west, south *cluster
	fe                *workload
	backends          map[string]*workload
	gateways          map[string]*gatewayProc
}

func newRotationMesh(t *testing.T) *rotationMesh {
	t.Helper()
	m := &rotationMesh{backends: map[string]*workload{}, gateways: map[string]*gatewayProc{}}
	m.east = newCluster(t, "east", clusterOptions{rootAuthority: true})
	m.west = newCluster(t, "west", clusterOptions{meshOf: m.east})
	m.south = newCluster(t, "south", clusterOptions{meshOf: m.east})
	m.gateways["east"] = m.east.startGateway("")
	for _, c := range []*cluster{m.west, m.south} {
		m.gateways[c.name] = c.startGateway("")
		m.backends[c.name] = c.workload("backend-"+c.name[:1]+"0", "backend", workloadOptions{})
		c.mustApply(exportBackend)
		if _, err := c.join(m.east.joinToken(c.name)); err != nil {
			t.Fatalf("%s joins east: %v", c.name, err)
		}
	}
	m.east.linkUp("west", 1)
	m.east.linkUp("south", 1)
	m.fe = m.east.workload("frontend-e0", "frontend", workloadOptions{upstreams: []string{"backend"}})
	m.fe.waitEndpoints(t, "backend", 2)
	return m
}

func (c *cluster) rotation() controlplanev1.RotationServiceClient {
	return controlplanev1.NewRotationServiceClient(c.conn)
}

// rotationStatus asks c, dialling again with the admin credentials on disk
// if the ones in use stopped verifying (they are re-issued under the new
// root during a rotation).
func (c *cluster) rotationStatus() (*controlplanev1.RotationStatusResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	st, err := c.rotation().RotationStatus(ctx, &controlplanev1.RotationStatusRequest{})
	if status.Code(err) == codes.Unauthenticated || status.Code(err) == codes.Unavailable {
		c.dialAdmin()
	}
	return st, err
}

// waitReady waits until the root authority's status says the next step
// (prefix) may be taken.
func (c *cluster) waitReady(t *testing.T, prefix string, timeout time.Duration) *controlplanev1.RotationStatusResponse {
	t.Helper()
	var st *controlplanev1.RotationStatusResponse
	waitUntil(t, timeout, "rotation ready for "+prefix, func() bool {
		cur, err := c.rotationStatus()
		if err != nil {
			return false
		}
		st = cur
		logProgress(t, cur)
		return cur.GetReady() && strings.HasPrefix(cur.GetNext(), prefix)
	})
	return st
}

// logProgress logs what a rotation waits for, when it changes.
func logProgress(t *testing.T, st *controlplanev1.RotationStatusResponse) {
	line := st.GetNext() + " " + st.GetAuto().GetLastError()
	for _, c := range st.GetClusters() {
		if c.GetWaiting() != "" {
			line += " | " + c.GetReport().GetCluster() + ": " + c.GetWaiting()
		}
	}
	if line != lastProgress[t.Name()] {
		lastProgress[t.Name()] = line
		t.Logf("%s rotation: %s", time.Now().Format("15:04:05.000"), line)
	}
}

var lastProgress = map[string]string{}

func (c *cluster) rotate(t *testing.T, step, root string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.rotation().Rotate(ctx, &controlplanev1.RotateRequest{Step: step, RootId: root}); err != nil {
		t.Fatalf("rotate %s: %v", step, err)
	}
}

func rootIn(st *controlplanev1.RotationStatusResponse, state string) *controlplanev1.RootInfo {
	for _, r := range st.GetRoots() {
		if r.GetState() == state {
			return r
		}
	}
	return nil
}

// checkOnRoot checks that every cluster holds exactly the given roots and
// that its nodes present SVIDs chained to the active one.
func (m *rotationMesh) checkOnRoot(t *testing.T, st *controlplanev1.RotationStatusResponse) {
	t.Helper()
	active := rootIn(st, "active")
	for _, cr := range st.GetClusters() {
		r := cr.GetReport()
		if r.GetBundleDigest() != st.GetBundleDigest() || r.GetIntermediateRoot() != active.GetFingerprint() ||
			r.GetNodesBundleCurrent() != r.GetNodes() || r.GetNodesSvidCurrent() != r.GetNodes() || r.GetNodes() == 0 {
			t.Errorf("cluster %s not on the active root: %+v (waiting: %s)", r.GetCluster(), r, cr.GetWaiting())
		}
	}
	chain := m.fe.sc.Credentials().SVID().Certificates
	if got := svid.IssuerFingerprint(chain); got != st.GetClusters()[0].GetReport().GetIntermediate() {
		t.Errorf("east's frontend presents an SVID from %s, want the current intermediate", got)
	}
}

func TestRotationAcrossClustersUnderLoad(t *testing.T) {
	m := newRotationMesh(t)
	before := m.east.waitReady(t, "prepare", 20*time.Second)
	oldRoot := rootIn(before, "active")
	l := startLoad(m.fe.url("backend"), 4, 90*time.Second)

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if _, err := m.east.rotation().AutoRotate(ctx, &controlplanev1.AutoRotateRequest{}); err != nil {
		t.Fatalf("auto rotate: %v", err)
	}
	cancel()
	var st *controlplanev1.RotationStatusResponse
	waitUntil(t, 60*time.Second, "the automatic rotation is done", func() bool {
		cur, err := m.east.rotationStatus()
		if err != nil {
			return false
		}
		st = cur
		logProgress(t, cur)
		return cur.GetAuto().GetDone()
	})
	took := time.Since(start)
	time.Sleep(500 * time.Millisecond) // traffic after the last step
	ok, fail, errs := l.finish()
	for _, s := range st.GetAuto().GetSteps() {
		t.Logf("step %-8s acknowledged everywhere after %v", s.GetStep(), s.GetAcknowledged().AsTime().Sub(s.GetTaken().AsTime()).Round(time.Millisecond))
	}
	t.Logf("rotation took %v; %d requests, %d failed", took.Round(time.Millisecond), ok, fail)
	if fail != 0 || ok == 0 {
		t.Fatalf("%d of %d requests failed during the rotation: %v", fail, ok+fail, errs)
	}
	if r := rootIn(st, "active"); r == nil || r.GetId() == oldRoot.GetId() {
		t.Fatalf("active root after the rotation: %v (before: %s)", r, oldRoot.GetId())
	}
	for _, r := range st.GetRoots() {
		if r.GetInBundle() && r.GetState() != "active" {
			t.Errorf("root %s (%s) still in the bundle after retire", r.GetId(), r.GetState())
		}
	}
	m.checkOnRoot(t, st)
	// Each cluster's data directory holds the new bundle and intermediate.
	for _, c := range []*cluster{m.east, m.west, m.south} {
		d, err := local.Load(c.path)
		if err != nil {
			t.Fatal(err)
		}
		if d.Bundle.Digest() != st.GetBundleDigest() {
			t.Errorf("%s's data directory holds bundle %s, want %s", c.name, d.Bundle.Digest(), st.GetBundleDigest())
		}
	}
	// Calls still work, with the caller's identity verified end to end.
	code, r, err := get(&http.Client{Timeout: 5 * time.Second}, m.fe.url("backend"))
	if err != nil || code != http.StatusOK || r.Caller != "spiffe://"+trustDomain+"/ns/default/sa/frontend" {
		t.Fatalf("call after the rotation: %d %+v %v", code, r, err)
	}
}

func TestRotationWaitsForRootAuthority(t *testing.T) {
	m := newRotationMesh(t)
	m.east.waitReady(t, "prepare", 20*time.Second)
	l := startLoad(m.fe.url("backend"), 2, 90*time.Second)
	m.east.rotate(t, "prepare", "")
	// The root authority goes away right after prepare: nothing breaks,
	// nothing moves on.
	m.east.stopControlPlane()
	time.Sleep(3 * time.Second)
	m.east.startControlPlane()
	m.east.dialAdmin()
	st := m.east.waitReady(t, "activate", 30*time.Second)
	if rootIn(st, "prepared") == nil {
		t.Fatalf("no prepared root after the restart: %v", st.GetRoots())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := m.east.rotation().AutoRotate(ctx, &controlplanev1.AutoRotateRequest{}); err != nil {
		t.Fatalf("auto rotate from prepared: %v", err)
	}
	waitUntil(t, 60*time.Second, "the rotation finishes after the root authority is back", func() bool {
		cur, err := m.east.rotationStatus()
		if err == nil {
			st = cur
		}
		return err == nil && cur.GetAuto().GetDone()
	})
	ok, fail, errs := l.finish()
	t.Logf("%d requests, %d failed", ok, fail)
	if fail != 0 || ok == 0 {
		t.Fatalf("%d of %d requests failed: %v", fail, ok+fail, errs)
	}
	m.checkOnRoot(t, st)
}

// TestRotationGateRefusesEarlyStep: activate before everyone holds the
// prepared root is refused with who is behind.
func TestRotationGateRefusesEarlyStep(t *testing.T) {
	m := newRotationMesh(t)
	m.east.waitReady(t, "prepare", 20*time.Second)
	// south's gateway away: south cannot acknowledge.
	m.gateways["south"].stop()
	m.east.rotate(t, "prepare", "")
	time.Sleep(time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := m.east.rotation().Rotate(ctx, &controlplanev1.RotateRequest{Step: "activate"})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "south") {
		t.Fatalf("activate with south behind: %v; want FailedPrecondition naming south", err)
	}
}

// TestTaintAndRevokeCutOpenConnections: a caller holding an SVID chained
// to a compromised root keeps a connection open to west's backend; after
// prepare, activate, taint and revoke, that connection is closed and a new
// one is refused, while the mesh's own traffic carries on.
func TestTaintAndRevokeCutOpenConnections(t *testing.T) {
	m := newRotationMesh(t)
	m.east.waitReady(t, "prepare", 20*time.Second)
	// An SVID under the root about to be compromised, for an identity
	// west's backend accepts (no AuthorizationPolicy: any mesh member).
	iss, err := wiring.NewIssuer(m.east.dir, 0)
	if err != nil {
		t.Fatal(err)
	}
	stolen, err := iss.MintSVID(spiffeid.RequireFromString("spiffe://"+trustDomain+"/ns/default/sa/intruder"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	inbound := m.backends["west"].sc.Addrs().Inbound
	dial := func() (*tls.Conn, *bufio.Reader, error) {
		conn, err := tls.Dial("tcp", inbound, &tls.Config{Certificates: []tls.Certificate{tlsCert(stolen)}, InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
		if err != nil {
			return nil, nil, err
		}
		return conn, bufio.NewReader(conn), nil
	}
	call := func(conn *tls.Conn, br *bufio.Reader) error {
		conn.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: backend\r\n\r\n"); err != nil {
			return err
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	conn, br, err := dial()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := call(conn, br); err != nil {
		t.Fatalf("a call with an SVID under the current root: %v", err)
	}

	l := startLoad(m.fe.url("backend"), 2, 90*time.Second)
	m.east.rotate(t, "prepare", "")
	m.east.waitReady(t, "activate", 30*time.Second)
	m.east.rotate(t, "activate", "")
	st := m.east.waitReady(t, "retire", 30*time.Second)
	old := rootIn(st, "old")
	m.east.rotate(t, "taint", old.GetId())
	if err := call(conn, br); err != nil {
		t.Fatalf("taint alone should not cut anything yet: %v", err)
	}
	revoked := time.Now()
	m.east.rotate(t, "revoke", old.GetId())
	// The open connection is cut once west holds the new bundle.
	waitUntil(t, 10*time.Second, "the connection under the revoked root is cut", func() bool {
		return call(conn, br) != nil
	})
	t.Logf("open connection cut %v after revoke", time.Since(revoked).Round(time.Millisecond))
	if c2, br2, err := dial(); err == nil {
		if call(c2, br2) == nil {
			t.Fatal("a new connection with an SVID under the revoked root was accepted")
		}
		c2.Close()
	}
	m.east.waitReady(t, "prepare", 30*time.Second)
	ok, fail, errs := l.finish()
	t.Logf("%d requests, %d failed", ok, fail)
	if fail != 0 || ok == 0 {
		t.Fatalf("%d of %d mesh requests failed: %v", fail, ok+fail, errs)
	}
}
