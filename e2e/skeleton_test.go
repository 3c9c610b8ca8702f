package e2e

import (
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	mdns "github.com/miekg/dns"

	"github.com/vmegress/vmegress/internal/world"
)

// TestSpecVerification is spec 6.10 step 3: from the microVM, curl
// https://www.github.com succeeds and curl https://example.com is refused.
func TestSpecVerification(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, name := range []string{"github.com", "www.github.com"} {
		body, err := e.curl("https://" + name)
		if err != nil {
			t.Fatalf("curl https://%s from the guest: %v", name, err)
		}
		// The server sees the host's address, not the guest's.
		if want := "hello from " + name + "; you are " + world.HostUplinkIP.String() + ":"; !strings.HasPrefix(body, want) {
			t.Errorf("body %q, want prefix %q", body, want)
		}
		hits := e.hits("tls:" + name)
		if len(hits) == 0 || !strings.HasPrefix(hits[0].Remote, world.HostUplinkIP.String()+":") {
			t.Errorf("server %s saw %+v; want a connection from the host's address", name, hits)
		}
		line := e.accessLine("sni", name, "verdict", "allow")
		for k, want := range map[string]string{"project": "alpha", "src": e.g.GuestIP.String(), "dst": world.Names[name].String() + ":443"} {
			if got, _ := line[k].(string); !strings.HasPrefix(got, want) {
				t.Errorf("access log %s = %q, want %q", k, got, want)
			}
		}
		if line["bytes_up"].(float64) <= 0 || line["bytes_down"].(float64) <= 0 {
			t.Errorf("access log bytes: %v up, %v down", line["bytes_up"], line["bytes_down"])
		}
	}
	if line, want := e.accessLine("sni", "github.com"), wantRule("sni:github.com", "sni", "alpha/tls/443"); line["rule"] != want {
		t.Errorf("github.com allowed by %v, want %s", line["rule"], want)
	}
	if line, want := e.accessLine("sni", "www.github.com"), wantRule("sni:*.github.com", "sni", "alpha/tls/443"); line["rule"] != want {
		t.Errorf("www.github.com allowed by %v, want %s", line["rule"], want)
	}

	// example.com is not resolved: NXDOMAIN, and the query never leaves.
	_, err := e.curl("https://example.com")
	if err == nil || !strings.Contains(err.Error(), "Could not resolve host") {
		t.Fatalf("curl https://example.com: %v; want a failed name resolution", err)
	}
	for _, q := range e.w.Log.Queries() {
		if q == "example.com" {
			t.Error("the query for example.com reached the fake internet's DNS server")
		}
	}
	// With the address known anyway, it is refused promptly and readably:
	// a TLS access_denied alert, not a timeout.
	_, err = e.curlAt("https://example.com", world.ExampleIP.String())
	refusedReadably(t, err, true)
	if h := e.hits("tls:example.com"); len(h) > 0 {
		t.Errorf("example.com's server saw %+v", h)
	}
	line := e.accessLine("sni", "example.com")
	// Envoy's deny chain is shared: it knows no project (README).
	if line["verdict"] != "deny" || (!onEnvoy() && (line["project"] != "alpha" || !strings.Contains(line["reason"].(string), "no sni rule"))) {
		t.Errorf("access log for example.com: %v", line)
	}
	e.noLeaks()
}

// TestNonTLSDenied: plain TCP to 443 and anything to port 80 are refused.
func TestNonTLSDenied(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for url, ip := range map[string]string{
		"http://github.com:443/": world.GitHubIP.String(),   // plain HTTP on a TLS port
		"http://attacker.test/":  world.AttackerIP.String(), // an unlisted name on port 80
		"http://github.com/":     world.GitHubIP.String(),   // an sni rule is not an http rule
	} {
		if out, err := e.curlAt(url, ip, "--fail"); err == nil {
			t.Errorf("curl %s succeeded: %q", url, out)
		} else if strings.Contains(err.Error(), "timed out") {
			t.Errorf("curl %s timed out instead of being refused: %v", url, err)
		}
	}
	// A port no rule names is refused at once, even for a client that waits
	// for the server to speak first.
	// (Envoy accepts and closes without data where the builtin plane resets.)
	if out, err := e.guest("curl", "-sS", "--max-time", "3", "telnet://"+world.AttackerIP.String()+":22"); (err == nil && !onEnvoy()) || out != "" {
		t.Errorf("telnet to attacker:22 got %q, %v", out, err)
	} else if err != nil && strings.Contains(err.Error(), "timed out") {
		t.Errorf("telnet to attacker:22 hung: %v", err)
	}
	if h := e.hits("http:"); len(h) > 0 {
		t.Errorf("plain HTTP servers saw %+v", h)
	}
	line := e.accessLine("dst", world.GitHubIP.String()+":443")
	if line["verdict"] != "deny" || (!onEnvoy() && line["reason"] != "not a TLS ClientHello") {
		t.Errorf("plain TCP to 443: %v", line)
	}
	e.accessLine("dst", world.GitHubIP.String()+":80", "verdict", "deny", "host", "github.com")
	if kernelPath() {
		// Refused at the SYN by the ruleset: the data plane never saw it.
		for _, m := range e.d.AccessLog() {
			if m["dst"] == world.AttackerIP.String()+":22" {
				t.Errorf("the data plane saw attacker:22: %v", m)
			}
		}
	} else if line := e.accessLine("dst", world.AttackerIP.String()+":22"); line["verdict"] != "deny" || (!onEnvoy() && line["reason"] != "no rule of project alpha allows port 22") {
		t.Errorf("attacker:22: %v", line)
	}
	e.noLeaks()
}

