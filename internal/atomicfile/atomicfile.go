// Package atomicfile replaces files so that a crash at any instant leaves
// either the old or the new content, never a torn file: write a temporary
// file in the same directory, fsync it, rename it over the target, fsync the
// directory. Strait keeps all durable state and credentials this way.
package atomicfile

import (
	"os"
	"path/filepath"
)

// WriteFile atomically replaces path with data, created with perm.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	return WriteFileHook(path, data, perm, nil)
}

// WriteFileHook is WriteFile with a hook run after the temporary file is
// durable and before the rename: tests use it to inject a crash or a
// failure at the commit point. A hook error aborts the write.
func WriteFileHook(path string, data []byte, perm os.FileMode, beforeRename func(path string) error) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op once renamed
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if beforeRename != nil {
		if err := beforeRename(path); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
