package sysmonwake

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Reexec replaces this process with the same executable, arguments and
// environment plus Setting (see Env), keeping its pid. When GODEBUG
// already sets schedtrace it does not start over: in a process already
// started over it restores the command name, and it returns an error
// when the user's value lets sysmon sleep. Otherwise it returns only on
// failure. Call it early, before any goroutine, file or listener is made:
// nothing but the arguments and environment survives. A signal caught
// (signal.Notify) before the exec is lost with the process image, so
// callers check for one first.
func Reexec() error {
	env, changed := Env(os.Environ())
	if !changed {
		restoreName()
		return check(env)
	}
	if err := syscall.Exec("/proc/self/exe", os.Args, env); err != nil {
		return fmt.Errorf("start over with GODEBUG=%s: %w", Setting, err)
	}
	return nil
}

// restoreName puts back the command name that exec'ing /proc/self/exe
// changed to "exe" (what ps, top and pkill show), on every thread so far:
// threads made later copy it from the thread that makes them. The name is
// the executable's base name, cut to the kernel's 15 bytes, as a direct
// exec sets it. Best effort: a name is not worth failing for.
func restoreName() {
	exe, err := os.Executable()
	if err != nil {
		return
	}
	name := filepath.Base(strings.TrimSuffix(exe, " (deleted)"))
	if len(name) > 15 {
		name = name[:15]
	}
	// A thread made during a pass by one not yet renamed copies "exe":
	// passes go on until one finds none (a few at most).
	for range 4 {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return
		}
		renamed := false
		for _, t := range tasks {
			p := filepath.Join("/proc/self/task", t.Name(), "comm")
			if comm, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(comm)) == "exe" {
				_ = os.WriteFile(p, []byte(name), 0)
				renamed = true
			}
		}
		if !renamed {
			return
		}
	}
}