// TestFailClosedWhenProxyDies: with the proxy killed (-9) and forwarding on,
// nothing from the guest reaches the fake internet; a restart reconciles.
func TestFailClosedWhenProxyDies(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	if _, err := e.curl("https://www.github.com"); err != nil {
		t.Fatalf("allowed name before the crash: %v", err)
	}
	e.d.Kill()
	e.w.Log.Reset()
	if _, err := e.guest("dig", "+time=2", "+tries=1", "github.com"); err == nil {
		t.Error("DNS answered with the daemon dead")
	}
	if out, _ := world.Output(e.ctx, world.NS(e.w.Host, "sysctl", "-n", "net.ipv4.ip_forward")...); strings.TrimSpace(out) != "1" {
		t.Fatalf("ip_forward is %q; the test needs forwarding on", out)
	}
	var wg sync.WaitGroup
	for url, ip := range map[string]world.Hit{
		"https://www.github.com":     {Remote: world.WWWGitHubIP.String()},
		"https://example.com":        {Remote: world.ExampleIP.String()},
		"https://attacker.test:8443": {Remote: world.AttackerIP.String()},
		"http://attacker.test/":      {Remote: world.AttackerIP.String()},
		"telnet://banner.test:22":    {Remote: world.BannerIP.String()},
	} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := e.curlAt(url, ip.Remote, "--max-time", "3"); err == nil {
				t.Errorf("curl %s succeeded with the proxy dead", url)
			}
		}()
	}
	wg.Wait()
	if h := e.w.Log.Hits(); len(h) > 0 {
		t.Errorf("with the proxy dead the fake internet saw %+v", h)
	}
	e.noLeaks()

	// A new run replaces whatever the crashed one left and serves again.
	e.start()
	if _, err := e.curl("https://www.github.com"); err != nil {
		t.Errorf("after restart: %v", err)
	}
	// SIGTERM stops the data plane but leaves interception: still closed.
	if err := e.d.Stop(10 * time.Second); err != nil {
		t.Errorf("stopping the daemon: %v", err)
	}
	e.w.Log.Reset()
	if _, err := e.curlAt("https://www.github.com", world.WWWGitHubIP.String(), "--max-time", "3"); err == nil {
		t.Error("curl succeeded after the daemon stopped")
	}
	if h := e.w.Log.Hits(); len(h) > 0 {
		t.Errorf("after the daemon stopped the fake internet saw %+v", h)
	}
	e.noLeaks()
}

