package e2e

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/vmegress/vmegress/internal/world"
)

// TestDaemonlessChange: with the daemon stopped (its interception stays,
// fail-closed), the CLI's own engine makes a policy change to the ruleset
// the daemon left, as the daemon would: a cidr rule removed cuts the open
// kernel-forwarded flow and refuses new ones, a cidr rule added opens the
// kernel path, and the addresses the resolver admitted for the project's
// tcp rule are withdrawn (no resolver is running to vouch for them), so a
// guest's cached answer opens nothing.
func TestDaemonlessChange(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, "projects: {}\n")
	e.start()
	g, _ := e.netUp("alpha")
	e.g = g
	bannerAddr := world.BannerIP.String() + ":22"
	set := func(policy string) {
		t.Helper()
		f := filepath.Join(e.w.Dir, "policy.yaml")
		if err := os.WriteFile(f, []byte(policy), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := e.vmegress("--config", e.cfg, "policy", "set", "alpha", f); err != nil {
			t.Fatalf("policy set: %v\n%s", err, out)
		}
	}
	refused := func(when string) {
		t.Helper()
		if line, err := e.guestBanner(bannerAddr); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%s: %s: %q, %v; want connection refused", when, bannerAddr, line, err)
		}
	}
	const cidr = "allow:\n  - sni: github.com\n  - cidr: 198.18.1.22/32\n    ports: [22]\n"
	const noCIDR = "allow:\n  - sni: github.com\n"
	set(cidr)
	c, r := e.bannerConn()
	e.d.Kill()
	if !alive(c, r) {
		t.Fatal("with the daemon killed, the open kernel flow stopped before any change")
	}

	set(noCIDR)
	if alive(c, r) {
		t.Error("a cidr rule removed with no daemon running left its open flow up")
	}
	c.Close()
	refused("cidr rule removed with no daemon running")

	set(cidr)
	c, r = e.bannerConn()
	if !alive(c, r) {
		t.Error("a cidr rule added with no daemon running does not forward")
	}
	c.Close()

	// A tcp rule's admission, made by a running daemon's resolver.
	e.start()
	set("allow:\n  - sni: github.com\n  - tcp: \"*.test\"\n    ports: [22]\n")
	if out, err := e.guest("dig", "+short", "+time=3", "+tries=1", "banner.test"); err != nil || strings.TrimSpace(out) != world.BannerIP.String() {
		t.Fatalf("dig banner.test: %q, %v", out, err)
	}
	c, r = e.bannerConn()
	e.d.Kill()
	// Any change of the project (here: one more rule; the tcp rule stays).
	set("allow:\n  - sni: github.com\n  - sni: example.com\n  - tcp: \"*.test\"\n    ports: [22]\n")
	if alive(c, r) {
		t.Error("the tcp rule's open flow outlived the withdrawal of its admission")
	}
	c.Close()
	refused("a change with no daemon running (no resolver vouches for the answer)")
	if out, _ := world.Output(e.ctx, world.NS(e.w.Host, "nft", "list", "set", "inet", "vmegress", "k_tcp")...); !onIPTables() && strings.Contains(out, world.BannerIP.String()) {
		t.Errorf("the admission outlived the daemonless change:\n%s", out)
	}
}
