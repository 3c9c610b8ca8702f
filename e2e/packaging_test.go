package e2e

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/nettest"
)

// TestSystemdUnit checks the shipped unit with systemd-analyze verify (with
// ExecStart pointed at the binary under test, which verify requires to exist).
func TestSystemdUnit(t *testing.T) {
	nettest.Privileged(t, "systemd-analyze", "envoy")
	unit, err := os.ReadFile("../packaging/systemd/vmegress.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Type=notify", "Restart=on-failure", "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW\n", "ExecReload=/bin/kill -HUP $MAINPID"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	envoyBin, err := exec.LookPath("envoy")
	if err != nil {
		t.Fatalf("envoy: %v", err)
	}
	dir := t.TempDir()
	for name, replace := range map[string][2]string{
		"vmegress.service":             {"/usr/bin/vmegress", binary},
		"envoy-microvm-egress.service": {"/usr/bin/envoy", envoyBin},
	} {
		unit, err := os.ReadFile("../packaging/systemd/" + name)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, name)
		os.WriteFile(path, []byte(strings.ReplaceAll(string(unit), replace[0], replace[1])), 0o644)
		out, err := exec.Command("systemd-analyze", "verify", path).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "" {
			t.Errorf("systemd-analyze verify %s: %v\n%s", name, err, out)
		}
	}
}

// TestNotifyReady: under Type=notify the daemon says READY=1 once it serves.
func TestNotifyReady(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	sock := filepath.Join(e.w.Dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	d, err := e.w.StartDaemon(e.ctx, binary, e.cfg, "NOTIFY_SOCKET="+sock)
	if err != nil {
		t.Fatal(err)
	}
	e.d = d
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 256)
	n, _, err := conn.ReadFromUnix(buf)
	if err != nil || string(buf[:n]) != "READY=1" {
		t.Fatalf("notify: %q, %v", buf[:n], err)
	}
	// Ready means serving: an allowed request works right away.
	if _, err := e.curl("https://www.github.com"); err != nil {
		t.Errorf("not serving at READY=1: %v", err)
	}
}
