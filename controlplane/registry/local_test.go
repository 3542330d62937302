package registry

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/store"
)

var (
	webID   = spiffeid.RequireFromString("spiffe://strait.example/ns/shop/sa/web")
	otherID = spiffeid.RequireFromString("spiffe://strait.example/ns/shop/sa/other")
	billID  = spiffeid.RequireFromString("spiffe://strait.example/ns/billing/sa/web")
	gwID    = spiffeid.RequireFromString("spiffe://strait.example/cluster/east/gateway")
)

const (
	healthy   = controlplanev1.Health_HEALTH_HEALTHY
	unhealthy = controlplanev1.Health_HEALTH_UNHEALTHY
	unknown   = controlplanev1.Health_HEALTH_UNKNOWN
)

func web(name string) Instance {
	return Instance{Name: name, Service: "web", Namespace: "shop", Address: "10.0.0.1:15006", Region: "eu-west-1", Zone: "eu-west-1a"}
}

func openStore(t *testing.T, path string) *store.Store {
	t.Helper()
	st, err := store.Open(path, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func newLocal(t *testing.T, lease time.Duration) *Local {
	t.Helper()
	l, err := NewLocal(LocalConfig{Store: openStore(t, filepath.Join(t.TempDir(), "state.db")), Cluster: "east", Lease: lease, Logger: slog.New(slog.NewTextHandler(t.Output(), nil))})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func register(t *testing.T, l *Local, inst Instance, caller spiffeid.ID) {
	t.Helper()
	if err := l.Register(t.Context(), inst, caller); err != nil {
		t.Fatalf("Register(%s): %v", inst.Name, err)
	}
}

// fired drains Changed and reports whether it had fired.
func fired(l *Local) bool {
	select {
	case <-l.Changed():
		return true
	default:
		return false
	}
}

func healthOf(t *testing.T, l *Local, name string) controlplanev1.Health {
	t.Helper()
	list, err := l.Instances(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range list {
		if in.Name == name {
			return in.Health
		}
	}
	t.Fatalf("instance %s not listed", name)
	return 0
}

func TestNewLocalConfig(t *testing.T) {
	st := openStore(t, filepath.Join(t.TempDir(), "state.db"))
	tests := []struct {
		name    string
		cfg     LocalConfig
		wantErr string
	}{
		{"defaults", LocalConfig{Store: st, Cluster: "east"}, ""},
		{"no store", LocalConfig{Cluster: "east"}, "Store"},
		{"no cluster", LocalConfig{Store: st}, "Cluster"},
		{"bad cluster", LocalConfig{Store: st, Cluster: "East"}, "Cluster"},
		{"negative lease", LocalConfig{Store: st, Cluster: "east", Lease: -time.Second}, "Lease"},
	}
	for _, tc := range tests {
		l, err := NewLocal(tc.cfg)
		if tc.wantErr == "" {
			if err != nil {
				t.Errorf("%s: got %v, want no error", tc.name, err)
			} else if l.Lease() != DefaultLease {
				t.Errorf("%s: got lease %s, want %s", tc.name, l.Lease(), DefaultLease)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("%s: got %v, want an error naming %s", tc.name, err, tc.wantErr)
		}
	}
}

func TestRegisterValidation(t *testing.T) {
	l := newLocal(t, 0)
	with := func(f func(*Instance)) Instance {
		in := web("web-0")
		f(&in)
		return in
	}
	tests := []struct {
		name      string
		inst      Instance
		caller    spiffeid.ID // zero means webID, unless anonymous
		anonymous bool
		wantField string // a *FieldError for this field
		wantErr   error  // or this error
	}{
		{name: "no name", inst: with(func(i *Instance) { i.Name = "" }), wantField: "name"},
		{name: "upper-case name", inst: with(func(i *Instance) { i.Name = "Web-0" }), wantField: "name"},
		{name: "dotted name", inst: with(func(i *Instance) { i.Name = "web.0" }), wantField: "name"},
		{name: "long name", inst: with(func(i *Instance) { i.Name = strings.Repeat("a", 64) }), wantField: "name"},
		{name: "no service", inst: with(func(i *Instance) { i.Service = "" }), wantField: "service"},
		{name: "bad service", inst: with(func(i *Instance) { i.Service = "web_svc" }), wantField: "service"},
		{name: "no namespace", inst: with(func(i *Instance) { i.Namespace = "" }), wantField: "namespace"},
		{name: "bad namespace", inst: with(func(i *Instance) { i.Namespace = "-shop" }), wantField: "namespace"},
		{name: "no address", inst: with(func(i *Instance) { i.Address = "" }), wantField: "address"},
		{name: "no port", inst: with(func(i *Instance) { i.Address = "10.0.0.1" }), wantField: "address"},
		{name: "named port", inst: with(func(i *Instance) { i.Address = "10.0.0.1:http" }), wantField: "address"},
		{name: "port 0", inst: with(func(i *Instance) { i.Address = "10.0.0.1:0" }), wantField: "address"},
		{name: "port too big", inst: with(func(i *Instance) { i.Address = "10.0.0.1:65536" }), wantField: "address"},
		{name: "port with leading zero", inst: with(func(i *Instance) { i.Address = "10.0.0.1:0443" }), wantField: "address"},
		{name: "hostname", inst: with(func(i *Instance) { i.Address = "web.example:443" }), wantField: "address"},
		{name: "unspecified host", inst: with(func(i *Instance) { i.Address = "0.0.0.0:443" }), wantField: "address"},
		{name: "IPv6 zone", inst: with(func(i *Instance) { i.Address = "[fe80::1%eth0]:443" }), wantField: "address"},
		{name: "unbracketed IPv6", inst: with(func(i *Instance) { i.Address = "::1:443" }), wantField: "address"},
		{name: "unknown protocol", inst: with(func(i *Instance) { i.Protocol = 9 }), wantField: "protocol"},
		{name: "bad region", inst: with(func(i *Instance) { i.Region = "EU West" }), wantField: "region"},
		{name: "bad zone", inst: with(func(i *Instance) { i.Zone = "a/b" }), wantField: "zone"},
		{name: "other namespace", inst: web("web-0"), caller: billID, wantErr: ErrPermissionDenied},
		{name: "gateway caller", inst: web("web-0"), caller: gwID, wantErr: ErrPermissionDenied},
		{name: "no caller", inst: web("web-0"), anonymous: true, wantErr: ErrPermissionDenied},
		{name: "IPv6", inst: with(func(i *Instance) { i.Address = "[2001:db8::1]:15006" })},
		{name: "localhost", inst: with(func(i *Instance) { i.Address = "localhost:15006" })},
		{name: "no locality", inst: with(func(i *Instance) { i.Region, i.Zone = "", "" })},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			caller := tc.caller
			if caller.IsZero() && !tc.anonymous {
				caller = webID
			}
			err := l.Register(t.Context(), tc.inst, caller)
			switch {
			case tc.wantField != "":
				var fe *FieldError
				if !errors.As(err, &fe) || fe.Field != tc.wantField || !errors.Is(err, ErrInvalid) {
					t.Fatalf("got %v, want an invalid %s", err, tc.wantField)
				}
				if !strings.Contains(err.Error(), tc.wantField) {
					t.Fatalf("got message %q, want it to name %s", err, tc.wantField)
				}
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("got %v, want %v", err, tc.wantErr)
				}
			default:
				if err != nil {
					t.Fatalf("got %v, want no error", err)
				}
			}
		})
	}
	if list, _ := l.Instances(t.Context()); len(list) != 1 {
		t.Fatalf("after the table: got %d instances, want only the valid web-0", len(list))
	}
}

func TestRegisterAndList(t *testing.T) {
	l := newLocal(t, 0)
	in := web("web-0")
	in.SPIFFEID = "spiffe://evil.example/ns/shop/sa/admin" // ignored
	in.Cluster = "west"                                    // ignored
	register(t, l, in, webID)
	if !fired(l) {
		t.Error("Register: got no Changed, want one")
	}
	tcp := web("db-0")
	tcp.Service, tcp.Protocol, tcp.Region, tcp.Zone = "db", controlplanev1.Protocol_PROTOCOL_TCP, "", ""
	register(t, l, tcp, otherID)

	list, err := l.Instances(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	want := []Instance{
		{Name: "db-0", Service: "db", Namespace: "shop", Address: "10.0.0.1:15006", Cluster: "east", SPIFFEID: otherID.String(),
			Protocol: controlplanev1.Protocol_PROTOCOL_TCP, Health: healthy},
		{Name: "web-0", Service: "web", Namespace: "shop", Address: "10.0.0.1:15006", Cluster: "east", SPIFFEID: webID.String(),
			Protocol: controlplanev1.Protocol_PROTOCOL_HTTP, Region: "eu-west-1", Zone: "eu-west-1a", Health: healthy},
	}
	if len(list) != len(want) {
		t.Fatalf("got %d instances, want %d", len(list), len(want))
	}
	for i := range want {
		if list[i] != want[i] {
			t.Errorf("instance %d: got %+v, want %+v", i, list[i], want[i])
		}
	}

	ep := ToEndpoint(list[1])
	if ep.GetInstance() != "web-0" || ep.GetAddress() != "10.0.0.1:15006" || ep.GetCluster() != "east" ||
		ep.GetHealth() != healthy || ep.GetSpiffeId() != webID.String() ||
		ep.GetLocality().GetRegion() != "eu-west-1" || ep.GetLocality().GetZone() != "eu-west-1a" {
		t.Errorf("ToEndpoint: got %v", ep)
	}
	if ep := ToEndpoint(list[0]); ep.GetLocality() != nil {
		t.Errorf("ToEndpoint without locality: got locality %v, want nil", ep.GetLocality())
	}
}

func TestOwnership(t *testing.T) {
	l := newLocal(t, 0)
	ctx := t.Context()
	register(t, l, web("web-0"), webID)
	tests := []struct {
		name string
		op   func() error
		want error
	}{
		{"register over another's instance", func() error { return l.Register(ctx, web("web-0"), otherID) }, store.ErrInstanceOwned},
		{"report on another's instance", func() error { return l.ReportHealth(ctx, "web-0", unhealthy, otherID) }, store.ErrInstanceOwned},
		{"deregister another's instance", func() error { return l.Deregister(ctx, "web-0", otherID) }, store.ErrInstanceOwned},
		{"report on a missing instance", func() error { return l.ReportHealth(ctx, "web-9", healthy, webID) }, store.ErrNotFound},
		{"deregister a missing instance", func() error { return l.Deregister(ctx, "web-9", webID) }, store.ErrNotFound},
		{"report as a gateway", func() error { return l.ReportHealth(ctx, "web-0", healthy, gwID) }, ErrPermissionDenied},
		{"report UNKNOWN", func() error { return l.ReportHealth(ctx, "web-0", unknown, webID) }, ErrInvalid},
		{"report with a bad name", func() error { return l.ReportHealth(ctx, "Web", healthy, webID) }, ErrInvalid},
	}
	for _, tc := range tests {
		if err := tc.op(); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}
	if got := healthOf(t, l, "web-0"); got != healthy {
		t.Fatalf("after refused operations: got %s, want HEALTHY", got)
	}
	if err := l.Deregister(ctx, "web-0", webID); err != nil {
		t.Fatalf("Deregister by the owner: %v", err)
	}
	if list, _ := l.Instances(ctx); len(list) != 0 {
		t.Fatalf("after Deregister: got %d instances, want 0", len(list))
	}
}

func TestReportHealthFiresChangedOnlyOnChange(t *testing.T) {
	l := newLocal(t, time.Hour)
	ctx := t.Context()
	register(t, l, web("web-0"), webID)
	fired(l)
	steps := []struct {
		h    controlplanev1.Health
		want bool
	}{{healthy, false}, {unhealthy, true}, {unhealthy, false}, {healthy, true}}
	for i, st := range steps {
		if err := l.ReportHealth(ctx, "web-0", st.h, webID); err != nil {
			t.Fatal(err)
		}
		if got := fired(l); got != st.want {
			t.Errorf("report %d (%s): got Changed %v, want %v", i, st.h, got, st.want)
		}
		if got := healthOf(t, l, "web-0"); got != st.h {
			t.Errorf("report %d: got health %s, want %s", i, got, st.h)
		}
	}
}

// TestLeaseLapse runs in a synctest bubble, so time only moves when every
// goroutine waits: the lease runs out exactly when the test says.
func TestLeaseLapse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const lease = 15 * time.Second
		l := newLocal(t, lease)
		ctx, cancel := context.WithCancel(t.Context())
		var wg sync.WaitGroup
		wg.Go(func() {
			if err := l.Run(ctx); err != nil {
				t.Errorf("Run: %v", err)
			}
		})
		defer func() { cancel(); wg.Wait() }()

		register(t, l, web("web-0"), webID)
		register(t, l, web("web-1"), webID)
		synctest.Wait()
		fired(l)

		// web-0 keeps reporting; web-1 goes quiet.
		var lastReport time.Time
		for range 3 {
			time.Sleep(lease / 2)
			lastReport = time.Now() // the report takes a batch window (10ms) to commit
			if err := l.ReportHealth(ctx, "web-0", healthy, webID); err != nil {
				t.Fatal(err)
			}
			synctest.Wait()
		}
		// 1.5 leases have passed: web-1 lapsed at 1 lease and Run noticed.
		if !fired(l) {
			t.Fatal("after web-1's lease ran out: got no Changed, want one")
		}
		if got := healthOf(t, l, "web-1"); got != unknown {
			t.Fatalf("web-1 after its lease: got %s, want HEALTH_UNKNOWN", got)
		}
		if got := healthOf(t, l, "web-0"); got != healthy {
			t.Fatalf("web-0, reporting: got %s, want HEALTHY", got)
		}

		// Exactly at the lease boundary the instance is lapsed, and Changed
		// fires then (not a timer tick later).
		time.Sleep(time.Until(lastReport.Add(lease)) - time.Nanosecond)
		synctest.Wait()
		if fired(l) {
			t.Fatal("just before web-0's lease ran out: got Changed, want none")
		}
		if got := healthOf(t, l, "web-0"); got != healthy {
			t.Fatalf("web-0 just before its lease ran out: got %s, want HEALTHY", got)
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait()
		if !fired(l) {
			t.Fatal("when web-0's lease ran out: got no Changed, want one")
		}
		if got := healthOf(t, l, "web-0"); got != unknown {
			t.Fatalf("web-0 after its lease: got %s, want HEALTH_UNKNOWN", got)
		}

		// A lapsed instance that reports again is back, with a Changed, and
		// lapses again a lease later.
		if err := l.ReportHealth(ctx, "web-1", healthy, webID); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if !fired(l) {
			t.Fatal("web-1 reporting again: got no Changed, want one")
		}
		if got := healthOf(t, l, "web-1"); got != healthy {
			t.Fatalf("web-1 reporting again: got %s, want HEALTHY", got)
		}
		time.Sleep(lease)
		synctest.Wait()
		if !fired(l) {
			t.Fatal("web-1 lapsing again: got no Changed, want one")
		}
		if got := healthOf(t, l, "web-1"); got != unknown {
			t.Fatalf("web-1 lapsing again: got %s, want HEALTH_UNKNOWN", got)
		}

		// Lapsed for DefaultReap, they are removed (a crashed sidecar never
		// deregisters).
		time.Sleep(DefaultReap)
		synctest.Wait()
		if !fired(l) {
			t.Fatal("instances lapsed for DefaultReap: got no Changed, want one")
		}
		if insts, err := l.Instances(ctx); err != nil || len(insts) != 0 {
			t.Fatalf("instances lapsed for DefaultReap: got %v (%v), want none", insts, err)
		}

		// Nothing is left to expire: Run sleeps until the registry changes.
		time.Sleep(time.Hour)
		synctest.Wait()
		if fired(l) {
			t.Fatal("with every lease lapsed: got Changed, want none")
		}
	})
}

// TestRegistryDurable checks that instances survive a restart, and that an
// instance whose lease ran out while the control plane was down is reported
// lapsed by the new Run.
func TestRegistryDurable(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		st := openStore(t, path)
		l, err := NewLocal(LocalConfig{Store: st, Cluster: "east", Lease: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		register(t, l, web("web-0"), webID)
		if err := l.ReportHealth(t.Context(), "web-0", unhealthy, webID); err != nil {
			t.Fatal(err)
		}
		st.Close()

		st = openStore(t, path)
		l, err = NewLocal(LocalConfig{Store: st, Cluster: "east", Lease: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if got := healthOf(t, l, "web-0"); got != unhealthy {
			t.Fatalf("after reopen: got %s, want HEALTH_UNHEALTHY", got)
		}
		time.Sleep(time.Minute) // down for a minute
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() { done <- l.Run(ctx) }()
		synctest.Wait()
		if !fired(l) {
			t.Fatal("Run after downtime: got no Changed, want one for the lapsed instance")
		}
		if got := healthOf(t, l, "web-0"); got != unknown {
			t.Fatalf("after downtime: got %s, want HEALTH_UNKNOWN", got)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatalf("Run: got %v, want nil after cancel", err)
		}
	})
}

func TestCanceledContext(t *testing.T) {
	l := newLocal(t, 0)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := l.Register(ctx, web("web-0"), webID); !errors.Is(err, context.Canceled) {
		t.Errorf("Register: got %v, want context.Canceled", err)
	}
	if _, err := l.Instances(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Instances: got %v, want context.Canceled", err)
	}
}

// TestReapWaitsAfterRestart: instances that lapsed while the control plane
// was down are not removed at once when it comes back; their sidecars get
// DefaultReap to report again.
func TestReapWaitsAfterRestart(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newLocal(t, 15*time.Second)
		register(t, l, web("web-0"), webID)
		time.Sleep(time.Hour) // "down": no Run, no reports
		ctx, cancel := context.WithCancel(t.Context())
		var wg sync.WaitGroup
		wg.Go(func() { l.Run(ctx) })
		defer func() { cancel(); wg.Wait() }()
		synctest.Wait()
		if got := healthOf(t, l, "web-0"); got != unknown {
			t.Fatalf("after the restart: got %s, want HEALTH_UNKNOWN (listed, not removed)", got)
		}
		if err := l.ReportHealth(ctx, "web-0", healthy, webID); err != nil {
			t.Fatalf("reporting again after the restart: %v", err)
		}
		time.Sleep(DefaultReap)
		synctest.Wait()
		if got := healthOf(t, l, "web-0"); got != unknown {
			t.Fatalf("reported once after the restart, then quiet for DefaultReap: got %s, want HEALTH_UNKNOWN", got)
		}
	})
}
