package store

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// A state file whose pages are damaged (a bad disk, a bad copy, a partial
// restore) is refused with an error that says so: Open must not panic and
// take the control plane down with a stack trace.
func TestOpenCorruptFileIsAnError(t *testing.T) {
	for _, tc := range []struct {
		name string
		page int
		fill func(i int) byte
	}{
		{"zeroed page 2", 2, func(int) byte { return 0 }},
		{"garbage page 2", 2, func(i int) byte { return byte(i * 31) }},
		{"zeroed page 3", 3, func(int) byte { return 0 }},
		{"garbage page 3", 3, func(i int) byte { return byte(i * 17) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "state.db")
			s, err := Open(p, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.Apply([]Resource{{APIVersion: "v1", Kind: "X", Namespace: "a", Name: "b", Spec: []byte(`{}`)}}); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			data, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			const pageSize = 4096
			for i := tc.page * pageSize; i < (tc.page+1)*pageSize && i < len(data); i++ {
				data[i] = tc.fill(i)
			}
			if err := os.WriteFile(p, data, 0o600); err != nil {
				t.Fatal(err)
			}
			var openErr error
			func() {
				defer func() {
					if r := recover(); r != nil {
						t.Fatalf("Open of a corrupt state file panicked: %v", r)
					}
				}()
				s, openErr = Open(p, Options{})
			}()
			if openErr == nil {
				// Whatever bbolt could not see, the store must still work.
				s.Close()
				return
			}
			if !errors.Is(openErr, ErrCorrupt) {
				t.Fatalf("Open = %v, want an error wrapping ErrCorrupt", openErr)
			}
		})
	}
}
