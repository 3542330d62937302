// Package workloadapi serves the SPIFFE Workload API to the workload next to
// the sidecar, on a Unix domain socket, so an application using go-spiffe's
// workloadapi (X509Source, FetchX509Bundles, ...) gets the sidecar's
// X.509-SVID and trust bundles and sees every rotation.
//
// It implements the X.509 half of the SPIFFE Workload API
// (https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE_Workload_API.md)
// with the X509-SVID encoding of the X509-SVID standard: FetchX509SVID and
// FetchX509Bundles stream the current material and resend it on every change.
// Strait issues X.509-SVIDs only, so the JWT-SVID and WIT-SVID methods answer
// codes.Unimplemented.
//
// Callers are attested locally: the kernel's SO_PEERCRED credentials of the
// connecting process must name an allowed uid, and every call must carry the
// "workload.spiffe.io: true" security header. Peer credentials are read on
// Linux only; elsewhere every call is refused with PermissionDenied.
//
// The package owns the socket and the gRPC service. It knows nothing of how
// the SVID is obtained or renewed: the sidecar pushes new material into a
// Store (or any Source). It is part of the lean sidecar and must not import
// smallstep, client-go or quic-go (TestDependencies enforces it).
package workloadapi
