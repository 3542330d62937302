package svid_test

import (
	"testing"

	"github.com/straitmesh/strait/internal/deptest"
)

// The verifier, IDs and bundles are what the sidecar imports from ca/: they
// must not pull in the CA's smallstep machinery, client-go or QUIC.
func TestLeanDependencies(t *testing.T) {
	for _, pkg := range []string{
		"github.com/straitmesh/strait/ca/svid",
		"github.com/straitmesh/strait/ca/identity",
		"github.com/straitmesh/strait/ca/bundle",
		"github.com/straitmesh/strait/proxy",
	} {
		deptest.Check(t, pkg, deptest.SmallStep, deptest.ClientGo, deptest.QUIC)
	}
}
