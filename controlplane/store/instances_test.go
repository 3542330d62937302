package store

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
)

const (
	webID   = "spiffe://td/ns/shop/sa/web"
	otherID = "spiffe://td/ns/shop/sa/other"
)

func inst(name, id string) Instance {
	return Instance{
		Name: name, Service: "web", Namespace: "shop", Address: "10.0.0.1:15006",
		Protocol: controlplanev1.Protocol_PROTOCOL_HTTP, SPIFFEID: id, Health: controlplanev1.Health_HEALTH_HEALTHY,
	}
}

func TestInstanceOwnership(t *testing.T) {
	s, clk := openTest(t)
	first := clk.Now()
	if err := s.PutInstance(inst("web-0", webID)); err != nil {
		t.Fatalf("PutInstance: %v", err)
	}
	clk.Advance(time.Minute)

	// The owner may overwrite; Registered stays, LastSeen defaults to now.
	upd := inst("web-0", webID)
	upd.Address = "10.0.0.2:15006"
	if err := s.PutInstance(upd); err != nil {
		t.Fatalf("PutInstance by owner: %v", err)
	}
	got, err := s.GetInstance("web-0")
	if err != nil {
		t.Fatal(err)
	}
	if got.Address != "10.0.0.2:15006" || !got.Registered.Equal(first) || !got.LastSeen.Equal(clk.Now()) {
		t.Fatalf("after owner update: got %+v, want address 10.0.0.2:15006, registered %s, last seen %s", got, first, clk.Now())
	}

	rev := s.Revision()
	tests := []struct {
		name string
		op   func() error
		want error
	}{
		{"put by another identity", func() error { return s.PutInstance(inst("web-0", otherID)) }, ErrInstanceOwned},
		{"delete by another identity", func() error { return s.DeleteInstance("web-0", otherID) }, ErrInstanceOwned},
		{"health by another identity", func() error {
			return s.SetHealth("web-0", otherID, controlplanev1.Health_HEALTH_UNHEALTHY, clk.Now())
		}, ErrInstanceOwned},
		{"health of a missing instance", func() error {
			return s.SetHealth("web-9", webID, controlplanev1.Health_HEALTH_HEALTHY, clk.Now())
		}, ErrNotFound},
		{"delete a missing instance", func() error { return s.DeleteInstance("web-9", webID) }, ErrNotFound},
		{"put without SPIFFE ID", func() error { return s.PutInstance(inst("web-1", "")) }, ErrInvalid},
		{"put without name", func() error { return s.PutInstance(inst("", webID)) }, ErrInvalid},
		{"unspecified health", func() error {
			return s.SetHealth("web-0", webID, controlplanev1.Health_HEALTH_UNSPECIFIED, clk.Now())
		}, ErrInvalid},
		{"unknown health", func() error { return s.SetHealth("web-0", webID, 42, clk.Now()) }, ErrInvalid},
	}
	for _, tc := range tests {
		if err := tc.op(); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
	after, _ := s.GetInstance("web-0")
	if !sameInstance(after, got) {
		t.Fatalf("after refused operations: got %+v, want %+v unchanged", after, got)
	}
	if s.Revision() != rev {
		t.Fatalf("after refused operations: got revision %d, want %d", s.Revision(), rev)
	}

	if err := s.DeleteInstance("web-0", webID); err != nil {
		t.Fatalf("DeleteInstance by owner: %v", err)
	}
	// Once deleted, the name is free for anyone.
	if err := s.PutInstance(inst("web-0", otherID)); err != nil {
		t.Fatalf("PutInstance of a freed name: %v", err)
	}
}

func TestSetHealth(t *testing.T) {
	s, clk := openTest(t)
	if err := s.PutInstance(inst("web-0", webID)); err != nil {
		t.Fatal(err)
	}
	t0 := clk.Now()
	steps := []struct {
		name         string
		h            controlplanev1.Health
		at           time.Time
		wantLastSeen time.Time
		wantBump     bool
	}{
		{"heartbeat", controlplanev1.Health_HEALTH_HEALTHY, t0.Add(5 * time.Second), t0.Add(5 * time.Second), false},
		{"unhealthy", controlplanev1.Health_HEALTH_UNHEALTHY, t0.Add(10 * time.Second), t0.Add(10 * time.Second), true},
		{"late report does not move LastSeen back", controlplanev1.Health_HEALTH_UNHEALTHY, t0.Add(7 * time.Second), t0.Add(10 * time.Second), false},
		{"healthy again", controlplanev1.Health_HEALTH_HEALTHY, t0.Add(15 * time.Second), t0.Add(15 * time.Second), true},
	}
	for _, st := range steps {
		rev := s.Revision()
		if err := s.SetHealth("web-0", webID, st.h, st.at); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		got, err := s.GetInstance("web-0")
		if err != nil {
			t.Fatal(err)
		}
		if got.Health != st.h || !got.LastSeen.Equal(st.wantLastSeen) {
			t.Errorf("%s: got %s at %s, want %s at %s", st.name, got.Health, got.LastSeen, st.h, st.wantLastSeen)
		}
		if bumped := s.Revision() > rev; bumped != st.wantBump {
			t.Errorf("%s: got revision bumped %v, want %v", st.name, bumped, st.wantBump)
		}
	}
}

// TestConcurrentHeartbeats drives SetHealth from many goroutines, so bbolt
// batches them, and checks every report landed.
func TestConcurrentHeartbeats(t *testing.T) {
	s, clk := openTest(t)
	const n = 40
	for i := range n {
		if err := s.PutInstance(inst(fmt.Sprintf("web-%d", i), webID)); err != nil {
			t.Fatal(err)
		}
	}
	at := clk.Now().Add(time.Minute)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			h := controlplanev1.Health_HEALTH_HEALTHY
			if i%2 == 1 {
				h = controlplanev1.Health_HEALTH_UNHEALTHY
			}
			if err := s.SetHealth(fmt.Sprintf("web-%d", i), webID, h, at); err != nil {
				t.Error(err)
			}
		})
	}
	// One refused report in the mix must not disturb the others.
	wg.Go(func() {
		if err := s.SetHealth("web-0", otherID, controlplanev1.Health_HEALTH_UNHEALTHY, at); !errors.Is(err, ErrInstanceOwned) {
			t.Errorf("foreign report: got %v, want ErrInstanceOwned", err)
		}
	})
	wg.Wait()
	list, err := s.ListInstances()
	if err != nil || len(list) != n {
		t.Fatalf("ListInstances: got %d, %v; want %d", len(list), err, n)
	}
	unhealthy := 0
	for _, in := range list {
		if !in.LastSeen.Equal(at) {
			t.Errorf("%s: got last seen %s, want %s", in.Name, in.LastSeen, at)
		}
		if in.Health == controlplanev1.Health_HEALTH_UNHEALTHY {
			unhealthy++
		}
	}
	if unhealthy != n/2 {
		t.Errorf("got %d unhealthy, want %d", unhealthy, n/2)
	}
	// 20 health changes, one bump each (1 initial + n puts + n/2 changes).
	if got, want := s.Revision(), uint64(1+n+n/2); got != want {
		t.Errorf("revision: got %d, want %d", got, want)
	}
}
