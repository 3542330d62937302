// Package proxy is the sidecar: inbound mTLS with per-connection
// authorization, outbound mTLS with load balancing, retries and outlier
// ejection, the SPIFFE Workload API, and an admin port. It must stay lean:
// no client-go, no smallstep, no QUIC (a dependency test enforces it).
//
// HTTP/1.1 is served by h1Server. Plain requests take the fast path of
// h1fast.go (forwarded as bytes, parsed in place); everything else, and
// HTTP/2, goes through net/http and httputil.ReverseProxy.
package proxy
