// Package controlplanev1 is the generated Go code of the control plane's
// versioned gRPC API (protobuf package strait.controlplane.v1). The .proto
// files beside it are the contract: who may call each RPC, which fields are
// required, and the versioning rules. Regenerate with `make generate`;
// `make generate-check` proves the checked-in code is current.
package controlplanev1
