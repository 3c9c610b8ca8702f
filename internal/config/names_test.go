package config

import (
	"errors"
	"strings"
	"testing"
)

func TestValidProjectName(t *testing.T) {
	for _, ok := range []string{"a", "alpha", "t2", "0", "a-b_c", strings.Repeat("a", 63)} {
		if err := ValidProjectName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	// The review's names (issue 12, item 9) and their relatives.
	for _, bad := range []string{"", "a*", "#x", "a/b", "a b", "../../etc", "..", "Alpha", "-a", "_a", "a.b", "a\tb", "a\nb", "a:b", strings.Repeat("a", 64), "é"} {
		err := ValidProjectName(bad)
		if !errors.Is(err, ErrBadName) || !strings.Contains(err.Error(), ProjectNameRule) {
			t.Errorf("%q: %v; want ErrBadName naming the rule", bad, err)
		}
	}
}

func TestValidTAPName(t *testing.T) {
	for _, ok := range []string{"tap-alpha", "tap0", "vm_1", "tap.1", "T", strings.Repeat("t", 15)} {
		if err := ValidTAPName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", "../../etc", "tap/x", "tap x", "tap*", "tap:1", "-tap", ".tap", "tap\n", strings.Repeat("t", 16), "täp"} {
		err := ValidTAPName(bad)
		if !errors.Is(err, ErrBadName) || !strings.Contains(err.Error(), TAPNameRule) {
			t.Errorf("%q: %v; want ErrBadName naming the rule", bad, err)
		}
	}
}

// FuzzNames: what the rules accept is safe where the names go: no path
// element, no separator of the state file or nft syntax, within the limits.
func FuzzNames(f *testing.F) {
	for _, s := range []string{"alpha", "a*", "#x", "a/b", "../../etc", "tap-alpha", "."} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, v := range []func(string) error{ValidProjectName, ValidTAPName} {
			if v(s) != nil {
				continue
			}
			if s == "" || s == "." || s == ".." || len(s) > 63 || strings.ContainsAny(s, "/ \t\r\n*#:,{}\"'\\;$") || strings.HasPrefix(s, "-") {
				t.Errorf("accepted %q", s)
			}
		}
		if ValidTAPName(s) == nil && len(s) > MaxTAPName {
			t.Errorf("TAP %q longer than %d", s, MaxTAPName)
		}
	})
}
