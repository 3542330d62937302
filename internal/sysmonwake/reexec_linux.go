package sysmonwake

import (
	"fmt"
	"os"
	"syscall"
)

// Reexec replaces this process with the same executable, arguments and
// environment plus Setting (see Env), keeping its pid. It returns nil
// without doing anything when GODEBUG already sets schedtrace, and
// returns only on failure otherwise. Call it first thing in main, before
// any goroutine, file or listener is made.
func Reexec() error {
	env, changed := Env(os.Environ())
	if !changed {
		return nil
	}
	if err := syscall.Exec("/proc/self/exe", os.Args, env); err != nil {
		return fmt.Errorf("start over with GODEBUG=%s: %w", Setting, err)
	}
	return nil
}
