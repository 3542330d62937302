// Package e2e holds multi-cluster scenarios and their providers: local
// (processes on loopback, clusters in network namespaces when root) and kind.
// Scenarios read as stories: clusters are named by role (east, west, south)
// and faults are steps.
package e2e
