package exepages

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Release drops this process's mappings of the executable's read-only pages
// (see the package comment). It reads /proc/self/smaps; an error leaves
// every mapping as it was or, after a failed madvise, some released.
func Release() (Released, error) {
	data, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		return Released{}, fmt.Errorf("read mappings: %w", err)
	}
	maps, err := parseSmaps(data, reflect.ValueOf(Release).Pointer())
	if err != nil {
		return Released{}, err
	}
	var r Released
	for _, m := range maps {
		if m.private > 0 {
			continue
		}
		if _, _, errno := unix.Syscall(unix.SYS_MADVISE, m.start, m.end-m.start, unix.MADV_DONTNEED); errno != 0 {
			return r, fmt.Errorf("madvise %#x-%#x: %w", m.start, m.end, errno)
		}
		r.Mappings++
		r.Resident += m.rss
	}
	return r, nil
}

// mapping is one read-only mapping of the executable.
type mapping struct {
	start, end uintptr
	rss        int64
	// private is how much of it is private copies, resident (Anonymous)
	// or swapped out (Swap): pages someone wrote to (a debugger's
	// breakpoints). Dropping those would lose the writes, so such a
	// mapping is left alone.
	private int64
}

// entry is one mapping of smaps as printed.
type entry struct {
	mapping
	writable bool
	file     string // "dev inode", as smaps prints them
}

// parseSmaps returns the read-only mappings, with their resident bytes, of
// the file that holds the code at pc: the executable. Picking the file by
// the mapping that contains running code, and comparing the device and
// inode as smaps prints them, needs no stat of /proc/self/exe, whose
// device number differs from smaps' on some filesystems (btrfs subvolumes,
// older overlayfs). Writable mappings hold the data segment, whose written
// pages are private: they are never returned.
func parseSmaps(data []byte, pc uintptr) ([]mapping, error) {
	var (
		all []entry
		cur *entry
	)
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if key, rest, ok := strings.Cut(line, ":"); ok && (key == "Rss" || key == "Anonymous" || key == "Swap") {
			if cur == nil {
				continue
			}
			kb := strings.Fields(rest)
			if len(kb) != 2 || kb[1] != "kB" {
				return nil, fmt.Errorf("smaps: bad %s line %q", key, line)
			}
			n, err := strconv.ParseInt(kb[0], 10, 64)
			if err != nil || n < 0 {
				return nil, fmt.Errorf("smaps: bad %s line %q", key, line)
			}
			if key == "Rss" {
				cur.rss = n << 10
			} else {
				cur.private += n << 10
			}
			continue
		}
		// A header line: "start-end perms offset dev inode [path]". Field
		// lines ("Size:", "VmFlags:") have a colon in their first field.
		if strings.HasSuffix(fields[0], ":") || len(fields) < 5 {
			continue
		}
		cur = nil
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		inode, err3 := strconv.ParseUint(fields[4], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil || end <= start {
			return nil, fmt.Errorf("smaps: bad mapping line %q", line)
		}
		if inode == 0 {
			continue // anonymous memory, the stack, the vDSO
		}
		all = append(all, entry{
			mapping:  mapping{start: uintptr(start), end: uintptr(end)},
			writable: strings.Contains(fields[1], "w"),
			file:     fields[3] + " " + fields[4],
		})
		cur = &all[len(all)-1]
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("smaps: %w", err)
	}
	file := ""
	for _, e := range all {
		if e.start <= pc && pc < e.end {
			file = e.file
			break
		}
	}
	if file == "" {
		return nil, errors.New("smaps: no file mapping holds this process's code")
	}
	var out []mapping
	for _, e := range all {
		if e.file == file && !e.writable {
			out = append(out, e.mapping)
		}
	}
	return out, nil
}
