package client_test

import (
	"context"
	"crypto/tls"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/straitmesh/strait/ca/catest"
	controlplanev1 "github.com/straitmesh/strait/controlplane/api/v1"
	"github.com/straitmesh/strait/controlplane/client"
)

// outageCP answers Unavailable until downUntil, then issues like fakeCP.
type outageCP struct {
	*fakeCP
	downUntil atomic.Int64 // unix nanos
	attempts  atomic.Int32
}

func (o *outageCP) Certify(ctx context.Context, req *controlplanev1.CertifyRequest) (*controlplanev1.CertifyResponse, error) {
	o.attempts.Add(1)
	if time.Now().UnixNano() < o.downUntil.Load() {
		return nil, status.Error(codes.Unavailable, "control plane restarting")
	}
	return o.fakeCP.Certify(ctx, req)
}

// TestRenewalRetriesBeforeExpiry: the control plane is away when the
// renewal is due and comes back shortly before the SVID expires. The
// retries must not be spaced so widely that the SVID expires in the gap:
// an expired SVID cannot renew and the sidecar needs a new token.
func TestRenewalRetriesBeforeExpiry(t *testing.T) {
	c := catest.New(t, testTD)
	o := &outageCP{fakeCP: &fakeCP{ca: c}}
	s := c.SVID(t, cpID, time.Hour)
	cert := tls.Certificate{Leaf: s.Certificates[0], PrivateKey: s.PrivateKey}
	for _, c := range s.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert,
	})))
	controlplanev1.RegisterIdentityServiceServer(srv, o)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)

	creds := newCreds(t, c.Bundle())
	cur := c.SVID(t, workloadID, time.Hour)
	if err := creds.SetSVID(cur); err != nil {
		t.Fatal(err)
	}
	// The loop's clock runs so that the SVID has 8.5s left: renewal is due
	// at once. The control plane is away for the first 7s.
	const left = 8500 * time.Millisecond
	offset := time.Until(cur.Certificates[0].NotAfter) - left
	clock := func() time.Time { return time.Now().Add(offset) }
	start := time.Now()
	o.downUntil.Store(start.Add(7 * time.Second).UnixNano())

	issued := make(chan time.Time, 4)
	id := &client.Identity{ControlPlane: ln.Addr().String(), Creds: creds, Clock: clock,
		Issued: func(*x509svid.SVID) { issued <- clock() }}
	if err := id.Connect(); err != nil {
		t.Fatal(err)
	}
	defer id.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- id.RenewLoop(ctx) }()
	defer func() { cancel(); <-done }()
	select {
	case at := <-issued:
		if !at.Before(cur.Certificates[0].NotAfter) {
			t.Fatalf("renewed %s after the SVID expired (%d attempts)", at.Sub(cur.Certificates[0].NotAfter), o.attempts.Load())
		}
	case <-time.After(left + 500*time.Millisecond):
		t.Fatalf("the SVID expired while the renewal waited in backoff: the control plane was back %s before expiry (%d attempts)",
			left-7*time.Second, o.attempts.Load())
	}
}
