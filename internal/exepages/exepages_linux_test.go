package exepages

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

const sample = `00400000-009ab000 r-xp 00000000 fe:00 10053457                           /bin/strait-proxy
Size:               5804 kB
Rss:                5676 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me 
009ab000-01005000 r--p 005ab000 fe:00 10053457                           /bin/strait-proxy
Rss:                6440 kB
Anonymous:             8 kB
01005000-01077000 rw-p 00c05000 fe:00 10053457                           /bin/strait-proxy
Rss:                 444 kB
Anonymous:           300 kB
01077000-010b0000 rw-p 00000000 00:00 0 
Rss:                 112 kB
7f0000000000-7f0000010000 r--p 00000000 fe:01 10053457                   /other/file/same/inode
Rss:                  64 kB
7f0000010000-7f0000020000 r--p 00010000 fe:00 10053457                   /bin/strait-proxy
Rss:                   0 kB
Anonymous:             0 kB
Swap:                 16 kB
`

func TestParseSmapsPicksTheExecutablesReadOnlyMappings(t *testing.T) {
	// The code running is at 0x401234: the file is whatever maps it.
	maps, err := parseSmaps([]byte(sample), 0x401234)
	if err != nil {
		t.Fatal(err)
	}
	if len(maps) != 3 {
		t.Fatalf("got %d mappings, want the text, read-only data and a swapped-out one: %+v", len(maps), maps)
	}
	if maps[0].start != 0x400000 || maps[0].end != 0x9ab000 || maps[0].rss != 5676<<10 || maps[0].private != 0 {
		t.Errorf("text mapping = %+v", maps[0])
	}
	if maps[1].rss != 6440<<10 || maps[1].private != 8<<10 {
		t.Errorf("read-only data mapping = %+v", maps[1])
	}
	// A private copy that went to swap still counts: dropping the mapping
	// would lose it.
	if maps[2].private != 16<<10 {
		t.Errorf("swapped mapping = %+v", maps[2])
	}
	if _, err := parseSmaps([]byte(sample), 0x1077100); err == nil {
		t.Error("code in an anonymous mapping: parseSmaps found a file")
	}
}

func TestParseSmapsRefusesGarbage(t *testing.T) {
	for _, bad := range []string{
		"zz-10 r-xp 0 fe:00 1 /x\n",
		"1000-0800 r-xp 0 fe:00 1 /x\n",
		"1000-2000 r-xp 0 fe:00 1 /x\nRss: lots kB\n",
		"1000-2000 r-xp 0 fe:00 1 /x\nRss: -4 kB\n",
	} {
		if _, err := parseSmaps([]byte(bad), 0x1800); err == nil {
			t.Errorf("parseSmaps(%q) = nil error", bad)
		}
	}
}

// TestReleaseDropsTheExecutablesPages runs Release in this test binary:
// its read-only pages leave the resident set and the code still runs.
// File-backed resident memory (RssFile) is compared: anonymous memory
// moves with whatever else the test process allocates meanwhile.
func TestReleaseDropsTheExecutablesPages(t *testing.T) {
	before := residentKiB(t)
	r, err := Release()
	if err != nil {
		t.Fatal(err)
	}
	if r.Mappings < 1 || r.Resident <= 0 {
		t.Fatalf("Release() = %+v, want at least one resident mapping released", r)
	}
	after := residentKiB(t)
	if after >= before {
		t.Errorf("file-backed resident %d KiB before, %d after; Release reported %+v", before, after, r)
	}
	// Code that ran before runs again from the page cache.
	if _, err := Release(); err != nil {
		t.Fatal(err)
	}
}

func residentKiB(t *testing.T) int64 {
	t.Helper()
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "RssFile:"); ok {
			n, err := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			if err != nil {
				t.Fatalf("RssFile line %q: %v", line, err)
			}
			return n
		}
	}
	t.Fatal("no RssFile in /proc/self/status")
	return 0
}
