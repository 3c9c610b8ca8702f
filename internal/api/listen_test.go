package api

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestListenRefusesUnsafeDir: a socket directory others may write to lets
// them replace the socket between listen and chown/chmod (a link there
// would give the API group any file); Listen refuses it and leaves no socket.
func TestListenRefusesUnsafeDir(t *testing.T) {
	base := t.TempDir()
	for _, tc := range []struct {
		mode os.FileMode
		ok   bool
	}{
		{0o700, true},
		{0o755, true},
		{0o777, false},
		{0o770, false},
		{0o777 | os.ModeSticky, true},
	} {
		dir := filepath.Join(base, strings.ReplaceAll(tc.mode.String(), "-", "_"))
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, tc.mode); err != nil {
			t.Fatal(err)
		}
		sock := filepath.Join(dir, "api.sock")
		ln, err := Listen(sock, -1)
		if ln != nil {
			ln.Close()
		}
		if (err == nil) != tc.ok {
			t.Errorf("Listen in a %v directory: %v; want ok %v", tc.mode, err, tc.ok)
		}
		if !tc.ok {
			if _, serr := os.Lstat(sock); serr == nil {
				t.Errorf("a socket was made in the %v directory", tc.mode)
			}
		}
	}
}

func TestCheckSocketDirOwner(t *testing.T) {
	dir := t.TempDir()
	if err := checkSocketDir(dir, os.Geteuid()); err != nil {
		t.Fatalf("our own directory: %v", err)
	}
	if os.Geteuid() == 0 {
		if err := os.Chown(dir, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		if err := checkSocketDir(dir, 0); err == nil || !strings.Contains(err.Error(), "uid 65534") {
			t.Errorf("a directory of uid 65534: %v; want a refusal naming the owner", err)
		}
	}
}
