package e2e

import (
	"bufio"
	"encoding/json"
	"net"
	"net/netip"
	"strings"
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
	if !waitFor(5*time.Second, func() bool { return strings.Contains(e.d.Stderr(), `"policy reloaded"`) }) {
		t.Fatalf("the daemon did not pick up net up:\n%s", e.d.Stderr())
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
	if _, err := world.Output(e.ctx, world.NS(alpha.NS, "curl", "-sS", "--max-time", "3", "telnet://"+beta.GuestIP.String()+":22")...); err == nil {
		t.Error("alpha reached beta over TCP")
	}
	// beta holds a connection (its cidr rule); alpha goes down; it survives.
	var bc net.Conn
	err := world.InNS(beta.NS, func() error {
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
