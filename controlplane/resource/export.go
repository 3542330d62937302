package resource

import "github.com/straitmesh/strait/ca/identity"

// MCSAPIVersion is the Multi-Cluster Services API group version whose
// ServiceExport this package accepts (sigs.k8s.io/mcs-api).
const MCSAPIVersion = "multicluster.x-k8s.io/v1alpha1"

// KindServiceExport marks a local service as exported to peer clusters,
// with the semantics of the MCS API's ServiceExport: its name is the
// service's name, in the service's namespace, and it has no required spec.
const KindServiceExport = "ServiceExport"

// ServiceExport exports the service of the same name and namespace.
type ServiceExport struct {
	Metadata Metadata
	Spec     ServiceExportSpec
}

// ServiceExportSpec is optional, a Strait extension of the MCS type.
type ServiceExportSpec struct {
	// ToClusters limits the export to these linked peers; empty means
	// every linked peer (the MCS clusterset).
	ToClusters []string `json:"toClusters,omitempty"`
}

// Kind returns "ServiceExport".
func (*ServiceExport) Kind() string { return KindServiceExport }

// ObjectMeta returns the export's metadata.
func (e *ServiceExport) ObjectMeta() Metadata { return e.Metadata }

func (e *ServiceExport) meta() *Metadata { return &e.Metadata }
func (e *ServiceExport) spec() any       { return &e.Spec }
func (e *ServiceExport) service() string { return e.Metadata.Name }

func (e *ServiceExport) validate(v *validator) {
	seen := map[string]bool{}
	for i, c := range e.Spec.ToClusters {
		p := index("spec.toClusters", i)
		if err := identity.ValidateClusterName(c); err != nil {
			v.add(p, "%v", err)
		} else if seen[c] {
			v.add(p, "cluster %s listed twice", quote(c))
		}
		seen[c] = true
	}
}

// ExportedTo reports whether the export includes peer.
func (e *ServiceExport) ExportedTo(peer string) bool {
	if len(e.Spec.ToClusters) == 0 {
		return true
	}
	for _, c := range e.Spec.ToClusters {
		if c == peer {
			return true
		}
	}
	return false
}
