package agent

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/ca/svid"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/client"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
	"github.com/straitmesh/strait/proxy"
)

// lockedBuffer is a log sink tests read while the agent writes.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// testAgent is an agent of cluster east linked to west and south, with a
// gateway SVID and the CA's bundle, and no control plane or QUIC.
func testAgent(t *testing.T) (*agent, *lockedBuffer) {
	t.Helper()
	c := catest.New(t, "example.org")
	creds, err := proxy.NewCredentials(c.Bundle().TrustDomain(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := creds.SetBundle(c.Bundle()); err != nil {
		t.Fatal(err)
	}
	if err := creds.SetSVID(c.SVID(t, "spiffe://example.org/cluster/east/gateway", time.Hour)); err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	a := &agent{
		cfg: Config{Cluster: "east", Node: "gateway", Creds: creds, Heartbeat: time.Hour, Clock: time.Now},
		log: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn})), clock: time.Now,
		cat: newCatalog(), out: newOutRelay(), peers: map[string]*peerState{}, wake: make(chan struct{}, 1),
	}
	a.cat.setSnapshot(&controlplanev1.GatewaySnapshot{Links: []*controlplanev1.Link{{Peer: "west"}, {Peer: "south"}}})
	return a, logs
}

func cert(n int) []byte { return bytes.Repeat([]byte{0x30}, n) }

func TestRelayBounds(t *testing.T) {
	for _, tc := range []struct {
		name string
		sb   *federationv1.SignedBundle
		ok   bool
	}{
		{"a JWS", &federationv1.SignedBundle{Jws: "a.b.c", Sequence: 2, Digest: "sha256:ab"}, true},
		{"64 KiB JWS", &federationv1.SignedBundle{Jws: strings.Repeat("a", maxSignedBundleJWS)}, true},
		{"no JWS", &federationv1.SignedBundle{Sequence: 2}, false},
		{"JWS over 64 KiB", &federationv1.SignedBundle{Jws: strings.Repeat("a", maxSignedBundleJWS+1)}, false},
		{"digest over 256 bytes", &federationv1.SignedBundle{Jws: "a.b.c", Digest: strings.Repeat("a", 257)}, false},
	} {
		if err := checkSignedBundle(tc.sb); (err == nil) != tc.ok {
			t.Errorf("signed bundle, %s: err = %v, want ok %v", tc.name, err, tc.ok)
		}
	}
	for _, tc := range []struct {
		name string
		iu   *federationv1.IntermediateUpdate
		ok   bool
	}{
		{"one certificate", &federationv1.IntermediateUpdate{Cluster: "east", Chain: [][]byte{cert(500)}}, true},
		{"four of 16 KiB", &federationv1.IntermediateUpdate{Cluster: "east", Chain: [][]byte{cert(16 << 10), cert(16 << 10), cert(16 << 10), cert(16 << 10)}}, true},
		{"another cluster", &federationv1.IntermediateUpdate{Cluster: "west", Chain: [][]byte{cert(500)}}, false},
		{"no cluster", &federationv1.IntermediateUpdate{Chain: [][]byte{cert(500)}}, false},
		{"no certificate", &federationv1.IntermediateUpdate{Cluster: "east"}, false},
		{"five certificates", &federationv1.IntermediateUpdate{Cluster: "east", Chain: [][]byte{cert(1), cert(1), cert(1), cert(1), cert(1)}}, false},
		{"a certificate over 16 KiB", &federationv1.IntermediateUpdate{Cluster: "east", Chain: [][]byte{cert(16<<10 + 1)}}, false},
		{"an empty certificate", &federationv1.IntermediateUpdate{Cluster: "east", Chain: [][]byte{cert(500), {}}}, false},
	} {
		if err := checkIntermediate(tc.iu, "east"); (err == nil) != tc.ok {
			t.Errorf("intermediate, %s: err = %v, want ok %v", tc.name, err, tc.ok)
		}
	}

	long := strings.Repeat("é", 200) // 400 bytes, two per character
	var behind []string
	for range 25 {
		behind = append(behind, long)
	}
	rr := &federationv1.RotationReport{Cluster: "west", BundleSequence: 3, Nodes: 5, Behind: behind, Generated: timestamppb.Now()}
	got, err := sanitizeRotation(rr, "west")
	if err != nil {
		t.Fatalf("rotation report: %v", err)
	}
	if len(got.GetBehind()) != maxBehind {
		t.Errorf("behind: %d entries kept, want %d", len(got.GetBehind()), maxBehind)
	}
	for i, b := range got.GetBehind() {
		if len(b) > maxBehindEntry || !utf8.ValidString(b) || !strings.HasPrefix(long, b) || len(b) < maxBehindEntry-1 {
			t.Fatalf("behind[%d]: %d bytes (valid UTF-8: %v), want a prefix of at most %d bytes", i, len(b), utf8.ValidString(b), maxBehindEntry)
		}
	}
	if len(rr.GetBehind()) != 25 || rr.GetBehind()[0] != long {
		t.Error("sanitizeRotation changed the message it was given")
	}
	if got.GetBundleSequence() != 3 || got.GetNodes() != 5 || !proto.Equal(got.GetGenerated(), rr.GetGenerated()) {
		t.Errorf("sanitized report lost fields: %v", got)
	}
	for name, bad := range map[string]*federationv1.RotationReport{
		"another cluster":            {Cluster: "south"},
		"bundle digest too long":     {Cluster: "west", BundleDigest: strings.Repeat("a", 257)},
		"intermediate too long":      {Cluster: "west", Intermediate: strings.Repeat("a", 257)},
		"intermediate root too long": {Cluster: "west", IntermediateRoot: strings.Repeat("a", 257)},
	} {
		if _, err := sanitizeRotation(bad, "west"); err == nil {
			t.Errorf("rotation report, %s: accepted", name)
		}
	}
}

