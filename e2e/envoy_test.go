package e2e

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/nettest"
	"github.com/vmegress/vmegress/internal/world"
)

// startEnvoy runs a real Envoy in the world's host namespace with the
// static bootstrap `vmegress envoy config --static` prints; interception
// comes from `vmegress up`. On failure its log is printed.
func (e *env) startEnvoy() {
	e.t.Helper()
	nettest.Privileged(e.t, "envoy")
	if _, err := e.vmegress("--config", e.cfg, "up"); err != nil {
		e.t.Fatal(err)
	}
	adminSock := filepath.Join(e.w.Dir, "envoy-admin.sock")
	boot, err := e.vmegress("--config", e.cfg, "envoy", "config", "--static", "--admin-socket", adminSock)
	if err != nil {
		e.t.Fatal(err)
	}
	path := filepath.Join(e.w.Dir, "envoy.json")
	os.WriteFile(path, []byte(boot), 0o644)
	if out, err := exec.Command("envoy", "--mode", "validate", "-c", path).CombinedOutput(); err != nil {
		e.t.Fatalf("envoy --mode validate: %v\n%s", err, out)
	}
	// Envoy opens /dev/stdout itself: an append-only file keeps its access
	// log and its stderr from overwriting each other.
	logf, _ := os.OpenFile(filepath.Join(e.w.Dir, "envoy.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	cmd := exec.Command("ip", "netns", "exec", e.w.Host, "envoy", "-c", path, "--disable-hot-restart", "--file-flush-interval-msec", "200", "--log-level", "warning")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if e.t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			e.t.Logf("envoy log:\n%s", b)
		}
	})
	if !waitFor(20*time.Second, func() bool {
		out, err := world.Output(e.ctx, world.NS(e.w.Host, "curl", "-sS", "--fail", "--max-time", "5", "--unix-socket", adminSock, "http://envoy/ready")...)
		return err == nil && strings.TrimSpace(out) == "LIVE"
	}) {
		b, _ := os.ReadFile(logf.Name())
		e.t.Fatalf("envoy not ready:\n%s", b)
	}
}

// TestEnvoyStatic runs the core scenarios against a real Envoy configured
// by the static bootstrap: the spec's verification, SNI spoofing, rebinding,
// http and cidr rules, and fail-closed when Envoy dies.
func TestEnvoyStatic(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	e.writeConfig("dns:\n  upstreams: [" + world.DNSIP.String() + "]\n" + baseConfig)
	e.startEnvoy()

	body, err := e.curlAt("https://www.github.com", world.WWWGitHubIP.String())
	if err != nil || !strings.HasPrefix(body, "hello from www.github.com; you are "+world.HostUplinkIP.String()) {
		t.Errorf("www.github.com through Envoy: %q, %v", body, err)
	}
	if _, err := e.curlAt("https://example.com", world.ExampleIP.String()); err == nil {
		t.Error("example.com through Envoy succeeded")
	}
	if h := e.hits("tls:example.com"); len(h) > 0 {
		t.Errorf("example.com's server saw %+v", h)
	}
	// SNI spoofing: an allowed name aimed at the attacker reaches the name.
	body, err = e.curlAt("https://github.com", world.AttackerIP.String())
	if err != nil || !strings.HasPrefix(body, "hello from github.com") {
		t.Errorf("github.com aimed at the attacker: %q, %v", body, err)
	}
	// Rebinding: allowed names whose answers are private or metadata.
	for _, name := range []string{"private.test", "meta.test", "loop.test"} {
		if _, err := e.curlAt("https://"+name, world.AttackerIP.String(), "-k", "--max-time", "5"); err == nil {
			t.Errorf("%s through Envoy succeeded", name)
		}
	}
	// http rules: allowed Host through, others 403.
	if body, err := e.curlAt("http://www.github.com/", world.WWWGitHubIP.String()); err != nil || !strings.HasPrefix(body, "hello from www.github.com via http") {
		t.Errorf("http www.github.com: %q, %v", body, err)
	}
	if out, err := e.curlAt("http://github.com/", world.GitHubIP.String(), "-w", "\n%{http_code}"); err != nil || !strings.HasSuffix(out, "\n403") {
		t.Errorf("http github.com: %q, %v; want 403", out, err)
	}
	// cidr rule: a server-first banner.
	var banner string
	err = world.InNS(e.g.NS, func() error {
		c, err := net.DialTimeout("tcp4", world.BannerIP.String()+":22", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		banner, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	if err != nil || banner != world.Banner {
		t.Errorf("cidr banner through Envoy: %q, %v", banner, err)
	}
	// Unlisted port: closed at once with nothing received. Envoy closes
	// (FIN) where the builtin plane resets (RST): a pinned difference.
	out, err := e.guest("curl", "-sS", "--max-time", "3", "telnet://"+world.AttackerIP.String()+":22")
	if out != "" || (err != nil && strings.Contains(err.Error(), "timed out")) {
		t.Errorf("attacker:22 through Envoy: %q, %v; want a close with no data, not a hang", out, err)
	}
	e.noLeaks()
}
