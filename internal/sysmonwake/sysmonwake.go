// Package sysmonwake keeps the Go runtime's monitor thread, sysmon, out of
// its deep sleep, for processes that run Go code on one thread and spend
// their life going idle and busy again (a sidecar between requests).
//
// Whenever sysmon finds every P idle it sleeps until woken or until the
// next timer is due (a minute at most), and the next system call any
// goroutine makes wakes it (runtime.entersyscall): a futex wake on the
// request's path, then sysmon's own switches as it polls at 20 µs and goes
// back to sleep. A sidecar at GOMAXPROCS=1 goes idle between requests, so
// that came to about one context switch per request and nearly half of
// the CPU per request at 1000 requests/s (make bench). The runtime skips
// the deep sleep only while GODEBUG schedtrace is set above zero, and
// reads it once at start: Reexec starts the process over with it set to
// its largest value, 2147483647 ms (24.8 days) between traces.
//
// Costs: sysmon wakes every 10 ms when the process is idle (about 100
// cheap wake-ups a second); the runtime prints one line starting "SCHED"
// to standard error at start on a host up for longer than 24.8 days, and
// every 24.8 days after; and a fatal crash prints the scheduler's state
// (every thread, P and goroutine, as GODEBUG schedtrace does) before the
// usual stacks. That dump takes the scheduler lock, so a crash inside the
// scheduler itself, with that lock held, may hang instead of exiting:
// a runtime bug, not something a program's own panic can cause.
package sysmonwake

import (
	"fmt"
	"strconv"
	"strings"
)

// Setting is the GODEBUG entry Reexec adds.
const Setting = "schedtrace=2147483647"

// Env returns env with Setting added to GODEBUG, and whether it added it:
// not when GODEBUG already sets schedtrace, whatever its value (a user's
// own trace setting, or a process already started over). Keys are matched
// as the runtime does, exactly: " schedtrace" is not schedtrace.
func Env(env []string) ([]string, bool) {
	if _, set := value(env); set {
		return env, false
	}
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

// value returns the schedtrace value the runtime reads from env: from the
// first GODEBUG, the last schedtrace entry in it.
func value(env []string) (string, bool) {
	for _, kv := range env {
		v, ok := strings.CutPrefix(kv, "GODEBUG=")
		if !ok {
			continue
		}
		val, set := "", false
		for s := range strings.SplitSeq(v, ",") {
			if k, x, _ := strings.Cut(s, "="); k == "schedtrace" {
				val, set = x, true
			}
		}
		return val, set
	}
	return "", false
}

// check reports an error when env sets schedtrace to a value that lets
// sysmon sleep (zero, negative or not a number), which Reexec leaves as
// the user set it.
func check(env []string) error {
	v, set := value(env)
	if !set {
		return nil
	}
	if n, err := strconv.Atoi(v); err != nil || n <= 0 {
		return fmt.Errorf("GODEBUG sets schedtrace=%s, which lets sysmon sleep", v)
	}
	return nil
}
