// Package catalog holds the rules for the service catalogs clusters
// exchange: what a well-formed exported service is. Gateways apply it to
// what peers send, control planes to what gateways report.
package catalog

import (
	"fmt"

	"github.com/straitmesh/strait/ca/identity"
	federationv1 "github.com/straitmesh/strait/federation/api/v1"
)

// Limits on one exported service.
const (
	MaxPorts      = 64
	MaxIdentities = 64
	MaxLocalities = 256
)

// Validate checks one exported service as received from a peer.
func Validate(es *federationv1.ExportedService) error {
	if err := identity.ValidateClusterName(es.GetNamespace()); err != nil {
		return fmt.Errorf("export namespace: %w", err)
	}
	if err := identity.ValidateClusterName(es.GetName()); err != nil {
		return fmt.Errorf("export name: %w", err)
	}
	name := es.GetNamespace() + "/" + es.GetName()
	if p := es.GetProtocol(); p != "http" && p != "tcp" {
		return fmt.Errorf("export %s: protocol %q is neither http nor tcp", name, p)
	}
	if len(es.GetPorts()) == 0 || len(es.GetPorts()) > MaxPorts || len(es.GetSpiffeIds()) > MaxIdentities || len(es.GetLocalities()) > MaxLocalities {
		return fmt.Errorf("export %s: 1 to %d ports, at most %d identities and %d localities", name, MaxPorts, MaxIdentities, MaxLocalities)
	}
	for _, p := range es.GetPorts() {
		if p == 0 || p > 65535 {
			return fmt.Errorf("export %s: port %d out of range", name, p)
		}
	}
	for _, id := range es.GetSpiffeIds() {
		parsed, err := identity.Parse(id)
		if err != nil {
			return fmt.Errorf("export %s: %w", name, err)
		}
		if identity.Classify(parsed).Kind != identity.KindWorkload {
			return fmt.Errorf("export %s: %s is not a workload identity", name, id)
		}
	}
	if es.GetHealthy() > es.GetTotal() {
		return fmt.Errorf("export %s: %d healthy of %d", name, es.GetHealthy(), es.GetTotal())
	}
	return nil
}
