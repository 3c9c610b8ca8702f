package secrets

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseExpand(t *testing.T) {
	tm, err := Parse("Bearer ${secret:openai} and ${secret:x.y-1}$")
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(tm.Names(), ","); got != "openai,x.y-1" {
		t.Errorf("names %q", got)
	}
	v, err := tm.Expand(func(n string) (string, error) { return "<" + n + ">", nil })
	if err != nil || v != "Bearer <openai> and <x.y-1>$" {
		t.Errorf("expanded %q, %v", v, err)
	}
	for _, bad := range []string{"${secret:}", "${secret:a", "${env:A}", "${secret:../a}", "${secret:.hidden}", "a\r\nb", "${secret:a/b}"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

// store returns a store over a temporary directory whose files belong to
// the test's own uid.
func store(t *testing.T) (*Store, string) {
	dir := t.TempDir()
	return &Store{Dirs: []string{"", dir}, Owner: uint32(os.Getuid())}, dir
}

func TestStoreGet(t *testing.T) {
	s, dir := store(t)
	write := func(name, v string, mode os.FileMode) {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(v), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
	}
	write("ok", "s3cr3t-value\n", 0o600)
	if v, err := s.Get("ok"); err != nil || v != "s3cr3t-value" {
		t.Errorf("Get(ok) = %q, %v", v, err)
	}
	// Read on every use: a changed file is picked up.
	write("ok", "rotated", 0o600)
	if v, _ := s.Get("ok"); v != "rotated" {
		t.Errorf("after rotation: %q", v)
	}
	write("loose", "s3cr3t-loose", 0o644)
	_, err := s.Get("loose")
	if err == nil || !strings.Contains(err.Error(), "permissions 0644") {
		t.Errorf("loose permissions: %v", err)
	}
	write("split", "a\nb", 0o600)
	_, err = s.Get("split")
	if err == nil || strings.Contains(err.Error(), "a\nb") {
		t.Errorf("value with a line break: %v", err)
	}
	os.Symlink(filepath.Join(dir, "ok"), filepath.Join(dir, "link"))
	if _, err := s.Get("link"); err == nil {
		t.Error("a symlink was followed")
	}
	if _, err := s.Get("missing"); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing: %v", err)
	}
	other := &Store{Dirs: []string{dir}, Owner: uint32(os.Getuid()) + 1}
	if _, err := other.Get("ok"); err == nil || !strings.Contains(err.Error(), "owned by uid") {
		t.Errorf("wrong owner: %v", err)
	}
	err = s.Check([]string{"ok", "loose", "missing"})
	if err == nil || !strings.Contains(err.Error(), "loose") || !strings.Contains(err.Error(), "missing") {
		t.Errorf("Check: %v", err)
	}
	// No error carries a value.
	for _, e := range []error{err} {
		if strings.Contains(e.Error(), "s3cr3t") || strings.Contains(e.Error(), "rotated") {
			t.Errorf("an error carries a secret value: %v", e)
		}
	}
}

// FuzzParse: a parsed template expands to its literal text with the names
// in place, holds no line break, and names only valid secrets.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"Bearer ${secret:a}", "${", "$${secret:b}}", "x${secret:c}y${secret:d}", "${secret:\n}"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tm, err := Parse(s)
		if err != nil {
			return
		}
		for _, n := range tm.Names() {
			if !ValidName(n) {
				t.Fatalf("%q: name %q accepted", s, n)
			}
		}
		back, _ := tm.Expand(func(n string) (string, error) { return refOpen + n + refClose, nil })
		if back != s {
			t.Fatalf("%q expands back to %q", s, back)
		}
		if strings.ContainsAny(back, "\r\n\x00") {
			t.Fatalf("%q: line break accepted", s)
		}
	})
}
