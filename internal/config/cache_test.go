package config

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCache(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	write := func(s string) {
		if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var c Cache
	write("projects:\n  alpha:\n    allow:\n      - sni: a.test\n")
	first, err := c.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := c.Load(path); err != nil || again != first {
		t.Errorf("same bytes parsed again: %p vs %p, %v", again, first, err)
	}
	write("projects:\n  alpha:\n    allow:\n      - sni: b.test\n")
	changed, err := c.Load(path)
	if err != nil || changed == first || changed.Projects[0].Allow[0].Name != "b.test" {
		t.Errorf("changed bytes: %+v, %v", changed, err)
	}
	write("projects: [\n")
	if _, err := c.Load(path); err == nil {
		t.Error("a broken file loaded")
	}
	write("projects:\n  alpha:\n    allow:\n      - sni: b.test\n")
	if back, err := c.Load(path); err != nil || back != changed {
		t.Errorf("after a failed load the last good parse is not reused: %v", err)
	}
}
