package server

import (
	"strings"
	"testing"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

// The gateway reports the refusals it makes inside the join exchange:
// only this cluster's gateway may, and the joiner's claims it relays are
// cut short before they reach the log and the audit log.
func TestAuditJoinRefusal(t *testing.T) {
	e := newTestEnv(t)
	gw := "spiffe://" + testTD + "/cluster/" + testCluster + "/gateway"
	for _, tc := range []struct {
		caller string
		ok     bool
	}{
		{gw, true},
		{"spiffe://" + testTD + "/cluster/elsewhere/gateway", false},
		{"spiffe://" + testTD + "/cluster/" + testCluster + "/admin", false},
		{"", false},
	} {
		err := e.srv.authorize(withCaller(t.Context(), tc.caller), controlplanev1.FederationService_AuditJoinRefusal_FullMethodName)
		if (err == nil) != tc.ok {
			t.Errorf("AuditJoinRefusal by %q: %v, want ok=%v", tc.caller, err, tc.ok)
		}
	}
	big := strings.Repeat("é", 40000)
	if _, err := (federationServer{s: e.srv}).AuditJoinRefusal(withCaller(t.Context(), gw), &controlplanev1.AuditJoinRefusalRequest{
		TokenId: big, Cluster: big, Remote: big, Reason: big, Detail: big}); err != nil {
		t.Fatal(err)
	}
	if _, err := (federationServer{s: e.srv}).AuditJoinRefusal(withCaller(t.Context(), gw), &controlplanev1.AuditJoinRefusalRequest{
		TokenId: "t", Cluster: "west", Remote: "192.0.2.1:1", Reason: "malformed", Detail: "the request names cluster \"south\", its hello \"west\""}); err != nil {
		t.Fatal(err)
	}
	events, err := e.store.AuditLog(10)
	if err != nil || len(events) != 2 {
		t.Fatalf("audit log: %+v, %v", events, err)
	}
	if ev := events[0]; ev.Event != "join-refused" || len(ev.TokenID)+len(ev.Peer)+len(ev.Remote)+len(ev.Detail) > 1024 {
		t.Errorf("audited refusal holds %d bytes of the caller's input", len(ev.TokenID)+len(ev.Peer)+len(ev.Remote)+len(ev.Detail))
	}
	if ev := events[1]; ev.Event != "join-refused" || ev.Peer != "west" || ev.TokenID != "t" || ev.Remote != "192.0.2.1:1" ||
		!strings.Contains(ev.Detail, "malformed") || !strings.Contains(ev.Detail, "its hello") {
		t.Errorf("audited refusal %+v", ev)
	}
}
