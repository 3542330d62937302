// Package server is the control plane's gRPC edge: it authenticates every
// caller (registration token, Kubernetes token later, or the caller's SVID
// over mTLS, checked on every RPC against current trust), issues SVIDs
// through the cluster's intermediate, keeps the service registry, stores
// resources applied by the CLI, and streams each sidecar the snapshot it
// needs, debounced and only when its view changed.
//
// It owns the mapping of errors to gRPC status codes for the
// strait.controlplane.v1 API. It does not import the CA: the Issuer it needs
// is declared here and wired in cmd/.
package server
