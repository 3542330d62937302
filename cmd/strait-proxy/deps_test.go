package main

import (
	"testing"

	"github.com/straitmesh/strait/internal/deptest"
)

// The sidecar binary stays lean: no Kubernetes client, no smallstep CA, no
// QUIC. Anything the sidecar needs from those domains comes over the
// control-plane API.
func TestSidecarDependencies(t *testing.T) {
	deptest.Check(t, "github.com/straitmesh/strait/cmd/strait-proxy", deptest.SmallStep, deptest.ClientGo, deptest.QUIC)
}