// TestOtherProtocolsNeverLeave: UDP (DNS, QUIC), ICMP and IPv6 from the guest
// arrive nowhere. The world first proves that without vmegress they would.
func TestOtherProtocolsNeverLeave(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	// Control: without interception, the forwarding host lets all of it out.
	e.sendUDP("udp4", world.AttackerIP.String()+":9999")
	if _, err := e.guest("ping", "-c", "1", "-W", "2", world.AttackerIP.String()); err != nil {
		t.Fatalf("control: ping without vmegress failed, so the test could not see a leak: %v", err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for len(e.hits("attacker:udp:9999")) == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if len(e.hits("attacker:udp:9999")) == 0 {
		t.Fatal("control: UDP without vmegress did not arrive, so the test could not see a leak")
	}
	v4, _, err := e.w.LeakedPackets(e.ctx)
	if err != nil || v4 == 0 {
		t.Fatalf("control: the probe counted %d guest packets (%v)", v4, err)
	}
	// Forget the control's traffic: rebuild the probe by reading the baseline.
	base4, base6, _ := e.w.LeakedPackets(e.ctx)
	e.w.Log.Reset()

	e.start()
	e.sendUDP("udp4", world.AttackerIP.String()+":9999")
	e.sendUDP("udp4", world.AttackerIP.String()+":443") // QUIC
	e.sendUDP("udp6", "["+world.InetIP6.String()+"]:9999")
	e.sendUDP("udp4", world.AttackerIP.String()+":853") // DNS over QUIC
	if out, err := e.guest("curl", "-sS", "--max-time", "3", "telnet://"+world.AttackerIP.String()+":853"); err == nil {
		t.Errorf("TCP 853 (DNS over TLS) got through: %q", out)
	}
	if _, err := e.guest("ping", "-c", "2", "-W", "1", world.AttackerIP.String()); err == nil {
		t.Error("ping of the fake internet answered")
	}
	if _, err := e.guest("ping", "-6", "-c", "2", "-W", "1", world.InetIP6.String()); err == nil {
		t.Error("IPv6 ping of the fake internet answered")
	}
	if _, err := e.curl("https://["+world.InetIP6.String()+"]/", "--max-time", "3", "-k"); err == nil {
		t.Error("IPv6 TCP to the fake internet succeeded")
	}
	time.Sleep(200 * time.Millisecond) // let stragglers land before counting
	v4, v6, err := e.w.LeakedPackets(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if v4 != base4 || v6 != base6 {
		t.Errorf("guest packets reached the fake internet: IPv4 %d, IPv6 %d", v4-base4, v6-base6)
	}
	if h := e.hits("attacker"); len(h) > 0 {
		t.Errorf("the attacker saw %+v", h)
	}
}

// TestHostServicesUnreachable: TCP and UDP services on the host side of the
// guest link (and on any host address) are out of the guest's reach, even
// with an allowed SNI.
func TestHostServicesUnreachable(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var (
		mu       sync.Mutex
		accepted []string
	)
	hostIP := e.g.HostIP.String()
	for _, addr := range []string{hostIP + ":22", hostIP + ":443", world.HostUplinkIP.String() + ":443", "0.0.0.0:8080"} {
		ln, err := world.ListenIn(e.w.Host, "tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func(ln net.Listener) {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				mu.Lock()
				accepted = append(accepted, ln.Addr().String())
				mu.Unlock()
				c.Write([]byte("SSH-2.0-host\r\n"))
				c.Close()
			}
		}(ln)
	}
	udp, err := world.ListenPacketIn(e.w.Host, "udp4", hostIP+":5353")
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	gotUDP := make(chan struct{}, 1)
	go func() {
		buf := make([]byte, 1500)
		if _, _, err := udp.ReadFrom(buf); err == nil {
			gotUDP <- struct{}{}
		}
	}()

	if out, err := e.guest("curl", "-sS", "--max-time", "5", "telnet://"+hostIP+":22"); err == nil && strings.Contains(out, "SSH") {
		t.Errorf("guest reached the host's port 22: %q", out)
	}
	if _, err := e.guest("curl", "-sS", "--max-time", "5", "http://"+hostIP+":8080/"); err == nil {
		t.Error("guest reached the host's port 8080")
	}
	// An allowed name pointed at the host itself: the proxy dials the
	// name's real address instead, never the host.
	for _, ip := range []string{hostIP, world.HostUplinkIP.String()} {
		if body, err := e.curlAt("https://github.com", ip); err != nil || !strings.HasPrefix(body, "hello from github.com") {
			t.Errorf("allowed SNI aimed at the host's %s: %q, %v; want the real github.com", ip, body, err)
		}
		if line := e.accessLine("dst", ip+":443"); line["upstream"] != world.GitHubIP.String()+":443" {
			t.Errorf("allowed SNI aimed at the host's %s dialled %v", ip, line["upstream"])
		}
	}
	// The proxy's own port is not a service either.
	if _, err := e.guest("curl", "-sS", "--max-time", "5", "http://"+hostIP+":15001/"); err == nil {
		t.Error("guest reached the proxy port directly")
	}
	e.sendUDP("udp4", hostIP+":5353")
	select {
	case <-gotUDP:
		t.Error("a UDP datagram from the guest reached a host socket")
	case <-time.After(500 * time.Millisecond):
	}
	mu.Lock()
	defer mu.Unlock()
	if len(accepted) > 0 {
		t.Errorf("host services accepted guest connections: %v", accepted)
	}
	e.noLeaks()
}

// TestUpDownLeavesNoTrace: up and down are idempotent, and after down the
// host's ruleset, policy rules and routes are what they were before up.
func TestUpDownLeavesNoTrace(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	before := e.hostState()
	if _, err := e.vmegress("--config", e.cfg, "up"); err != nil {
		t.Fatal(err)
	}
	afterUp := e.hostState()
	if afterUp == before {
		t.Fatal("up changed nothing")
	}
	table := "table inet vmegress"
	if onIPTables() {
		table = "-j TPROXY --on-port 15001 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1"
	}
	for _, want := range []string{table, "fwmark 0x1 lookup 100", "local default dev lo table 100"} {
		if !strings.Contains(afterUp, want) {
			t.Errorf("after up, no %q in:\n%s", want, afterUp)
		}
	}
	if _, err := e.vmegress("--config", e.cfg, "up"); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(afterUp, e.hostState()); diff != "" {
		t.Errorf("a second up changed the host (-first +second):\n%s", diff)
	}
	// Guests are closed with interception but no data plane.
	if _, err := e.curlAt("https://www.github.com", world.WWWGitHubIP.String(), "--max-time", "3"); err == nil {
		t.Error("egress worked with interception installed and no data plane")
	}
	for i := 0; i < 2; i++ {
		if _, err := e.vmegress("down"); err != nil {
			t.Fatalf("down #%d: %v", i+1, err)
		}
		if diff := cmp.Diff(before, e.hostState()); diff != "" {
			t.Errorf("after down #%d the host differs from before up (-before +after):\n%s", i+1, diff)
		}
	}
	// A daemon's run followed by down leaves no trace either.
	e.start()
	if err := e.d.Stop(10 * time.Second); err != nil {
		t.Errorf("stopping: %v", err)
	}
	if _, err := e.vmegress("down"); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(before, e.hostState()); diff != "" {
		t.Errorf("after run and down the host differs (-before +after):\n%s", diff)
	}
}

// TestSpoofedSource: a guest using an address outside the guest range,
// another project's address or the host's gets nothing out, and never the
// other project's policy.
func TestSpoofedSource(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{
		{Project: "alpha", Subnet: alphaSubnet},
		{Project: "beta", Subnet: netip.MustParsePrefix("172.31.0.4/30")},
	}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: github.com
  beta:
    subnet: 172.31.0.4/30
    allow:
      - sni: www.github.com
      - cidr: 198.18.1.22/32
        ports: [22]
`)
	e.start()
	beta := e.w.Guest("beta")
	// The control: beta itself reaches www.github.com.
	if _, err := world.Output(e.ctx, world.NS(beta.NS, "curl", "-sS", "--max-time", "10", "--cacert", e.w.CAFile,
		"--resolve", "www.github.com:443:"+world.WWWGitHubIP.String(), "https://www.github.com")...); err != nil {
		t.Fatalf("control: beta cannot reach its own allowed name: %v", err)
	}
	e.accessLine("project", "beta", "verdict", "allow")
	before := len(e.d.AccessLog())
	e.w.Log.Reset()
	spoofed := []string{"10.9.9.9", beta.GuestIP.String(), beta.HostIP.String(), "172.31.0.1", "172.31.0.9"}
	for _, addr := range spoofed {
		if err := world.Run(e.ctx, world.NS(e.g.NS, "ip", "addr", "add", addr+"/32", "dev", "eth0")...); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for _, addr := range spoofed {
		wg.Add(2)
		go func() {
			defer wg.Done()
			if _, err := e.curlAt("https://www.github.com", world.WWWGitHubIP.String(), "--interface", addr, "--max-time", "3"); err == nil {
				t.Errorf("curl from spoofed %s succeeded", addr)
			}
		}()
		go func() {
			defer wg.Done()
			if _, err := e.guest("curl", "-sS", "--max-time", "3", "--interface", addr, "telnet://"+world.BannerIP.String()+":22"); err == nil {
				t.Errorf("beta's cidr rule reached from spoofed %s", addr)
			}
		}()
	}
	wg.Wait()
	// Blind one-way traffic: a DNS query for a name only beta may resolve,
	// sent from beta's address, must not be forwarded.
	err := world.InNS(e.g.NS, func() error {
		c, err := net.DialUDP("udp4", &net.UDPAddr{IP: beta.GuestIP.AsSlice()}, &net.UDPAddr{IP: world.GuestNameserver.AsSlice(), Port: 53})
		if err != nil {
			return err
		}
		defer c.Close()
		m := new(mdns.Msg)
		m.SetQuestion("www.github.com.", mdns.TypeA)
		b, _ := m.Pack()
		_, err = c.Write(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	if e.queried("www.github.com") {
		t.Error("a DNS query spoofed with beta's address was forwarded upstream")
	}
	if lines := e.d.AccessLog(); len(lines) > before {
		t.Errorf("spoofed connections reached the proxy: %v", lines[before:])
	}
	if h := e.w.Log.Hits(); len(h) > 0 {
		t.Errorf("servers saw spoofed connections: %+v", h)
	}
	e.noLeaks()
}
