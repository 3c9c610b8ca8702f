package e2e

import (
	"bufio"
	"encoding/json"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

const projectsConfig = `projects:
  alpha:
    allow:
      - sni: github.com
  beta:
    allow:
      - sni: www.github.com
      - cidr: 198.18.1.22/32
        ports: [22]
`

// netUp runs `vmegress net up` and plugs a guest into the TAP it made.
func (e *env) netUp(project string, args ...string) (*world.Guest, map[string]any) {
	e.t.Helper()
	out, err := e.vmegress(append([]string{"--config", e.cfg, "net", "up", project, "--json"}, args...)...)
	if err != nil {
		e.t.Fatalf("net up %s: %v", project, err)
	}
	var info map[string]any
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		e.t.Fatalf("net up --json: %v\n%s", err, out)
	}
	g, err := e.w.PlugTAP(e.ctx, project, info["tap"].(string), netip.MustParseAddr(info["guest_ip"].(string)),
		netip.MustParseAddr(info["host_ip"].(string)), info["mac"].(string))
	if err != nil {
		e.t.Fatal(err)
	}
	return g, info
}

// curlFrom runs curl in a guest's namespace.
func (e *env) curlFrom(g *world.Guest, url string, extra ...string) (string, error) {
	args := append([]string{"curl", "-sS", "--max-time", "10", "--cacert", e.w.CAFile}, extra...)
	return world.Output(e.ctx, world.NS(g.NS, append(args, url)...)...)
}

