package bundlesig_test

import (
	"testing"

	"github.com/straitmesh/strait/internal/deptest"
)

// Receivers of signed bundles (member control planes, gateways) import this
// package: it must not pull in the CA's smallstep machinery, client-go or
// QUIC.
func TestLeanDependencies(t *testing.T) {
	deptest.Check(t, "github.com/straitmesh/strait/ca/bundlesig", deptest.SmallStep, deptest.ClientGo, deptest.QUIC)
}