// peerConn is the peer's end of a control stream this gateway serves.
type peerConn struct {
	t    *testing.T
	c    net.Conn
	seq  uint64
	done chan struct{} // serveControl returned
}

func serve(t *testing.T, a *agent, peer string) *peerConn {
	t.Helper()
	ours, theirs := net.Pipe()
	p := &peerConn{t: t, c: theirs, done: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { a.serveControl(ctx, peer, ours); close(p.done) }()
	t.Cleanup(func() {
		cancel()
		theirs.Close()
		<-p.done
	})
	p.send(&federationv1.ControlMessage{Msg: &federationv1.ControlMessage_Hello{Hello: &federationv1.Hello{Cluster: peer}}})
	return p
}

func (p *peerConn) send(m *federationv1.ControlMessage) {
	p.t.Helper()
	p.c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if err := writeControl(p.c, m); err != nil {
		p.t.Fatalf("send %v: %v", m, err)
	}
}

// sync sends a heartbeat and reads its ack: everything sent before was
// handled, and the stream is still up.
func (p *peerConn) sync() {
	p.t.Helper()
	p.seq++
	p.send(&federationv1.ControlMessage{Msg: &federationv1.ControlMessage_Heartbeat{Heartbeat: &federationv1.Heartbeat{Seq: p.seq}}})
	p.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var m federationv1.ControlMessage
	if err := readControl(p.c, &m); err != nil || m.GetHeartbeatAck().GetSeq() != p.seq {
		p.t.Fatalf("ack of heartbeat %d: %v, %v (stream ended?)", p.seq, &m, err)
	}
}

func drain(ch chan struct{}) {
	select {
	case <-ch:
	default:
	}
}

func poked(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func peerReport(t *testing.T, a *agent, peer string) *controlplanev1.PeerReport {
	t.Helper()
	for _, r := range a.report().GetPeers() {
		if r.GetPeer() == peer {
			return r
		}
	}
	t.Fatalf("no report for %s", peer)
	return nil
}

func signed(seq uint64, jws string) *federationv1.ControlMessage {
	return &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_SignedBundle{SignedBundle: &federationv1.SignedBundle{Jws: jws, Sequence: seq}}}
}

func intermediate(cluster string, chain ...[]byte) *federationv1.ControlMessage {
	return &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_Intermediate{Intermediate: &federationv1.IntermediateUpdate{Cluster: cluster, Chain: chain}}}
}