// TestProjectsOnTAPs: projects brought up with `net up` (real TAPs, placed
// /30s) each reach only what their own policy allows; the running daemon
// picks them up without a restart; net down removes one without disturbing
// the other.
func TestProjectsOnTAPs(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, projectsConfig)
	e.start()
	alpha, ainfo := e.netUp("alpha")
	beta, _ := e.netUp("beta")
	if ainfo["kernel_ip_arg"] != "ip=172.31.0.2::172.31.0.1:255.255.255.252::eth0:off:172.31.0.1" {
		t.Errorf("kernel ip= argument: %v", ainfo["kernel_ip_arg"])
	}
	if !strings.Contains(string(mustJSON(ainfo["firecracker_network_interface"])), `"host_dev_name":"tap-alpha"`) {
		t.Errorf("firecracker body: %v", ainfo["firecracker_network_interface"])
	}
	// With the daemon running, net up is the daemon's own change: it has
	// taken effect when the command returns.
	if !strings.Contains(e.d.Stderr(), `"change":"placed","project":"beta"`) {
		t.Fatalf("net up was not made by the daemon:\n%s", e.d.Stderr())
	}
	waitFor(5*time.Second, func() bool { _, err := e.curlFrom(beta, "https://www.github.com"); return err == nil })
	for _, c := range []struct {
		g     *world.Guest
		url   string
		allow bool
	}{
		{alpha, "https://github.com", true},
		{alpha, "https://www.github.com", false},
		{beta, "https://www.github.com", true},
		{beta, "https://github.com", false},
	} {
		_, err := e.curlFrom(c.g, c.url)
		if (err == nil) != c.allow {
			t.Errorf("%s -> %s: %v (want allowed=%v)", c.g.Name, c.url, err, c.allow)
		}
	}
	// Guest to guest: nothing, in any protocol.
	if _, err := world.Output(e.ctx, world.NS(alpha.NS, "ping", "-c", "1", "-W", "1", beta.GuestIP.String())...); err == nil {
		t.Error("alpha pinged beta")
	}
	sshd, err := world.ListenIn(beta.NS, "tcp4", ":22")
	if err != nil {
		t.Fatal(err)
	}
	var reached atomic.Int32
	go func() {
		for {
			c, err := sshd.Accept()
			if err != nil {
				return
			}
			reached.Add(1)
			c.Close()
		}
	}()
	world.Output(e.ctx, world.NS(alpha.NS, "curl", "-sS", "--max-time", "3", "telnet://"+beta.GuestIP.String()+":22")...)
	sshd.Close()
	if reached.Load() > 0 {
		t.Error("alpha reached beta over TCP")
	}
	// beta holds a connection (its cidr rule); alpha goes down; it survives.
	var bc net.Conn
	err = world.InNS(beta.NS, func() error {
		var err error
		bc, err = net.DialTimeout("tcp4", world.BannerIP.String()+":22", 5*time.Second)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer bc.Close()
	br := bufio.NewReader(bc)
	bc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, err := br.ReadString('\n'); err != nil || line != world.Banner {
		t.Fatalf("beta's banner: %q, %v", line, err)
	}
	out, err := e.vmegress("--config", e.cfg, "net", "down", "alpha")
	if err != nil || !strings.Contains(out, "project alpha down") {
		t.Fatalf("net down alpha: %q, %v", out, err)
	}
	if out, err := e.vmegress("--config", e.cfg, "net", "down", "alpha"); err != nil || !strings.Contains(out, "not up") {
		t.Errorf("second net down: %q, %v", out, err)
	}
	if _, err := world.Output(e.ctx, world.NS(e.w.Host, "ip", "link", "show", "tap-alpha")...); err == nil {
		t.Error("tap-alpha still exists")
	}
	time.Sleep(300 * time.Millisecond) // the reload after net down
	if !alive(bc, br) {
		t.Error("beta's connection died when alpha went down")
	}
	out, err = e.vmegress("--config", e.cfg, "net", "list")
	if err != nil || strings.Contains(out, "alpha") || !strings.Contains(out, "beta") {
		t.Errorf("net list: %q, %v", out, err)
	}
	e.noLeaks()
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

// TestSSHAndNATEgress: --ssh-port forwards inbound SSH to the guest (and
// only replies go back); --egress nat gives the spec's unfiltered direct NAT
// to that project alone.
func TestSSHAndNATEgress(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, projectsConfig)
	e.start()
	alpha, _ := e.netUp("alpha", "--ssh-port", "2201")
	beta, _ := e.netUp("beta", "--egress", "nat")
	// An "sshd" in alpha's guest.
	ln, err := world.ListenIn(alpha.NS, "tcp4", ":22")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("SSH-2.0-guest-alpha\r\n"))
			c.Close()
		}
	}()
	var banner string
	if !waitFor(5*time.Second, func() bool {
		err := world.InNS(e.w.Inet, func() error {
			c, err := net.DialTimeout("tcp4", world.HostUplinkIP.String()+":2201", 2*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			banner, err = bufio.NewReader(c).ReadString('\n')
			return err
		})
		return err == nil
	}) || banner != "SSH-2.0-guest-alpha\r\n" {
		t.Errorf("inbound SSH through host port 2201: %q", banner)
	}
	// Port 2201 to an address the host only routes (here beta's guest) is
	// not the host's SSH forward: it never reaches alpha's sshd.
	err = world.InNS(e.w.Inet, func() error {
		c, err := net.DialTimeout("tcp4", beta.GuestIP.String()+":2201", 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err == nil {
			t.Errorf("port 2201 of a routed address reached a guest: %q", line)
		}
		return nil
	})
	_ = err
	// alpha's own egress is still filtered.
	if _, err := e.curlFrom(alpha, "https://example.com", "--resolve", "example.com:443:"+world.ExampleIP.String()); err == nil {
		t.Error("alpha (proxied, with SSH) reached example.com")
	}
	// beta: direct NAT, unfiltered, masqueraded to the host's address.
	body, err := e.curlFrom(beta, "https://example.com", "--resolve", "example.com:443:"+world.ExampleIP.String())
	if err != nil || !strings.Contains(body, "you are "+world.HostUplinkIP.String()) {
		t.Errorf("beta (nat egress): %q, %v", body, err)
	}
	// ... but never to another guest or the host.
	if _, err := world.Output(e.ctx, world.NS(beta.NS, "curl", "-sS", "--max-time", "3", "telnet://"+alpha.GuestIP.String()+":22")...); err == nil {
		t.Error("beta (nat) reached alpha's guest")
	}
	// doctor judges the ruleset with the placed projects (NAT, SSH) in it.
	if out, _ := e.vmegress("--config", e.cfg, "doctor"); !strings.Contains(out, "[ok  ] ruleset") {
		t.Errorf("doctor's ruleset check with NAT and SSH projects placed:\n%s", out)
	}
}

// TestSpecScripts: microvm-net-up.sh / -down.sh keep the spec's interface;
// MICROVM_EGRESS_VIA_ENVOY=1 gives proxied egress and never NAT, unset gives
// direct NAT; `down --restore-nat` switches everyone to NAT (spec 6.8).
func TestSpecScripts(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, projectsConfig)
	e.start()
	script := func(env []string, name string, args ...string) string {
		t.Helper()
		argv := append([]string{"env", "VMEGRESS=" + binary, "VMEGRESS_CONFIG=" + e.cfg, "VMEGRESS_STATE_DIR=" + e.w.StateDir(), "VMEGRESS_API_SOCKET=" + e.w.APISocket()}, env...)
		argv = append(argv, append([]string{"../scripts/" + name}, args...)...)
		out, err := world.Output(e.ctx, world.NS(e.w.Host, argv...)...)
		if err != nil {
			t.Fatalf("%s %v: %v", name, args, err)
		}
		return out
	}
	plug := func(out string) *world.Guest {
		t.Helper()
		fields := map[string]string{}
		for _, l := range strings.Split(out, "\n") {
			if k, v, ok := strings.Cut(l, "  "); ok {
				fields[strings.TrimSpace(k)] = strings.TrimSpace(v)
			}
		}
		g, err := e.w.PlugTAP(e.ctx, fields["project"], fields["tap"], netip.MustParseAddr(fields["guest ip"]), netip.MustParseAddr(fields["host ip"]), fields["mac"])
		if err != nil {
			t.Fatalf("plugging %q: %v", out, err)
		}
		return g
	}
	alpha := plug(script([]string{"MICROVM_EGRESS_VIA_ENVOY=1"}, "microvm-net-up.sh", "alpha", "2201"))
	beta := plug(script(nil, "microvm-net-up.sh", "beta"))
	if nat := natMembers(t, e); strings.Contains(nat, "tap-alpha") || strings.Contains(nat, alpha.GuestIP.String()) ||
		!(strings.Contains(nat, "tap-beta") || strings.Contains(nat, beta.GuestIP.String()+"\n")) {
		t.Errorf("NAT set after the scripts:\n%s", nat)
	}
	at := func(g *world.Guest) error {
		_, err := e.curlFrom(g, "https://example.com", "--resolve", "example.com:443:"+world.ExampleIP.String(), "--max-time", "3")
		return err
	}
	if at(alpha) == nil {
		t.Error("alpha (MICROVM_EGRESS_VIA_ENVOY=1) reached example.com")
	}
	if err := at(beta); err != nil {
		t.Errorf("beta (direct NAT) did not reach example.com: %v", err)
	}
	script(nil, "microvm-net-down.sh", "beta")
	if out, _ := e.vmegress("--config", e.cfg, "net", "list"); strings.Contains(out, "beta") {
		t.Errorf("beta still listed:\n%s", out)
	}
	// Spec 6.8: stop the proxy, restore direct NAT for everyone.
	if out, err := e.vmegress("--config", e.cfg, "down", "--restore-nat"); err == nil {
		t.Errorf("restore-nat with the daemon running succeeded: %s", out)
	}
	e.d.Stop(5 * time.Second)
	if out, err := e.vmegress("--config", e.cfg, "down", "--restore-nat"); err != nil {
		t.Fatalf("down --restore-nat: %v\n%s", err, out)
	}
	if err := at(alpha); err != nil {
		t.Errorf("alpha after --restore-nat: %v", err)
	}
	if rules := mustOutput(t, e, "ip", "rule"); strings.Contains(rules, "fwmark") {
		t.Errorf("policy routing left after --restore-nat:\n%s", rules)
	}
}

