package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/vmegress/vmegress/internal/world"
)

// kernelPath reports whether the suite's firewall backend carries out cidr
// rules and port refusals itself (both backends do).
func kernelPath() bool { return true }

// hostSockets lists the host namespace's TCP sockets with port in their
// local or remote address (ss): the data plane's, Envoy's or the proxy's.
func (e *env) hostSockets(port int) string {
	out, _ := world.Output(e.ctx, world.NS(e.w.Host, "ss", "-Htan", fmt.Sprintf("( sport = :%d or dport = :%d )", port, port))...)
	return strings.TrimSpace(out)
}

// TestKernelPath: a cidr rule's flow is forwarded by the kernel, with no
// socket of the daemon or Envoy for it, logged with its bytes when it
// ends, cut by a policy change that removes the rule; a port with no rule
// is refused at the SYN ("connection refused") without the data plane
// seeing it; with the daemon killed, the kernel still forwards what the
// sets allow and nothing else starts.
func TestKernelPath(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	banner, br := e.bannerConn()
	if !alive(banner, br) {
		t.Fatal("the banner connection does not echo")
	}
	if kernelPath() {
		if s := e.hostSockets(22); s != "" {
			t.Errorf("a host socket carries the cidr rule's flow (it should be the kernel's alone):\n%s", s)
		}
	}
	banner.Close()
	if kernelPath() {
		m := e.accessLine("dst", world.BannerIP.String()+":22", "verdict", "allow", "path", "kernel")
		if m["rule"] != "cidr:198.18.1.22/32 ports 22" || m["project"] != "alpha" {
			t.Errorf("kernel flow logged as %v", m)
		}
		if up, _ := m["bytes_up"].(float64); up <= 0 {
			t.Errorf("kernel flow logged without the bytes it sent: %v", m)
		}
		if down, _ := m["bytes_down"].(float64); down <= float64(len(world.Banner)) {
			t.Errorf("kernel flow logged without the bytes it received: %v", m)
		}
	}

	// A port no rule names: refused at the SYN, never seen by the data plane.
	var dialErr error
	world.InNS(e.g.NS, func() error {
		c, err := net.DialTimeout("tcp4", world.BannerIP.String()+":23", 5*time.Second)
		if err == nil {
			// The old path: accepted by the data plane, then closed.
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			_, err = c.Read(make([]byte, 1))
			c.Close()
		}
		dialErr = err
		return nil
	})
	switch {
	case dialErr == nil:
		t.Error("a connection to a port with no rule got data")
	case kernelPath() && !errors.Is(dialErr, syscall.ECONNREFUSED):
		t.Errorf("a connection to a port with no rule failed with %v; want connection refused (reset at the SYN)", dialErr)
	}
	if kernelPath() {
		time.Sleep(300 * time.Millisecond)
		for _, m := range e.d.AccessLog() {
			if m["dst"] == world.BannerIP.String()+":23" {
				t.Errorf("the data plane saw the refused connection: %v", m)
			}
		}
		if out := synRefused(t, e); !strings.Contains(out, e.g.GuestIP.String()+" counter packets") {
			t.Errorf("the refusal is not counted for the guest:\n%s", out)
		}
	}

	// A policy change that removes the rule cuts the open flow.
	banner, br = e.bannerConn()
	revoked := strings.Replace(baseConfig, "      - cidr: 198.18.1.22/32  # a server-first banner service\n        ports: [22]\n", "", 1)
	if err := e.writeConfig(revoked); err != nil {
		t.Fatal(err)
	}
	if !waitFor(5*time.Second, func() bool { return strings.Count(e.d.Stderr(), `"policy reloaded"`) >= 1 }) {
		t.Fatalf("no reload after the config file changed:\n%s", e.d.Stderr())
	}
	if !waitFor(5*time.Second, func() bool { return !alive(banner, br) }) {
		t.Error("the kernel-forwarded flow the new policy refuses is still open")
	}
	banner.Close()
	if kernelPath() {
		e.accessLine("dst", world.BannerIP.String()+":22", "verdict", "revoked", "path", "kernel")
	}
	// Back again, for the daemon-killed part.
	if err := e.writeConfig(baseConfig); err != nil {
		t.Fatal(err)
	}
	if !waitFor(5*time.Second, func() bool { return strings.Count(e.d.Stderr(), `"policy reloaded"`) >= 2 }) {
		t.Fatalf("no second reload:\n%s", e.d.Stderr())
	}
	if !kernelPath() {
		return
	}
	e.d.Kill()
	// The kernel forwards what the sets allow; nothing else starts.
	c, r := e.bannerConn()
	if !alive(c, r) {
		t.Error("with the daemon killed, a flow the sets allow does not pass")
	}
	c.Close()
	if out, err := e.curl("https://github.com/"); err == nil {
		t.Errorf("with the daemon killed, HTTPS got through: %q", out)
	}
	world.InNS(e.g.NS, func() error {
		c, err := net.DialTimeout("tcp4", world.BannerIP.String()+":23", 5*time.Second)
		if err == nil {
			c.Close()
			t.Error("with the daemon killed, a port with no rule accepted a connection")
		}
		return nil
	})
	// The rule changed while no daemon runs (another address: the guest's
	// interface still forwards): the next start cuts the flow left open
	// from before it.
	c, r = e.bannerConn()
	if err := e.writeConfig(strings.Replace(baseConfig, "- cidr: 198.18.1.22/32", "- cidr: 198.18.1.23/32", 1)); err != nil {
		t.Fatal(err)
	}
	e.start()
	if alive(c, r) {
		t.Error("a daemon started on a policy without the cidr rule left the flow open from before the start")
	}
	c.Close()
	e.noLeaks()
}

