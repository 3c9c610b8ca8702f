package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/vmegress/vmegress/internal/world"
)

// queried reports whether the fake internet's DNS server was asked for name.
func (e *env) queried(name string) bool {
	for _, q := range e.w.Log.Queries() {
		if q == name {
			return true
		}
	}
	return false
}

// TestDNSAllowlist: guests' DNS, to any address, is answered by vmegress
// from the project's allowlist; refused names never leave the host.
func TestDNSAllowlist(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	// The guest's resolv.conf names an address where nothing listens; other
	// addresses and TCP work the same. Replies come from the address asked.
	for _, args := range [][]string{
		{"dig", "+short", "github.com"},
		{"dig", "+short", "@1.1.1.1", "github.com"},
		{"dig", "+short", "+tcp", "github.com"},
	} {
		out, err := e.guest(args...)
		if err != nil || strings.TrimSpace(out) != world.GitHubIP.String() {
			t.Errorf("%v: %q, %v; want %s", args, out, err, world.GitHubIP)
		}
	}
	out, err := e.guest("dig", "github.com")
	if err != nil || !strings.Contains(out, "SERVER: "+world.GuestNameserver.String()+"#53") {
		t.Errorf("reply did not come from the address the guest asked: %v\n%s", err, out)
	}
	// Refused names: NXDOMAIN, decided locally, never sent upstream.
	e.w.Log.Reset()
	for _, name := range []string{"example.com", "secret-data-0123456789abcdef.example.com", "attacker.test", "github.com.attacker.test"} {
		out, err := e.guest("dig", name)
		if err != nil || !strings.Contains(out, "status: NXDOMAIN") {
			t.Errorf("dig %s: %v\n%s", name, err, out)
		}
		if e.queried(name) {
			t.Errorf("the query for %s reached the fake internet's DNS server", name)
		}
	}
	// Allowed names whose answers point inside: the addresses are stripped.
	for _, name := range []string{"private.test", "loop.test", "meta.test"} {
		out, err := e.guest("dig", "+short", name)
		if err != nil || strings.TrimSpace(out) != "" {
			t.Errorf("dig %s answered %q (%v); want no address", name, out, err)
		}
	}
	// HTTPS records lose ech, so clients put the real name in SNI.
	out, err = e.guest("dig", "+short", "github.com", "HTTPS")
	if err != nil || !strings.Contains(out, "alpn=") || strings.Contains(out, "ech=") {
		t.Errorf("HTTPS record: %q, %v; want alpn and no ech", out, err)
	}
}

