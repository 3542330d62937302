// Package proxy is the sidecar: inbound mTLS with per-connection
// authorization, outbound mTLS with load balancing, retries and outlier
// ejection, the SPIFFE Workload API, and an admin port. It must stay lean:
// no client-go, no smallstep, no QUIC (a dependency test will enforce it).
package proxy
