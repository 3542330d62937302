package exepages

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Release drops this process's mappings of the executable's read-only pages
// (see the package comment). It reads /proc/self/smaps; an error leaves
// every mapping as it was or, after a failed madvise, some released.
func Release() (Released, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/exe", &st); err != nil {
		return Released{}, fmt.Errorf("stat executable: %w", err)
	}
	data, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		return Released{}, fmt.Errorf("read mappings: %w", err)
	}
	maps, err := parseSmaps(data, unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	if err != nil {
		return Released{}, err
	}
	var r Released
	for _, m := range maps {
		if m.anon > 0 {
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
	// anon is how much of it is private copies, written to by someone
	// (a debugger's breakpoints): such a mapping is left alone.
	anon int64
}

// parseSmaps returns the mappings of the file (major:minor, inode) in
// smaps that are not writable, with their resident bytes. Writable ones
// hold the data segment, whose written pages are private: dropping those
// would lose them.
func parseSmaps(data []byte, major, minor uint32, ino uint64) ([]mapping, error) {
	dev := fmt.Sprintf("%02x:%02x", major, minor)
	var (
		out []mapping
		cur *mapping
	)
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if key, rest, ok := strings.Cut(line, ":"); ok && (key == "Rss" || key == "Anonymous") {
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
				cur.anon = n << 10
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
		if inode != ino || fields[3] != dev || strings.Contains(fields[1], "w") {
			continue
		}
		out = append(out, mapping{start: uintptr(start), end: uintptr(end)})
		cur = &out[len(out)-1]
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("smaps: %w", err)
	}
	return out, nil
}