func rotation(r *federationv1.RotationReport) *federationv1.ControlMessage {
	return &federationv1.ControlMessage{Msg: &federationv1.ControlMessage_Rotation{Rotation: r}}
}

// What a peer relays on its control stream is bounded, the latest of each
// kept (a signed bundle only for a higher sequence), passed on in the
// report to the control plane, and a change pokes the report; nothing out
// of bounds or unknown ends the stream.
func TestServeControlRelay(t *testing.T) {
	a, logs := testAgent(t)
	p := serve(t, a, "west")
	p.sync()

	steps := []struct {
		name      string
		msg       *federationv1.ControlMessage
		wantPoke  bool
		wantJWS   string
		wantChain int
		wantNodes uint32
	}{
		{"signed bundle 2", signed(2, "jws-2"), true, "jws-2", 0, 0},
		{"an older signed bundle", signed(1, "jws-1"), false, "jws-2", 0, 0},
		{"the same again", signed(2, "jws-2"), false, "jws-2", 0, 0},
		{"another at the same sequence (a handover)", signed(2, "jws-2b"), true, "jws-2b", 0, 0},
		{"signed bundle 3", signed(3, "jws-3"), true, "jws-3", 0, 0},
		{"a JWS over 64 KiB", signed(9, strings.Repeat("a", maxSignedBundleJWS+1)), false, "jws-3", 0, 0},
		{"our intermediate", intermediate("east", cert(300)), true, "jws-3", 1, 0},
		{"the same again", intermediate("east", cert(300)), false, "jws-3", 1, 0},
		{"south's intermediate", intermediate("south", cert(300)), false, "jws-3", 1, 0},
		{"south's again", intermediate("south", cert(300)), false, "jws-3", 1, 0},
		{"five certificates", intermediate("east", cert(1), cert(1), cert(1), cert(1), cert(1)), false, "jws-3", 1, 0},
		{"a certificate over 16 KiB", intermediate("east", cert(16<<10+1)), false, "jws-3", 1, 0},
		{"a new chain", intermediate("east", cert(300), cert(400)), true, "jws-3", 2, 0},
		{"west's rotation", rotation(&federationv1.RotationReport{Cluster: "west", Nodes: 4}), true, "jws-3", 2, 4},
		{"the same again", rotation(&federationv1.RotationReport{Cluster: "west", Nodes: 4}), false, "jws-3", 2, 4},
		{"a rotation claiming south", rotation(&federationv1.RotationReport{Cluster: "south", Nodes: 9}), false, "jws-3", 2, 4},
		{"a changed rotation", rotation(&federationv1.RotationReport{Cluster: "west", Nodes: 5}), true, "jws-3", 2, 5},
	}
	for _, st := range steps {
		drain(a.wake)
		p.send(st.msg)
		p.sync()
		if got := poked(a.wake); got != st.wantPoke {
			t.Errorf("%s: report poked %v, want %v", st.name, got, st.wantPoke)
		}
		r := peerReport(t, a, "west")
		if r.GetSignedBundle().GetJws() != st.wantJWS || len(r.GetIntermediate().GetChain()) != st.wantChain || r.GetRotation().GetNodes() != st.wantNodes {
			t.Fatalf("%s: report has JWS %.10q, %d certificates, rotation of %d nodes; want %q, %d, %d", st.name,
				r.GetSignedBundle().GetJws(), len(r.GetIntermediate().GetChain()), r.GetRotation().GetNodes(), st.wantJWS, st.wantChain, st.wantNodes)
		}
	}
	if n := strings.Count(logs.String(), "level=WARN"); n != 1 {
		t.Errorf("misaddressed intermediates logged at warn %d times, want once:\n%s", n, logs)
	}
	for _, r := range a.report().GetPeers() {
		if r.GetPeer() != "west" && (r.GetSignedBundle() != nil || r.GetIntermediate() != nil || r.GetRotation() != nil) {
			t.Errorf("%s's report carries what west relayed: %v", r.GetPeer(), r)
		}
	}

	// A message of a kind this gateway does not know (a later version's)
	// is skipped, and unknown fields of a known one are not passed on.
	unknown := protowire.AppendTag(nil, 99, protowire.BytesType)
	unknown = protowire.AppendBytes(unknown, []byte("from the future"))
	writeRaw(t, p.c, unknown)
	sb, err := proto.Marshal(&federationv1.SignedBundle{Jws: "jws-4", Sequence: 4})
	if err != nil {
		t.Fatal(err)
	}
	sb = protowire.AppendTag(sb, 77, protowire.BytesType)
	sb = protowire.AppendBytes(sb, bytes.Repeat([]byte{1}, 1000))
	writeRaw(t, p.c, protowire.AppendBytes(protowire.AppendTag(nil, 6, protowire.BytesType), sb))
	p.sync()
	got := peerReport(t, a, "west").GetSignedBundle()
	if got.GetJws() != "jws-4" || len(got.ProtoReflect().GetUnknown()) != 0 {
		t.Fatalf("signed bundle with an unknown field: kept %v (unknown bytes %d), want jws-4 without them", got, len(got.ProtoReflect().GetUnknown()))
	}

	// A message that does not decode ends this stream only; what the peer
	// relayed stays for the report.
	writeRaw(t, p.c, []byte{0xff, 0xff, 0xff})
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		t.Fatal("a malformed message did not end the stream")
	}
	if r := peerReport(t, a, "west"); r.GetSignedBundle().GetJws() != "jws-4" || r.GetRotation().GetNodes() != 5 {
		t.Errorf("after the stream ended the report lost what west relayed: %v", r)
	}
	q := serve(t, a, "west")
	q.sync()
}