// natMembers lists the direct-NAT membership: the nftables set of
// interfaces, or the iptables backend's ipset of guest addresses (one a line).
func natMembers(t *testing.T, e *env) string {
	t.Helper()
	if !onIPTables() {
		return mustOutput(t, e, "nft", "list", "set", "inet", "vmegress", "nat_ifaces")
	}
	sets, err := world.Ipsets(e.w.Host)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range sets {
		if members, ok := strings.CutPrefix(s, "vmegress-nat: "); ok {
			return strings.ReplaceAll(members, " ", "\n") + "\n"
		}
	}
	t.Fatalf("no ipset vmegress-nat in %v", sets)
	return ""
}

// TestNATUplink: `uplink` ties direct NAT egress to that interface (the
// spec's LAN_IF): named right, a NAT project gets out; named wrong, nothing.
func TestNATUplink(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, "uplink: up0\n"+projectsConfig)
	e.start()
	beta, _ := e.netUp("beta", "--egress", "nat")
	reach := func() error {
		_, err := e.curlFrom(beta, "https://example.com", "--resolve", "example.com:443:"+world.ExampleIP.String(), "--max-time", "3")
		return err
	}
	if err := reach(); err != nil {
		t.Errorf("NAT egress by the named uplink up0: %v", err)
	}
	// A restart with another uplink: up0 is no longer a way out.
	e.d.Stop(10 * time.Second)
	e.writeConfig("uplink: nosuch0\n" + projectsConfig)
	e.start()
	if err := reach(); err == nil {
		t.Error("NAT egress left by up0 with uplink nosuch0")
	}
	e.noLeaks()
}
