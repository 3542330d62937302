// Package resource is the Kubernetes-style configuration users apply with
// `strait apply -f`: it decodes YAML or JSON documents into Objects, validates
// them strictly into typed resources, converts them to and from the admin
// API's Resource message, and turns validated resources into the discovery
// API's TrafficPolicy and Authorization messages.
//
// Every document has the shape
//
//	apiVersion: strait.dev/v1alpha1
//	kind: TrafficPolicy | AuthorizationPolicy
//	metadata: {name: <DNS-1123 label>, namespace: <DNS-1123 label, default "default">, labels: {...}}
//	spec: {...}
//
// or, for a ServiceExport (the Multi-Cluster Services API's kind),
// apiVersion multicluster.x-k8s.io/v1alpha1 with an optional spec
// ({toClusters: [...]}).
//
// Validation is strict, in the manner of Kubernetes' field.ErrorList: unknown
// fields, wrong types, values out of range, missing required fields, bad
// enumerations and SPIFFE IDs outside the mesh's trust domain are all refused,
// and every problem of a document is reported at once with its full path
// (spec.retries.attempts). Errors are *Error values listing FieldErrors.
//
// Defaults, applied by (*TrafficPolicy).Proto for fields the user left unset:
//
//	timeouts.connect                  1s
//	timeouts.request                  15s   (whole request, all attempts)
//	retries.attempts                  2     (0 disables retries; at most 10)
//	retries.perTryTimeout             0     (no per-try timeout)
//	retries.retryOn                   [connect-failure, reset, gateway-error]
//	retries.budget.percent            20
//	retries.budget.minPerSecond       10
//	loadBalancing.policy              P2C_EWMA
//	outlierDetection.consecutiveErrors 5
//	outlierDetection.baseEjectionTime  30s
//	outlierDetection.maxEjectionPercent 50  (0 disables ejection)
//	connectionLimits.maxConnections      1024
//	connectionLimits.maxPendingRequests  1024
//	connectionLimits.maxRequests         1024
//	failover.peers                       every linked peer that exports the service, in one tier
//	failover.order                       listed (rtt: nearest first, only with peers empty)
//	failover.spillThreshold              0     (traffic leaves a tier only when none of it is healthy)
//	failover.slowStart                   10s   (0 disables the failback ramp)
//	failover.staleness                   30s
//
// An AuthorizationPolicy's action defaults to ALLOW.
//
// The package knows nothing of storage, gRPC or the proxies: it converts
// between text and messages. New kinds (MCS ServiceImport, for instance) are
// added to the kinds table in validate.go.
package resource