// TestTCPNameKernel: with no tcp deny rule to weigh, a tcp rule is decided
// by the kernel on either data plane: the resolver's answer becomes a
// timed element before it leaves, the flow has no host socket and is
// logged with the tcp rule, an address the project was not handed (or a
// name the rule does not match) is refused at the SYN, and a policy change
// that drops the rule withdraws the element at once.
func TestTCPNameKernel(t *testing.T) {
	t.Parallel()
	cfg := `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: github.com
      - tcp: "*.test"
        ports: [22]
`
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, cfg)
	e.start()
	bannerAddr := world.BannerIP.String() + ":22"
	refused := func(addr string) {
		t.Helper()
		if line, err := e.guestBanner(addr); err == nil || !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%s: %q, %v; want connection refused", addr, line, err)
		}
	}
	refused(bannerAddr) // not handed out yet
	if out, err := e.guest("dig", "+short", "+time=3", "+tries=1", "banner.test"); err != nil || strings.TrimSpace(out) != world.BannerIP.String() {
		t.Fatalf("dig banner.test: %q, %v", out, err)
	}
	c, r := e.bannerConn()
	if !alive(c, r) {
		t.Fatal("the tcp rule's flow does not echo")
	}
	if s := e.hostSockets(22); s != "" {
		t.Errorf("a host socket carries the tcp rule's flow:\n%s", s)
	}
	c.Close()
	e.accessLine("dst", bannerAddr, "verdict", "allow", "rule", "tcp:*.test ports 22", "path", "kernel")
	// The address of a name the project never resolved, on the same port.
	refused(world.GitHubIP.String() + ":22")

	// Dropping the rule withdraws the element: the guest's cached answer
	// opens nothing.
	if err := e.writeConfig(strings.Replace(cfg, "      - tcp: \"*.test\"\n        ports: [22]\n", "", 1)); err != nil {
		t.Fatal(err)
	}
	if !waitFor(5*time.Second, func() bool { return strings.Contains(e.d.Stderr(), `"policy reloaded"`) }) {
		t.Fatalf("no reload:\n%s", e.d.Stderr())
	}
	refused(bannerAddr)
	if out, _ := world.Output(e.ctx, world.NS(e.w.Host, "nft", "list", "set", "inet", "vmegress", "k_tcp")...); !onIPTables() && strings.Contains(out, world.BannerIP.String()) {
		t.Errorf("the element outlived the rule:\n%s", out)
	}
	e.noLeaks()
}

