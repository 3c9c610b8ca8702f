package e2e

import (
	"bufio"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// planes are the data planes every scenario here runs on.
var planes = []string{"builtin", "envoy"}

const planesConfig = `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: github.com
      - sni: "*.github.com"
      - http: www.github.com
      - sni: private.test
      - sni: meta.test
      - sni: loop.test
  beta:
    subnet: 172.31.0.4/30
    allow:
      - cidr: 198.18.1.22/32
        ports: [22]
`

// newPlaneEnv starts the daemon on a data plane, with guests alpha and beta.
func newPlaneEnv(t *testing.T, plane string) *env {
	t.Helper()
	e := newWorldWith(t, []world.GuestSpec{
		{Project: "alpha", Subnet: alphaSubnet},
		{Project: "beta", Subnet: netip.MustParsePrefix("172.31.0.4/30")},
	}, "dataplane: "+plane+"\n"+planesConfig)
	if plane == "envoy" {
		if _, err := exec.LookPath("envoy"); err != nil {
			e.t.Fatalf("envoy not installed: %v", err)
		}
	}
	e.start()
	return e
}

// envoyPID is the pid of the Envoy the daemon supervises (0 if none).
func (e *env) envoyPID() int {
	out, _ := world.Output(e.ctx, "pgrep", "-f", "-n", e.w.StateDir()+"/envoy-bootstrap.json")
	pid, _ := strconv.Atoi(strings.TrimSpace(out))
	return pid
}

// TestDataPlanes runs the same scenarios on the builtin plane and on a real
// Envoy driven over xDS.
func TestDataPlanes(t *testing.T) {
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			t.Parallel()
			e := newPlaneEnv(t, plane)
			beta := e.w.Guest("beta")
			t.Cleanup(func() {
				if t.Failed() && plane == "envoy" {
					cfgDump, _ := e.envoyAdmin("/config_dump")
					t.Logf("envoy config dump:\n%.20000s", cfgDump)
				}
			})

			// The spec's verification, through the allowlist resolver.
			if body, err := e.curl("https://www.github.com"); err != nil || !strings.HasPrefix(body, "hello from www.github.com; you are "+world.HostUplinkIP.String()) {
				t.Errorf("www.github.com: %q, %v", body, err)
			}
			if _, err := e.curl("https://example.com"); err == nil || !strings.Contains(err.Error(), "Could not resolve host") {
				t.Errorf("example.com: %v; want NXDOMAIN", err)
			}
			_, err := e.curlAt("https://example.com", world.ExampleIP.String())
			switch {
			case err == nil:
				t.Error("example.com at its address succeeded")
			case plane == "builtin" && !strings.Contains(err.Error(), "access denied"):
				t.Errorf("builtin refusal: %v; want a TLS access_denied alert", err)
			case plane == "envoy" && strings.Contains(err.Error(), "access denied"):
				// Pinned difference: Envoy closes the connection, no alert.
				t.Errorf("envoy sent a TLS alert (%v): update the README's list of differences", err)
			}
			// One JSON line per connection, same field names on both planes.
			e.accessLine("sni", "www.github.com", "project", "alpha", "verdict", "allow")
			if line := e.accessLine("sni", "example.com"); line["verdict"] != "deny" {
				t.Errorf("example.com logged as %v", line)
			}
			// SNI spoofing and rebinding.
			if body, err := e.curlAt("https://github.com", world.AttackerIP.String()); err != nil || !strings.HasPrefix(body, "hello from github.com") {
				t.Errorf("github.com aimed at the attacker: %q, %v", body, err)
			}
			for _, name := range []string{"private.test", "meta.test", "loop.test"} {
				if _, err := e.curlAt("https://"+name, world.AttackerIP.String(), "-k", "--max-time", "5"); err == nil {
					t.Errorf("%s succeeded", name)
				}
			}
			// http rules.
			if body, err := e.curl("http://www.github.com/"); err != nil || !strings.HasPrefix(body, "hello from www.github.com via http") {
				t.Errorf("http www.github.com: %q, %v", body, err)
			}
			if out, err := e.curlAt("http://github.com/", world.GitHubIP.String(), "-w", "\n%{http_code}"); err != nil || !strings.HasSuffix(out, "\n403") {
				t.Errorf("http github.com: %q, %v; want 403", out, err)
			}
			// beta: a cidr rule carries a server-first protocol; nothing else.
			var bc net.Conn
			var br *bufio.Reader
			err = world.InNS(beta.NS, func() error {
				var err error
				if bc, err = net.DialTimeout("tcp4", world.BannerIP.String()+":22", 5*time.Second); err != nil {
					return err
				}
				br = bufio.NewReader(bc)
				bc.SetReadDeadline(time.Now().Add(5 * time.Second))
				line, err := br.ReadString('\n')
				if err == nil && line != world.Banner {
					t.Errorf("banner %q", line)
				}
				return err
			})
			if err != nil {
				t.Fatalf("beta's banner: %v", err)
			}
			defer bc.Close()
			if _, err := world.Output(e.ctx, world.NS(beta.NS, "curl", "-sS", "--max-time", "5", "--cacert", e.w.CAFile,
				"--resolve", "www.github.com:443:"+world.WWWGitHubIP.String(), "https://www.github.com")...); err == nil {
				t.Error("beta reached www.github.com (alpha's rule)")
			}

			// A live policy change for alpha: takes effect, Envoy is not
			// restarted, beta's established connection survives.
			pid := e.envoyPID()
			e.writeConfig("dataplane: " + plane + "\n" + strings.Replace(planesConfig, "      - sni: github.com\n", "      - sni: github.com\n      - sni: example.com\n", 1))
			if !waitFor(10*time.Second, func() bool {
				_, err := e.curl("https://example.com", "--max-time", "3")
				return err == nil
			}) {
				t.Error("the new rule for example.com never took effect")
			}
			if plane == "envoy" && (pid == 0 || e.envoyPID() != pid) {
				t.Errorf("envoy was restarted by a policy change (pid %d -> %d)", pid, e.envoyPID())
			}
			if !alive(bc, br) {
				t.Error("beta's connection died when alpha's policy changed")
			}
			e.noLeaks()

			// doctor checks the plane (for Envoy: found, and its version).
			if out, err := e.vmegress("--config", e.cfg, "doctor"); err != nil || (plane == "envoy" && !strings.Contains(out, "1.40")) {
				t.Errorf("doctor on %s: %v\n%s", plane, err, out)
			}
			// The data plane dies: guests get nothing; Envoy comes back.
			if plane == "envoy" {
				exec.Command("kill", "-9", strconv.Itoa(e.envoyPID())).Run()
				if _, err := e.curlAt("https://www.github.com", world.WWWGitHubIP.String(), "--max-time", "2"); err == nil {
					t.Error("egress worked with Envoy dead")
				}
				if !waitFor(15*time.Second, func() bool {
					_, err := e.curl("https://www.github.com", "--max-time", "2")
					return err == nil
				}) {
					t.Error("Envoy was not restarted")
				}
			}
			e.noLeaks()
		})
	}
}
