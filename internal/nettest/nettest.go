// Package nettest is the one helper for privileged tests: it skips them when
// not root, fails them instead when VMEGRESS_E2E=1 (as CI sets), and makes
// throwaway network namespaces that are removed when the test ends.
package nettest

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"testing"
)

// Required reports whether privileged tests must run (VMEGRESS_E2E=1).
func Required() bool { return os.Getenv("VMEGRESS_E2E") == "1" }

// Privileged skips t unless it runs as root with the given commands on PATH;
// under VMEGRESS_E2E=1 a missing prerequisite fails the test instead.
func Privileged(t testing.TB, commands ...string) {
	t.Helper()
	miss := func(format string, args ...any) {
		t.Helper()
		if Required() {
			t.Fatalf("VMEGRESS_E2E=1 but "+format, args...)
		}
		t.Skipf(format+" (set VMEGRESS_E2E=1 to make this a failure)", args...)
	}
	if os.Geteuid() != 0 {
		miss("not running as root")
	}
	for _, c := range append([]string{"ip", "nft"}, commands...) {
		if _, err := exec.LookPath(c); err != nil {
			miss("command %s is not installed", c)
		}
	}
}

// NewNS creates an empty network namespace (loopback up) removed at cleanup.
func NewNS(t testing.TB) string {
	t.Helper()
	var b [4]byte
	rand.Read(b[:])
	name := "vmegt-" + hex.EncodeToString(b[:])
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("bringing lo up in %s: %v: %s", name, err, out)
	}
	return name
}
