package sysmonwake

import (
	"slices"
	"strings"
	"testing"
)

func TestEnvAddsTheSettingOnce(t *testing.T) {
	for _, tc := range []struct {
		in      []string
		want    []string
		changed bool
	}{
		{[]string{"PATH=/bin"}, []string{"PATH=/bin", "GODEBUG=" + Setting}, true},
		{[]string{"GODEBUG="}, []string{"GODEBUG=" + Setting}, true},
		{[]string{"GODEBUG=madvdontneed=1", "A=b"}, []string{"GODEBUG=madvdontneed=1," + Setting, "A=b"}, true},
		// Already set: the user's value, or the process started over.
		{[]string{"GODEBUG=schedtrace=1000"}, []string{"GODEBUG=schedtrace=1000"}, false},
		{[]string{"GODEBUG=gctrace=1,schedtrace=0"}, []string{"GODEBUG=gctrace=1,schedtrace=0"}, false},
		// The runtime does not trim: " schedtrace" is another key.
		{[]string{"GODEBUG=gctrace=1, schedtrace=0"}, []string{"GODEBUG=gctrace=1, schedtrace=0," + Setting}, true},
		// Only the first GODEBUG counts.
		{[]string{"GODEBUG=x=1", "GODEBUG=schedtrace=5"}, []string{"GODEBUG=x=1," + Setting}, true},
	} {
		got, changed := Env(tc.in)
		if !slices.Equal(got, tc.want) || changed != tc.changed {
			t.Errorf("Env(%q) = %q, %v; want %q, %v", tc.in, got, changed, tc.want, tc.changed)
		}
	}
	again, changed := Env([]string{"GODEBUG=" + Setting})
	if changed || len(again) != 1 {
		t.Errorf("Env on its own output changed it again: %q", again)
	}
}

func TestCheckNamesASettingThatLetsSysmonSleep(t *testing.T) {
	for env, bad := range map[string]bool{
		"GODEBUG=" + Setting:                false,
		"GODEBUG=schedtrace=1000":           false,
		"GODEBUG=schedtrace=0":              true,
		"GODEBUG=schedtrace=-1":             true,
		"GODEBUG=schedtrace=x":              true,
		"GODEBUG=schedtrace=0,schedtrace=5": false, // the last one counts
		"PATH=/bin":                         false,
	} {
		err := check([]string{env})
		if (err != nil) != bad {
			t.Errorf("check(%q) = %v, want error %v", env, err, bad)
		}
		if err != nil && !strings.Contains(err.Error(), "schedtrace") {
			t.Errorf("check(%q) = %v: does not name the setting", env, err)
		}
	}
}