func writeRaw(t *testing.T, c net.Conn, body []byte) {
	t.Helper()
	frame := append([]byte{byte(len(body) >> 24), byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
	c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(frame); err != nil {
		t.Fatal(err)
	}
}

// The stream this gateway opens to a peer carries the control plane's
// signed bundle, the intermediate re-signed for that peer (not another's)
// and the rotation report: each when the stream starts and again only when
// it changes; a new stream carries them all again.
func TestRunControlRelays(t *testing.T) {
	a, _ := testAgent(t)
	snap := &controlplanev1.GatewaySnapshot{
		SignedBundle: &federationv1.SignedBundle{Jws: "jws-2", Sequence: 2},
		Intermediates: []*federationv1.IntermediateUpdate{
			{Cluster: "west", Chain: [][]byte{cert(300)}},
			{Cluster: "south", Chain: [][]byte{cert(400)}},
			{Cluster: "north", Chain: [][]byte{cert(16<<10 + 1)}}, // out of bounds: not relayed
		},
		Rotation: &federationv1.RotationReport{Cluster: "east", Nodes: 3},
	}
	if !a.out.set(snap, a.log) {
		t.Fatal("first snapshot: relay not changed")
	}
	if a.out.set(proto.Clone(snap).(*controlplanev1.GatewaySnapshot), a.log) {
		t.Fatal("the same snapshot again changed the relay")
	}

	open := func() (net.Conn, func()) {
		ours, theirs := net.Pipe()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- a.runControl(ctx, "west", ours, client.NewBackoff(time.Second, time.Second)) }()
		return theirs, func() {
			cancel()
			theirs.Close()
			<-done
		}
	}
	// read returns the kinds of messages up to the next heartbeat.
	read := func(c net.Conn) (kinds []string, got []*federationv1.ControlMessage) {
		t.Helper()
		for {
			var m federationv1.ControlMessage
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if err := readControl(c, &m); err != nil {
				t.Fatalf("read: %v (so far %v)", err, kinds)
			}
			switch {
			case m.GetHello() != nil:
				kinds = append(kinds, "hello")
			case m.GetCatalog() != nil:
				kinds = append(kinds, "catalog")
			case m.GetSignedBundle() != nil:
				kinds = append(kinds, "signed_bundle")
			case m.GetIntermediate() != nil:
				kinds = append(kinds, "intermediate:"+m.GetIntermediate().GetCluster())
			case m.GetRotation() != nil:
				kinds = append(kinds, "rotation")
			case m.GetHeartbeat() != nil:
				return kinds, got
			}
			got = append(got, &m)
		}
	}
	c, stop := open()
	kinds, _ := read(c)
	if want := "hello catalog signed_bundle intermediate:west rotation"; strings.Join(kinds, " ") != want {
		t.Fatalf("a new stream carried %v, want %s", kinds, want)
	}

	// Only the rotation report changes: only it is sent again.
	snap.Rotation = &federationv1.RotationReport{Cluster: "east", Nodes: 3, NodesBundleCurrent: 3}
	if !a.out.set(snap, a.log) {
		t.Fatal("changed rotation: relay not changed")
	}
	kinds, got := read(c)
	if strings.Join(kinds, " ") != "rotation" || got[0].GetRotation().GetNodesBundleCurrent() != 3 {
		t.Fatalf("after the rotation changed the stream carried %v, want the new rotation only", kinds)
	}
	// Another peer's intermediate changing sends nothing but a heartbeat.
	snap.Intermediates[1] = &federationv1.IntermediateUpdate{Cluster: "south", Chain: [][]byte{cert(401)}}
	a.out.set(snap, a.log)
	if kinds, _ := read(c); len(kinds) != 0 {
		t.Fatalf("after south's intermediate changed the stream to west carried %v, want nothing", kinds)
	}
	stop()

	c, stop = open()
	defer stop()
	kinds, _ = read(c)
	if want := "hello catalog signed_bundle intermediate:west rotation"; strings.Join(kinds, " ") != want {
		t.Fatalf("a second stream carried %v, want %s", kinds, want)
	}
}

// The report tells the control plane the bundle the gateway holds and who
// signed its SVID, and stays within bounds however much peers relay.
func TestReportIdentityAndBudget(t *testing.T) {
	a, _ := testAgent(t)
	req := a.report()
	if want := a.cfg.Creds.Bundle().Digest(); req.GetBundleDigest() != want {
		t.Errorf("bundle digest %q, want %q", req.GetBundleDigest(), want)
	}
	if want := svid.IssuerFingerprint(a.cfg.Creds.SVID().Certificates); req.GetSvidIssuer() != want || want == "" {
		t.Errorf("SVID issuer %q, want %q", req.GetSvidIssuer(), want)
	}

	// 64 peers (the control plane's limit) each relaying all it may.
	big := strings.Repeat("a", maxSignedBundleJWS)
	chain := [][]byte{cert(16 << 10), cert(16 << 10), cert(16 << 10), cert(16 << 10)}
	a.mu.Lock()
	for i := range 64 {
		ps := a.peer("peer-" + string(rune('a'+i/26)) + string(rune('a'+i%26)))
		ps.in.signed = &federationv1.SignedBundle{Jws: big, Sequence: 1}
		ps.in.intermediate = &federationv1.IntermediateUpdate{Cluster: "east", Chain: chain}
		ps.in.rotation = &federationv1.RotationReport{Cluster: "x", Behind: []string{strings.Repeat("b", maxBehindEntry)}}
	}
	a.mu.Unlock()
	req = a.report()
	if n := proto.Size(req); n > maxReportRelayBytes+64<<10 {
		t.Errorf("report of %d bytes, want at most about %d", n, maxReportRelayBytes)
	}
	if first := req.GetPeers()[0]; first.GetSignedBundle() == nil || first.GetIntermediate() == nil || first.GetRotation() == nil {
		t.Error("the first peer's relayed messages were left out")
	}
	if last := req.GetPeers()[len(req.GetPeers())-1]; last.GetSignedBundle() != nil {
		t.Error("no relayed message was left out of an oversize report")
	}
}
