// Package federationv1 holds the generated messages Strait clusters
// exchange: the join protocol and the per-peer control stream.
package federationv1
