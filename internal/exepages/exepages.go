// Package exepages hands the pages of the running executable's read-only
// mappings (code, read-only data, the symbol table) back to the kernel once
// a long-running process has started.
//
// Starting a Go binary touches nearly all of them: package initialisation
// is spread over the whole text, and the kernel maps file pages in 64 KiB
// windows around each fault. A sidecar then uses a small part of its code
// for as long as it runs, yet keeps the rest mapped, and counted in its
// resident set (and in its container's working set), for good. Release
// unmaps them from this process: they stay in the page cache, shared with
// every other process running the binary, and the ones still in use fault
// back in, a minor fault each, when next touched. It is what reclaim under
// memory pressure may do to clean file pages at any time, so nothing can
// depend on them staying resident. Writable mappings (the data segment),
// and read-only ones holding private copies, are never touched.
//
// The pages leave the process's resident set at once. A memory cgroup
// keeps charging them, as page cache, and counts them in the working set
// until the kernel moves them to the inactive list.
package exepages

// Released is what one Release did.
type Released struct {
	// Mappings is how many read-only mappings of the executable were
	// advised; Resident is how many bytes of them were resident before.
	Mappings int
	Resident int64
}
