package workloadapi_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/straitmesh/strait/ca/catest"
	"github.com/straitmesh/strait/internal/deptest"
	"github.com/straitmesh/strait/proxy/workloadapi"
)

var (
	td      = spiffeid.RequireTrustDomainFromString("example.org")
	otherTD = spiffeid.RequireTrustDomainFromString("other.org")
	appID   = "spiffe://example.org/ns/default/sa/app"
)

// identity is a test CA for td with its X.509 bundle.
type identity struct {
	ca     *catest.CA
	bundle *x509bundle.Bundle
}

func newIdentity(t *testing.T, trustDomain spiffeid.TrustDomain) identity {
	t.Helper()
	c := catest.New(t, trustDomain.Name())
	b, err := c.Bundle().GetX509BundleForTrustDomain(trustDomain)
	if err != nil {
		t.Fatalf("bundle for %s: %v", trustDomain, err)
	}
	return identity{ca: c, bundle: b}
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestDependencies(t *testing.T) {
	deptest.Check(t, "github.com/straitmesh/strait/proxy/workloadapi", deptest.SmallStep, deptest.ClientGo, deptest.QUIC)
}

func TestStore(t *testing.T) {
	id := newIdentity(t, td)
	other := newIdentity(t, otherTD)
	st := workloadapi.NewStore()

	if s, err := st.GetX509SVID(); s != nil || !errors.Is(err, workloadapi.ErrNoSVID) {
		t.Fatalf("empty store: GetX509SVID = %v, %v; want nil, ErrNoSVID", s, err)
	}
	if _, err := st.GetX509BundleForTrustDomain(td); !errors.Is(err, workloadapi.ErrNoBundle) {
		t.Fatalf("empty store: GetX509BundleForTrustDomain error = %v, want ErrNoBundle", err)
	}

	steps := []struct {
		name       string
		do         func()
		wantChange bool
	}{
		{"set SVID", func() { st.SetSVID(id.ca.SVID(t, appID, time.Hour)) }, true},
		{"set bundle", func() { st.SetBundle(id.bundle) }, true},
		{"set equal bundle", func() { st.SetBundle(id.bundle.Clone()) }, false},
		{"set nil bundle", func() { st.SetBundle(nil) }, false},
		{"set federated bundle", func() { st.SetBundle(other.bundle) }, true},
		{"remove federated bundle", func() { st.RemoveBundle(otherTD) }, true},
		{"remove absent bundle", func() { st.RemoveBundle(otherTD) }, false},
		{"renew SVID", func() { st.SetSVID(id.ca.SVID(t, appID, time.Hour)) }, true},
	}
	for _, step := range steps {
		ch := st.Changed()
		step.do()
		if got := closed(ch); got != step.wantChange {
			t.Errorf("%s: Changed closed = %v, want %v", step.name, got, step.wantChange)
		}
	}

	s, err := st.GetX509SVID()
	if err != nil || s.ID.String() != appID {
		t.Fatalf("GetX509SVID = %v, %v; want %s", s, err, appID)
	}
	b, err := st.GetX509BundleForTrustDomain(td)
	if err != nil || !b.Equal(id.bundle) {
		t.Fatalf("GetX509BundleForTrustDomain(%s) = %v, %v; want the CA's bundle", td, b, err)
	}
	b.RemoveX509Authority(b.X509Authorities()[0]) // a copy: must not affect the store
	if got, _ := st.GetX509BundleForTrustDomain(td); !got.Equal(id.bundle) {
		t.Errorf("modifying a returned bundle changed the store")
	}

	st.SetBundle(other.bundle)
	var got []string
	for _, b := range st.Bundles() {
		got = append(got, b.TrustDomain().Name())
	}
	if len(got) != 2 || got[0] != "example.org" || got[1] != "other.org" {
		t.Errorf("Bundles() trust domains = %v, want [example.org other.org]", got)
	}
}

func TestNewValidates(t *testing.T) {
	long := "/" + strings.Repeat("d", 120)
	tests := []struct {
		name    string
		cfg     workloadapi.Config
		wantErr bool
	}{
		{"minimal", workloadapi.Config{Source: workloadapi.NewStore()}, false},
		{"full", workloadapi.Config{Source: workloadapi.NewStore(), Path: "/run/strait/api.sock", AllowedUIDs: []int{1000}, ShutdownTimeout: time.Second}, false},
		{"no source", workloadapi.Config{Path: "/run/strait/api.sock"}, true},
		{"negative uid", workloadapi.Config{Source: workloadapi.NewStore(), AllowedUIDs: []int{-1}}, true},
		{"path too long", workloadapi.Config{Source: workloadapi.NewStore(), Path: long}, true},
		{"negative shutdown timeout", workloadapi.Config{Source: workloadapi.NewStore(), ShutdownTimeout: -time.Second}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := workloadapi.New(tt.cfg)
			if gotErr := err != nil; gotErr != tt.wantErr {
				t.Errorf("New error = %v, want error: %v", err, tt.wantErr)
			}
		})
	}
}