// TestDNSRateLimit: a project's query flood is refused past its limit.
func TestDNSRateLimit(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var refused, nx int
	err := world.InNS(e.g.NS, func() error {
		c, err := net.ListenPacket("udp4", ":0")
		if err != nil {
			return err
		}
		defer c.Close()
		to := &net.UDPAddr{IP: world.GuestNameserver.AsSlice(), Port: 53}
		// Paced at about 1,000 a second, five times the limit: fast enough
		// to exceed it, slow enough that no socket buffer overflows on a
		// loaded machine (a burst of drops would keep the count under the
		// limit and prove nothing).
		const n = 3000
		go func() {
			for i := 0; i < n; i++ {
				m := new(mdns.Msg)
				m.SetQuestion("flood.example.com.", mdns.TypeA)
				b, _ := m.Pack()
				c.WriteTo(b, to)
				time.Sleep(time.Millisecond)
			}
		}()
		buf := make([]byte, 2048)
		for {
			c.SetReadDeadline(time.Now().Add(time.Second))
			k, _, err := c.ReadFrom(buf)
			if err != nil {
				return nil
			}
			var m mdns.Msg
			if m.Unpack(buf[:k]) == nil {
				switch m.Rcode {
				case mdns.RcodeRefused:
					refused++
				case mdns.RcodeNameError:
					nx++
				}
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if nx == 0 || refused == 0 {
		t.Errorf("flood of queries: %d NXDOMAIN, %d REFUSED; want both (the limit holds)", nx, refused)
	}
}

// TestSNISpoofing: an allowed name aimed at any other address reaches the
// name's real address or nothing; the aimed-at address sees no connection.
func TestSNISpoofing(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	loop, err := world.ListenIn(e.w.Host, "tcp4", "127.0.0.1:443")
	if err != nil {
		t.Fatal(err)
	}
	defer loop.Close()
	var (
		mu           sync.Mutex
		loopAccepted int
	)
	go func() {
		for {
			c, err := loop.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			loopAccepted++
			mu.Unlock()
			c.Close()
		}
	}()
	// Aimed at the attacker, the metadata address, a private address: the
	// proxy resolves github.com itself and connects there.
	for _, ip := range []string{world.AttackerIP.String(), world.MetadataIP.String(), world.PrivateIP.String()} {
		body, err := e.curlAt("https://github.com", ip)
		if err != nil || !strings.HasPrefix(body, "hello from github.com") {
			t.Errorf("github.com aimed at %s: %q, %v; want the real github.com", ip, body, err)
		}
		if line := e.accessLine("dst", ip+":443"); line["upstream"] != world.GitHubIP.String()+":443" {
			t.Errorf("github.com aimed at %s dialled %v", ip, line["upstream"])
		}
	}
	// A vetted original destination is dialled as is: the guest resolved
	// www.github.com through vmegress and connects to that address.
	if body, err := e.curl("https://www.github.com"); err != nil || !strings.HasPrefix(body, "hello from www.github.com") {
		t.Errorf("www.github.com: %q, %v", body, err)
	}
	// Allowed names whose DNS answers are private, loopback or metadata:
	// refused with a TLS alert, nothing dialled.
	for name, ip := range map[string]string{"private.test": world.PrivateIP.String(), "loop.test": world.AttackerIP.String(), "meta.test": world.MetadataIP.String()} {
		_, err := e.curlAt("https://"+name, ip, "-k")
		refusedReadably(t, err, true)
		line := e.accessLine("sni", name)
		switch {
		case onEnvoy():
			// Envoy's forward proxy finds no usable host: no upstream (flag UH).
			if line["upstream"] != nil && line["upstream"] != "" || !strings.Contains(fmt.Sprint(line["reason"]), "UH") {
				t.Errorf("%s: %v", name, line)
			}
		case line["verdict"] != "deny" || !strings.Contains(line["reason"].(string), "resolving "+name+": no usable address"):
			t.Errorf("%s: %v", name, line)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if loopAccepted > 0 {
		t.Errorf("the host's loopback service accepted %d connections", loopAccepted)
	}
	e.noLeaks()
}

// TestHTTPRules: http rules pass by Host; others get a readable 403; a Host
// aimed at another address reaches the named host, not the address.
func TestHTTPRules(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	body, err := e.curl("http://www.github.com/x")
	if err != nil || !strings.HasPrefix(body, "hello from www.github.com via http") {
		t.Errorf("allowed http: %q, %v", body, err)
	}
	e.accessLine("host", "www.github.com", "verdict", "allow", "rule", wantRule("http:www.github.com", "http", "alpha/http/80"))

	out, err := e.curlAt("http://github.com/", world.GitHubIP.String(), "-w", "\n%{http_code}")
	if err != nil || !strings.HasSuffix(out, "\n403") || !strings.Contains(out, "egress policy of project alpha refused this request") {
		t.Errorf("denied http: %q, %v; want a 403 naming the project", out, err)
	}
	// Host of an allowed site, sent to the attacker's address.
	body, err = e.guest("curl", "-sS", "--max-time", "10", "-H", "Host: www.github.com", "http://"+world.AttackerIP.String()+"/")
	if err != nil || !strings.HasPrefix(body, "hello from www.github.com via http") {
		t.Errorf("Host aimed at the attacker: %q, %v", body, err)
	}
	// Absolute URI and Host disagree: refused.
	out, err = e.guest("curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", "--request-target", "http://attacker.test/", "http://www.github.com/")
	if err != nil || !strings.HasSuffix(out, "\n403") {
		t.Errorf("URI/Host mismatch: %q, %v; want 403", out, err)
	}
	if h := e.hits("http:github.com"); len(h) > 0 {
		t.Errorf("github.com's HTTP server saw %+v", h)
	}
	e.noLeaks()
}

// TestCIDRRuleServerFirst: a cidr rule carries a server-first protocol: the
// proxy does not wait for the client to speak.
func TestCIDRRuleServerFirst(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	var banner string
	err := world.InNS(e.g.NS, func() error {
		c, err := net.DialTimeout("tcp4", world.BannerIP.String()+":22", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		banner, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	if err != nil || banner != world.Banner {
		t.Fatalf("banner: %q, %v; want %q", banner, err, world.Banner)
	}
	rule := wantRule("cidr:198.18.1.22/32 ports 22", "cidr", "alpha/cidr/22")
	if kernelPath() {
		rule = "cidr:198.18.1.22/32 ports 22" // the kernel's flow, logged by the daemon on either plane
	}
	e.accessLine("dst", world.BannerIP.String()+":22", "verdict", "allow", "rule", rule)
	// The cidr rule names port 22 only.
	if out, err := e.guest("curl", "-sS", "--fail", "--max-time", "3", "http://"+world.BannerIP.String()+"/"); err == nil {
		t.Errorf("cidr rule opened port 80 too: %q", out)
	}
	e.accessLine("dst", world.BannerIP.String()+":80", "verdict", "deny")
}

// TestConnectionCap: over max_connections a project's new connections are
// reset; another project still connects.
func TestConnectionCap(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{
		{Project: "alpha", Subnet: alphaSubnet},
		{Project: "beta", Subnet: netip.MustParsePrefix("172.31.0.4/30")},
	}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    max_connections: 3
    allow:
      - cidr: 198.18.1.22/32
        ports: [22]
  beta:
    subnet: 172.31.0.4/30
    allow:
      - sni: github.com
`)
	e.start()
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	err := world.InNS(e.g.NS, func() error {
		for i := 0; i < 4; i++ {
			c, err := net.DialTimeout("tcp4", world.BannerIP.String()+":22", 5*time.Second)
			if i == 3 && err != nil && (strings.Contains(err.Error(), "reset") || strings.Contains(err.Error(), "refused")) {
				break // reset at the SYN (the ruleset counts) or as soon as it connected: the cap held
			}
			if err != nil {
				return err
			}
			held = append(held, c)
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			if i < 3 && line != world.Banner {
				t.Errorf("connection %d under the cap: %q, %v", i+1, line, err)
			}
			if i == 3 && (err == nil || line == world.Banner) {
				t.Errorf("connection 4 over a cap of 3 got %q, %v; want a reset", line, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	switch {
	case kernelPath():
		// The ruleset counted and refused it at the SYN: its counter says so.
		out, _ := world.Output(e.ctx, world.NS(e.w.Host, "nft", "list", "chain", "inet", "vmegress", "prerouting")...)
		counted := regexp.MustCompile(`k_count_3 .* counter packets [1-9]`)
		if onIPTables() {
			out, _ = world.Output(e.ctx, world.NS(e.w.Host, "iptables-save", "-c", "-t", "mangle")...)
			counted = regexp.MustCompile(`(?m)^\[[1-9]\d*:\d+\] -A VMEGRESS-NEW -m set --match-set vmegress-k-limit-3 src -m connlimit --connlimit-above 3 `)
		}
		if !counted.MatchString(out) {
			t.Errorf("the cap's rule counted no refusal:\n%s", out)
		}
	case !onEnvoy(): // Envoy's connection_limit closes without a log line
		e.accessLine("project", "alpha", "reason", "project connection limit (3) reached")
	}
	beta := e.w.Guest("beta")
	if body, err := world.Output(e.ctx, world.NS(beta.NS, "curl", "-sS", "--max-time", "10", "--cacert", e.w.CAFile, "https://github.com")...); err != nil || !strings.HasPrefix(body, "hello from github.com") {
		t.Errorf("beta while alpha is at its cap: %q, %v", body, err)
	}
}

// TestOriginalDstMode pins the unsafe spec behaviour: with upstream:
// original_dst the guest's chosen address is dialled, and the daemon warns.
func TestOriginalDstMode(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, "upstream: original_dst\n"+strings.TrimPrefix(baseConfig, "vm_cidr: 172.31.0.0/16\n"))
	if onEnvoy() {
		// Envoy always resolves names itself: the config is refused.
		if _, err := e.w.StartDaemon(e.ctx, binary, e.cfg); err == nil || !strings.Contains(err.Error(), "not available with dataplane envoy") {
			t.Errorf("original_dst with Envoy: %v; want the config refused", err)
		}
		return
	}
	e.start()
	if !strings.Contains(e.d.Stderr(), "SNI spoofing") {
		t.Errorf("no warning about original_dst in the log:\n%s", e.d.Stderr())
	}
	// Port 8443 on the attacker: the name is allowed there only if a rule
	// says so, so use a www.github.com SNI on 443 aimed at the attacker.
	e.curlAt("https://www.github.com", world.AttackerIP.String(), "-k", "--max-time", "3")
	if len(e.hits("attacker:tcp:443")) == 0 {
		t.Error("original_dst did not dial the guest's chosen address (the mode is not what it says)")
	}
	// The always-denied set still holds in this mode.
	e.w.Log.Reset()
	e.curlAt("https://github.com", world.MetadataIP.String(), "-k", "--max-time", "3")
	if h := e.hits("attacker:metadata"); len(h) > 0 {
		t.Errorf("original_dst dialled the metadata address: %+v", h)
	}
}

// TestPolicyExplain runs `vmegress policy explain` against the world's DNS.
func TestPolicyExplain(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"alpha", "www.github.com"}, []string{"verdict: allow", "rule: sni:*.github.com", "dns: answered", world.WWWGitHubIP.String()}},
		{[]string{"alpha", "www.github.com:80"}, []string{"verdict: allow", "rule: http:www.github.com"}},
		{[]string{"alpha", "example.com"}, []string{"verdict: deny", "no sni rule of project alpha allows example.com on port 443", "dns: NXDOMAIN"}},
		{[]string{"alpha", "private.test"}, []string{"verdict: allow", "dns: answered", "no usable address"}},
	} {
		out, err := e.vmegress(append([]string{"--config", e.cfg, "policy", "explain"}, tc.args...)...)
		if err != nil {
			t.Errorf("explain %v: %v", tc.args, err)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(out, w) {
				t.Errorf("explain %v: no %q in:\n%s", tc.args, w, out)
			}
		}
	}
}

// TestHTTPKeepAliveHostSwitch: a second request on an allowed plain-HTTP
// connection that names another host never reaches the server (domain
// fronting over a kept-alive connection).
func TestHTTPKeepAliveHostSwitch(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	got := e.hostSwitch()
	if !strings.Contains(got, "you asked for www.github.com") {
		t.Errorf("the allowed first request got no answer:\n%s", got)
	}
	if strings.Contains(got, "you asked for example.com") {
		t.Errorf("a second request for example.com reached the server:\n%s", got)
	}
	// Claiming an upgrade the server refuses does not switch the check off.
	// (Envoy refuses the upgrade itself: 403, no route allows WebSocket.)
	got = e.twoRequests("GET /ws HTTP/1.1\r\nHost: www.github.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
	if strings.Contains(got, "you asked for example.com") || (!onEnvoy() && !strings.Contains(got, "you asked for www.github.com")) {
		t.Errorf("after a refused upgrade:\n%s", got)
	}
	if !onEnvoy() {
		line := e.accessLine("host", "example.com", "verdict", "deny")
		if !strings.Contains(fmt.Sprint(line["reason"]), "later request on this connection") {
			t.Errorf("deny line: %v", line)
		}
	}
	e.noLeaks()
}

// TestAuditHTTPHostSwitch: in audit mode a later request for another host
// goes through and is logged as would_deny (builtin plane only: Envoy has
// no audit mode).
func TestAuditHTTPHostSwitch(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	e.writeConfig(`projects:
  alpha:
    subnet: 172.31.0.0/30
    mode: audit
    allow:
      - http: www.github.com
`)
	if onEnvoy() {
		if _, err := e.w.StartDaemon(e.ctx, binary, e.cfg); err == nil || !strings.Contains(err.Error(), "mode audit needs dataplane builtin") {
			t.Errorf("audit with Envoy: %v; want the config refused", err)
		}
		return
	}
	e.start()
	got := e.hostSwitch()
	if !strings.Contains(got, "you asked for www.github.com") || !strings.Contains(got, "you asked for example.com") {
		t.Errorf("audit: both requests should be answered:\n%s", got)
	}
	line := e.accessLine("host", "example.com", "verdict", "would_deny")
	if !strings.Contains(fmt.Sprint(line["reason"]), "later request on this connection") {
		t.Errorf("would_deny line: %v", line)
	}
}

// hostSwitch sends, from the guest, two requests on one connection to
// www.github.com's port 80 — the first for www.github.com, the second for
// example.com — and returns all that came back before the connection ended.
func (e *env) hostSwitch() string {
	e.t.Helper()
	return e.twoRequests("GET /one HTTP/1.1\r\nHost: www.github.com\r\n\r\n")
}

// twoRequests sends first and then a request for example.com on one
// connection to www.github.com's port 80, from the guest, and returns all
// that came back before the connection ended.
func (e *env) twoRequests(first string) string {
	e.t.Helper()
	var got []byte
	err := world.InNS(e.g.NS, func() error {
		c, err := net.DialTimeout("tcp4", world.WWWGitHubIP.String()+":80", 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(8 * time.Second))
		if _, err := io.WriteString(c, first+"GET /two HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"); err != nil {
			return err
		}
		got, _ = io.ReadAll(c) // until the connection ends
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return string(got)
}