// synRefused lists the per-guest count of connections refused at the SYN:
// the nftables set, or the iptables backend's ipset (written the same way,
// "ADDR counter packets N").
func synRefused(t *testing.T, e *env) string {
	t.Helper()
	if !onIPTables() {
		out, _ := world.Output(e.ctx, world.NS(e.w.Host, "nft", "list", "set", "inet", "vmegress", "syn_refused")...)
		return out
	}
	h, err := netns.GetFromName(e.w.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h, syscall.NETLINK_NETFILTER)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	res, err := nl.IpsetList("vmegress-syn-refused")
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, m := range res.Entries {
		if m.Packets != nil && *m.Packets > 0 {
			fmt.Fprintf(&b, "%s counter packets %d\n", m.IP, *m.Packets)
		}
	}
	return b.String()
}

// TestKernelFlowCounted: a kernel-forwarded flow that ends is counted in
// the metrics (a connection, and its bytes each way) and published on the
// API's event stream, as a proxied connection is.
func TestKernelFlowCounted(t *testing.T) {
	t.Parallel()
	if !kernelPath() {
		t.Skip("no kernel path")
	}
	e := newWorld(t)
	e.writeConfig("admin: 127.0.0.1:9901\n" + baseConfig)
	e.start()
	evCtx, stopEvents := context.WithCancel(e.ctx)
	// The stream's output, read while the command writes it.
	var mu sync.Mutex
	var events bytes.Buffer
	ev := exec.CommandContext(evCtx, "ip", world.NS(e.w.Host, binary, "--state-dir", e.w.StateDir(), "--api-socket", e.w.APISocket(),
		"--config", e.cfg, "events", "--project", "alpha")[1:]...)
	ev.Stdout = writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return events.Write(p) })
	if err := ev.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stopEvents(); ev.Wait() }()
	streamed := func() string { mu.Lock(); defer mu.Unlock(); return events.String() }
	time.Sleep(300 * time.Millisecond) // subscribed
	banner, br := e.bannerConn()
	if !alive(banner, br) {
		t.Fatal("the banner connection does not echo")
	}
	// Open, it is counted by the kernel flows' gauge (no data plane sees it).
	open, err := e.hostGet("http://127.0.0.1:9901/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(open, `vmegress_kernel_active_flows{project="alpha"} 1`+"\n") {
		t.Errorf("with the kernel flow open, the gauge does not count it:\n%s", grepLines(open, "vmegress_kernel_active_flows"))
	}
	banner.Close()
	e.accessLine("dst", world.BannerIP.String()+":22", "path", "kernel")
	metrics, err := e.hostGet("http://127.0.0.1:9901/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`vmegress_proxy_connections_total{project="alpha",verdict="allow"} 1`,
		`vmegress_proxy_bytes_total{direction="down",project="alpha"}`,
		`vmegress_proxy_bytes_total{direction="up",project="alpha"}`,
	} {
		if !strings.Contains(metrics, want+"\n") && !strings.Contains(metrics, want+" ") {
			t.Errorf("metrics lack %s:\n%s", want, metrics)
		}
	}
	if strings.Contains(metrics, `vmegress_kernel_active_flows{project="alpha"} 1`) {
		t.Errorf("the ended kernel flow is still counted open:\n%s", grepLines(metrics, "vmegress_kernel_active_flows"))
	}
	for _, l := range strings.Split(metrics, "\n") {
		if strings.HasPrefix(l, `vmegress_proxy_bytes_total{`) && strings.Contains(l, `project="alpha"`) && strings.HasSuffix(l, " 0") {
			t.Errorf("no bytes counted: %s", l)
		}
	}
	if !waitFor(5*time.Second, func() bool {
		s := streamed()
		return strings.Contains(s, `"path":"kernel"`) && strings.Contains(s, world.BannerIP.String()+":22")
	}) {
		t.Errorf("the kernel flow is not on the event stream:\n%s", streamed())
	}
}

// writerFunc is an io.Writer.
type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
