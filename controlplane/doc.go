// Package controlplane is a cluster's control plane: it authenticates
// workloads, has the cluster intermediate sign their SVIDs (Certify), and
// streams each sidecar and gateway versioned snapshots of services,
// endpoints, policies and the trust bundle (Watch). Its gRPC API will live
// under controlplane/api/v1.
//
// It declares the small interfaces it needs (a Signer, an Authenticator, a
// service registry) and does not import the CA's implementation.
package controlplane
