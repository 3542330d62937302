// Package sysmonwake keeps the Go runtime's monitor thread, sysmon, out of
// its deep sleep, for processes that run Go code on one thread and spend
// their life going idle and busy again (a sidecar between requests).
//
// Whenever sysmon finds every P idle it sleeps until woken, and the next
// system call any goroutine makes wakes it (runtime.entersyscall): a futex
// wake on the request's path, then sysmon's own switches as it polls at
// 20 µs and goes back to sleep. A sidecar at GOMAXPROCS=1 goes idle between
// requests, so that came to about one context switch per request and
// nearly half of the CPU per request at 1000 requests/s (make bench). The
// runtime skips the deep sleep only while GODEBUG schedtrace is set, and
// reads it once at start: Reexec starts the process over with it set to
// its largest value, 2147483647 ms (24.8 days) between traces. Costs:
// sysmon then wakes every 10 ms when the process is idle (about 100 cheap
// wake-ups a second), and the runtime prints one line starting "SCHED" to
// standard error at start on a host up for longer than 24.8 days, and every
// 24.8 days after.
package sysmonwake

import "strings"

// Setting is the GODEBUG entry Reexec adds.
const Setting = "schedtrace=2147483647"

// Env returns env with Setting added to GODEBUG, and whether it added it:
// not when GODEBUG already sets schedtrace (whatever its value: a user's
// own trace setting, or a process already started over).
func Env(env []string) ([]string, bool) {
	out := make([]string, 0, len(env)+1)
	found := false
	for _, kv := range env {
		v, ok := strings.CutPrefix(kv, "GODEBUG=")
		if !ok {
			out = append(out, kv)
			continue
		}
		if found {
			continue // a later duplicate: the runtime reads the first
		}
		found = true
		for s := range strings.SplitSeq(v, ",") {
			if k, _, _ := strings.Cut(s, "="); strings.TrimSpace(k) == "schedtrace" {
				return env, false
			}
		}
		if v == "" {
			kv = "GODEBUG=" + Setting
		} else {
			kv = "GODEBUG=" + v + "," + Setting
		}
		out = append(out, kv)
	}
	if !found {
		out = append(out, "GODEBUG="+Setting)
	}
	return out, true
}
