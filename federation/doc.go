// Package federation holds join tokens, the join protocol, link lifecycle
// and the catalog export/import model shared by the control plane, the
// gateway and the CLI. Its wire messages will live under federation/api/v1.
package federation
