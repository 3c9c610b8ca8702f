package e2e

import (
	"bufio"
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// guestBanner dials addr from the guest and reads one line: the banner of a
// server-first service, or an error when the connection is refused.
func (e *env) guestBanner(addr string) (string, error) {
	var line string
	err := world.InNS(e.g.NS, func() error {
		c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	return line, err
}

// TestTCPName: a tcp rule (a wildcard on port 22, no inspection) lets the
// guest reach a server-first service by name once the resolver has answered
// the name to it; the same address without that lookup, a name the rule
// does not match (NXDOMAIN) and that name's address, and a name a tcp deny
// rule refuses under the wildcard (NXDOMAIN) and its address are refused.
// Explain says the name is allowed once resolved and names the rule for
// the address.
func TestTCPName(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - tcp: "*.test"
        ports: [22]
    deny:
      - tcp: attacker.test
`)
	e.start()
	bannerAddr := world.BannerIP.String() + ":22"

	// Before any lookup, the address is handed to no one: refused (at the
	// SYN where the kernel decides; by the data plane, logged, otherwise).
	if line, err := e.guestBanner(bannerAddr); err == nil || strings.Contains(line, "SSH-2.0") {
		t.Errorf("banner before resolving banner.test: %q, %v; want refused", line, err)
	} else if kernelPath() && !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("banner before resolving banner.test: %v; want connection refused", err)
	}
	if !kernelPath() {
		e.accessLine("dst", bannerAddr, "verdict", "deny")
	}
	if h := e.hits("banner"); len(h) > 0 {
		t.Errorf("the banner service was reached before the lookup: %+v", h)
	}

	if out, err := e.guest("dig", "+short", "+time=3", "+tries=1", "banner.test"); err != nil || strings.TrimSpace(out) != world.BannerIP.String() {
		t.Fatalf("dig banner.test: %q, %v; want %s", out, err, world.BannerIP)
	}
	if line, err := e.guestBanner(bannerAddr); err != nil || line != world.Banner {
		t.Errorf("banner after resolving banner.test: %q, %v; want %q", line, err, world.Banner)
	}
	e.accessLine("dst", bannerAddr, "verdict", "allow", "rule", "tcp:*.test ports 22", "resolved", "banner.test")
	// The deny rule's name resolves only if another rule answers it
	// (NXDOMAIN here), so its address stays refused below.

	// A name the rule does not match, and one a deny rule refuses: never
	// answered, their addresses refused.
	for _, name := range []string{"github.com", "attacker.test"} {
		if out, err := e.guest("dig", "+time=3", "+tries=1", name); err != nil || !strings.Contains(out, "status: NXDOMAIN") {
			t.Errorf("dig %s: %v\n%s; want NXDOMAIN", name, err, out)
		}
		addr := world.Names[name].String() + ":22"
		if line, err := e.guestBanner(addr); err == nil {
			t.Errorf("%s's address on port 22: %q; want refused", name, line)
		}
		if !kernelPath() {
			e.accessLine("dst", addr, "verdict", "deny")
		}
	}

	if v, r := e.explainJSON("alpha", "banner.test:22", "none"); v != "allow" || r != "tcp:*.test ports 22" {
		t.Errorf("explain banner.test:22: %s by %q; want allow by tcp:*.test ports 22", v, r)
	}
	if v, r := e.explainJSON("alpha", "attacker.test:22", "none"); v != "deny" || r != "deny/tcp:attacker.test" {
		t.Errorf("explain attacker.test:22: %s by %q; want deny by deny/tcp:attacker.test", v, r)
	}
	// Through the daemon, explain sees what the resolver handed out: the
	// banner's address was (banner.test), github.com's was not.
	out, err := e.vmegress("--config", e.cfg, "policy", "explain", "alpha", bannerAddr)
	if err != nil || !strings.Contains(out, "verdict: allow") || !strings.Contains(out, "rule: tcp:*.test ports 22") {
		t.Errorf("explain %s: %v\n%s", bannerAddr, err, out)
	}
	ghAddr := world.GitHubIP.String() + ":22"
	out, err = e.vmegress("--config", e.cfg, "policy", "explain", "alpha", ghAddr)
	if err != nil || !strings.Contains(out, "verdict: deny") || !strings.Contains(out, "the resolver has not handed "+world.GitHubIP.String()+" to the project for a name matching tcp:*.test ports 22") {
		t.Errorf("explain %s: %v\n%s", ghAddr, err, out)
	}
	e.noLeaks()
}
