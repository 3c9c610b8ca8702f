package e2e

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"github.com/google/go-cmp/cmp"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// guestConn opens a TCP connection from the guest with the Go stack.
func (e *env) guestConn(addr string) net.Conn {
	e.t.Helper()
	var c net.Conn
	err := world.InNS(e.g.NS, func() error {
		var err error
		c, err = net.DialTimeout("tcp4", addr, 5*time.Second)
		return err
	})
	if err != nil {
		e.t.Fatalf("dialing %s from the guest: %v", addr, err)
	}
	e.t.Cleanup(func() { c.Close() })
	return c
}

// bannerConn is an open connection to the banner service (a cidr rule).
func (e *env) bannerConn() (net.Conn, *bufio.Reader) {
	e.t.Helper()
	c := e.guestConn(world.BannerIP.String() + ":22")
	r := bufio.NewReader(c)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, err := r.ReadString('\n'); err != nil || line != world.Banner {
		e.t.Fatalf("banner: %q, %v", line, err)
	}
	return c, r
}

// alive reports whether an echo connection still answers.
func alive(c net.Conn, r *bufio.Reader) bool {
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return false
	}
	line, err := r.ReadString('\n')
	return err == nil && line == "ping\n"
}

// tlsConn is an open HTTPS connection to www.github.com (an sni rule).
func (e *env) tlsConn() (*tls.Conn, *bufio.Reader) {
	e.t.Helper()
	pem, err := os.ReadFile(e.w.CAFile)
	if err != nil {
		e.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	raw := e.guestConn(world.WWWGitHubIP.String() + ":443")
	c := tls.Client(raw, &tls.Config{ServerName: "www.github.com", RootCAs: pool})
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if err := c.Handshake(); err != nil {
		e.t.Fatalf("TLS to www.github.com: %v", err)
	}
	return c, bufio.NewReader(c)
}

// get does one HTTP request on an open connection.
func get(c net.Conn, r *bufio.Reader, host string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n")); err != nil {
		return err
	}
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return os.ErrInvalid
	}
	_, err = bufio.NewReader(resp.Body).ReadString('\n')
	return err
}

// hostGet fetches an admin URL from inside the host namespace.
func (e *env) hostGet(url string) (string, error) {
	return world.Output(e.ctx, world.NS(e.w.Host, "curl", "-sS", "--fail", "--max-time", "5", url)...)
}

// TestLiveReload: config changes apply without a restart; a revoked
// connection is closed while an allowed one is untouched; an invalid config
// is refused and the old policy stays; SIGHUP reloads too.
func TestLiveReload(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	banner, br := e.bannerConn()
	web, wr := e.tlsConn()
	if err := get(web, wr, "www.github.com"); err != nil {
		t.Fatalf("request before reload: %v", err)
	}

	// Drop the cidr rule: the banner connection is cut, HTTPS stays.
	revoked := strings.Replace(baseConfig, "      - cidr: 198.18.1.22/32  # a server-first banner service\n        ports: [22]\n", "", 1)
	if revoked == baseConfig {
		t.Fatal("test bug: the cidr rule was not removed")
	}
	if err := e.writeConfig(revoked); err != nil {
		t.Fatal(err)
	}
	if !waitFor(5*time.Second, func() bool { return strings.Contains(e.d.Stderr(), `"policy reloaded"`) }) {
		t.Fatalf("no reload after the config file changed:\n%s", e.d.Stderr())
	}
	// (Envoy closes it when the project's old chain has drained: 2 s.)
	if !waitFor(5*time.Second, func() bool { return !alive(banner, br) }) {
		t.Error("the connection the new policy refuses is still open")
	}
	if err := get(web, wr, "www.github.com"); err != nil {
		t.Errorf("an allowed connection was disturbed by the reload: %v", err)
	}
	if !onEnvoy() { // Envoy drains the project's chain; its log says allow
		e.accessLine("dst", world.BannerIP.String()+":22", "verdict", "revoked")
	}
	if out, _ := e.guest("curl", "-sS", "--max-time", "3", "telnet://"+world.BannerIP.String()+":22"); strings.Contains(out, "SSH-2.0") {
		t.Error("new banner connection allowed after the rule was removed")
	}

	// An invalid config is refused; the running policy stays.
	if err := e.writeConfig(revoked + "      - sni: bad..name\n"); err != nil {
		t.Fatal(err)
	}
	if !waitFor(5*time.Second, func() bool { return strings.Contains(e.d.Stderr(), `"policy reload failed`) }) {
		t.Fatalf("no failed reload logged:\n%s", e.d.Stderr())
	}
	if !strings.Contains(e.d.Stderr(), "config.yaml:") || !strings.Contains(e.d.Stderr(), `bad..name`) {
		t.Errorf("the failed reload does not name the file and position:\n%s", e.d.Stderr())
	}
	if body, err := e.curl("https://www.github.com"); err != nil || !strings.HasPrefix(body, "hello from") {
		t.Errorf("after a failed reload the old policy is gone: %q, %v", body, err)
	}
	metrics, err := e.hostGet("http://127.0.0.1:9901/metrics")
	if err != nil || !strings.Contains(metrics, `vmegress_policy_reloads_total{result="failure"} 1`) {
		t.Errorf("failed reload not counted: %v\n%s", err, grep(metrics, "reloads"))
	}

	// SIGHUP reloads (the fixed file back).
	if err := e.writeConfig(revoked); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	e.d.Cmd.Process.Signal(syscall.SIGHUP)
	if !waitFor(5*time.Second, func() bool { return strings.Contains(e.d.Stderr(), `"trigger":"SIGHUP"`) }) {
		t.Errorf("SIGHUP did not reload:\n%s", e.d.Stderr())
	}
}

// TestReloadKeep: with on_policy_change: keep, revoked connections stay.
func TestReloadKeep(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	cfg := "on_policy_change: keep\n" + baseConfig
	e.writeConfig(cfg)
	e.start()
	banner, br := e.bannerConn()
	e.writeConfig(strings.Replace(cfg, "        ports: [22]\n", "        ports: [2222]\n", 1))
	if !waitFor(5*time.Second, func() bool { return strings.Contains(e.d.Stderr(), `"policy reloaded"`) }) {
		t.Fatalf("no reload:\n%s", e.d.Stderr())
	}
	if !alive(banner, br) {
		t.Error("on_policy_change: keep closed a connection")
	}
}

// TestAdminEndpoint: metrics, health, readiness and status, and `vmegress
// status`; the admin port is out of the guests' reach even on 0.0.0.0.
func TestAdminEndpoint(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	e.writeConfig("admin: 0.0.0.0:9901\n" + baseConfig)
	e.start()
	if _, err := e.curl("https://www.github.com"); err != nil {
		t.Fatal(err)
	}
	e.curlAt("https://example.com", world.ExampleIP.String())
	e.guest("dig", "example.com")
	e.accessLine("sni", "example.com")
	// One connection held open (HTTPS through an sni rule: a cidr rule's
	// flow is the kernel's, no data plane holds it): counted as open while
	// it is, on either plane (Envoy's chain gauges).
	held, _ := e.tlsConn()
	defer held.Close()
	for url, want := range map[string]string{
		"http://127.0.0.1:9901/healthz": "ok",
		"http://127.0.0.1:9901/readyz":  "ready",
	} {
		if out, err := e.hostGet(url); err != nil || strings.TrimSpace(out) != want {
			t.Errorf("%s: %q, %v", url, out, err)
		}
	}
	metrics, err := e.hostGet("http://127.0.0.1:9901/metrics")
	if err != nil {
		t.Fatal(err)
	}
	wants := []string{
		`vmegress_dns_queries_total{project="alpha",verdict="allow"}`,
		`vmegress_dns_queries_total{project="alpha",verdict="deny"} 1`,
		`vmegress_dataplane_up 1`,
		`vmegress_firewall_packets_total{rule="prerouting: fail closed: no listener, or not TCP (UDP, QUIC, ICMP, other protocols)"}`,
		// Per-connection metrics: the builtin proxy counts them, Envoy's
		// access-log lines feed the same series.
		`vmegress_proxy_connections_total{project="alpha",verdict="allow"} 1`,
		`vmegress_proxy_connections_total{project="alpha",verdict="deny"} 1`,
		`vmegress_proxy_bytes_total{direction="up",project="alpha"}`,
		`vmegress_proxy_denied_destinations_total{destination="example.com:443",project="alpha",verdict="deny"} 1`,
		`vmegress_proxy_active_connections{project="alpha"} 1`,
	}
	for _, want := range wants {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	var st struct {
		Ready    bool `json:"ready"`
		Projects []struct {
			Name        string            `json:"name"`
			Connections map[string]uint64 `json:"connections"`
		} `json:"projects"`
	}
	out, err := e.vmegress("--config", e.cfg, "status", "--json")
	if err != nil || json.Unmarshal([]byte(out), &st) != nil || !st.Ready || len(st.Projects) != 1 ||
		st.Projects[0].Connections["allow"] != 1 || st.Projects[0].Connections["deny"] != 1 {
		t.Errorf("status --json: %v\n%s", err, out)
	}
	out, err = e.vmegress("--config", e.cfg, "status")
	wantFirewall := "firewall nftables table inet vmegress"
	if onIPTables() {
		wantFirewall = "firewall iptables chains VMEGRESS-*"
	}
	if err != nil || !strings.Contains(out, "alpha") || !strings.Contains(out, "allow=1 deny=1") || !strings.Contains(out, wantFirewall) {
		t.Errorf("status: %v\n%s", err, out)
	}
	for _, ip := range []string{e.g.HostIP.String(), world.HostUplinkIP.String()} {
		if out, err := e.guest("curl", "-sS", "--max-time", "3", "http://"+ip+":9901/metrics"); err == nil {
			t.Errorf("guest reached the admin endpoint on %s: %q", ip, out)
		}
	}
}

// TestDriftRepair: a ruleset or routing removed behind the daemon's back is
// restored within seconds, and guests get nothing out in the gap.
func TestDriftRepair(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	remove := []string{"nft", "delete", "table", "inet", "vmegress"}
	if onIPTables() {
		// Chains intact, the way in gone.
		remove = []string{"iptables", "-t", "mangle", "-D", "PREROUTING", "-j", "VMEGRESS-PREROUTING"}
	}
	installed := e.hostState()
	for i, argv := range [][]string{
		remove,
		{"ip", "rule", "del", "pref", "9000"},
	} {
		if err := world.Run(e.ctx, world.NS(e.w.Host, argv...)...); err != nil {
			t.Fatal(err)
		}
		// In the gap: guest traffic is forwarded nowhere.
		e.sendUDP("udp4", world.AttackerIP.String()+":9999")
		e.guest("ping", "-c", "1", "-W", "1", world.AttackerIP.String())
		if !waitFor(5*time.Second, func() bool {
			_, err := e.curl("https://www.github.com", "--max-time", "2")
			return err == nil
		}) {
			t.Errorf("after %v the daemon did not restore egress", argv)
		}
		// The repair is logged once it is done: egress may be back a moment
		// before the line is written.
		if !waitFor(5*time.Second, func() bool { return strings.Count(e.d.Stderr(), "restoring it") > i }) {
			t.Errorf("after %v no drift logged", argv)
		}
		// The repair is whole before the next removal: one repair each.
		if !waitFor(5*time.Second, func() bool { return e.hostState() == installed }) {
			t.Errorf("after %v the host did not come back to what was installed:\n%s", argv, cmp.Diff(installed, e.hostState()))
		}
	}
	e.noLeaks()
	metrics, _ := e.hostGet("http://127.0.0.1:9901/metrics")
	if !strings.Contains(metrics, "vmegress_firewall_drift_repairs_total 2") {
		t.Errorf("drift repairs not counted:\n%s", grep(metrics, "drift"))
	}
}

func waitFor(d time.Duration, f func() bool) bool {
	end := time.Now().Add(d)
	for {
		if f() {
			return true
		}
		if time.Now().After(end) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func grep(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestDoctor: all checks pass on a working host; a broken one fails with fixes.
func TestDoctor(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	out, err := e.vmegress("--config", e.cfg, "doctor")
	if err != nil {
		t.Fatalf("doctor on a working host: %v\n%s", err, out)
	}
	for _, name := range []string{"capabilities", "kernel support", "ruleset", "policy routing", "daemon and listeners", "upstream DNS", "guest interfaces", "envoy", "upstream mode"} {
		if !strings.Contains(out, "[ok  ] "+name) {
			t.Errorf("no passing %q check in:\n%s", name, out)
		}
	}
	// Break it: stop the daemon, change a rule behind its back.
	e.d.Kill()
	if onIPTables() {
		mustOutput(t, e, "iptables", "-D", "VMEGRESS-FORWARD", "1")
	} else {
		mustOutput(t, e, "nft", "delete", "rule", "inet", "vmegress", "forward", "handle",
			strings.TrimSpace(mustOutput(t, e, "sh", "-c", "nft -a list chain inet vmegress forward | awk '/oifname/ {print $NF; exit}'")))
	}
	if !onEnvoy() { // with Envoy, original_dst is refused at config load
		e.writeConfig("upstream: original_dst\n" + baseConfig)
	}
	out, err = e.vmegress("--config", e.cfg, "doctor", "--json")
	if err == nil {
		t.Fatalf("doctor passed a broken host:\n%s", out)
	}
	var results []struct {
		Name string `json:"name"`
		OK   bool   `json:"ok"`
		Fix  string `json:"fix"`
	}
	if err := json.Unmarshal([]byte(out), &results); err != nil {
		t.Fatalf("doctor --json: %v\n%s", err, out)
	}
	failed := map[string]bool{}
	for _, r := range results {
		if !r.OK {
			failed[r.Name] = true
			if r.Fix == "" {
				t.Errorf("failed check %s has no fix", r.Name)
			}
		}
	}
	mustFail := []string{"ruleset", "daemon and listeners", "upstream mode"}
	if onEnvoy() {
		mustFail = mustFail[:2]
	}
	for _, name := range mustFail {
		if !failed[name] {
			t.Errorf("check %s did not fail: %s", name, out)
		}
	}
}

func mustOutput(t *testing.T, e *env, argv ...string) string {
	t.Helper()
	out, err := world.Output(e.ctx, world.NS(e.w.Host, argv...)...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestAuditThenEnforce: audit lets traffic through and logs would_deny;
// suggest turns the log into rules; enforcing them allows the same traffic.
func TestAuditThenEnforce(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	accessLog := e.w.Dir + "/access.log"
	audit := "access_log: " + accessLog + `
projects:
  alpha:
    subnet: 172.31.0.0/30
    mode: audit
    allow:
      - sni: github.com
`
	e.writeConfig(audit)
	if onEnvoy() {
		if _, err := e.w.StartDaemon(e.ctx, binary, e.cfg); err == nil || !strings.Contains(err.Error(), "mode audit needs dataplane builtin") {
			t.Errorf("audit with Envoy: %v; want the config refused", err)
		}
		return
	}
	e.start()
	for _, url := range []string{"https://github.com", "https://www.github.com", "https://example.com"} {
		if body, err := e.curl(url); err != nil || !strings.HasPrefix(body, "hello from") {
			t.Errorf("audit: %s: %q, %v", url, body, err)
		}
	}
	c, r := e.bannerConn()
	c.Close()
	_ = r
	// Audit is not a way around the invariants: the metadata address stays out.
	e.guest("curl", "-sS", "--max-time", "3", "http://"+world.MetadataIP.String()+"/")
	if h := e.hits("attacker:metadata"); len(h) > 0 {
		t.Errorf("audit mode reached the metadata address: %+v", h)
	}
	for _, want := range []string{`"sni":"example.com","host":"","verdict":"would_deny"`, `"msg":"dns","project":"alpha","src":"172.31.0.2","name":"example.com","type":"A","verdict":"would_deny"`} {
		var logData []byte
		if !waitFor(5*time.Second, func() bool {
			logData, _ = os.ReadFile(accessLog)
			return strings.Contains(string(logData), want)
		}) {
			t.Errorf("access log lacks %s:\n%s", want, logData)
		}
	}
	out, err := e.vmegress("--config", e.cfg, "policy", "suggest", "alpha")
	if err != nil {
		t.Fatalf("suggest: %v", err)
	}
	for _, want := range []string{`- sni: "example.com"`, `- sni: "github.com"`, `- sni: "www.github.com"`, `- cidr: "198.18.1.22/32"`, `ports: [22]`} {
		if !strings.Contains(out, want) {
			t.Errorf("suggestion lacks %s:\n%s", want, out)
		}
	}
	// Paste it and enforce.
	enforce := "access_log: " + accessLog + "\n" + strings.Replace(out, "    allow:\n", "    subnet: 172.31.0.0/30\n    allow:\n", 1)
	e.writeConfig(enforce)
	if !waitFor(5*time.Second, func() bool { return strings.Contains(e.d.Stderr(), `"policy reloaded"`) }) {
		t.Fatalf("the suggested config did not load:\n%s\n%s", enforce, e.d.Stderr())
	}
	if body, err := e.curl("https://example.com"); err != nil || !strings.HasPrefix(body, "hello from example.com") {
		t.Errorf("enforcing the suggestion: %q, %v", body, err)
	}
	if _, err := e.curlAt("https://attacker.test", world.AttackerIP.String(), "-k"); err == nil {
		t.Error("enforcing the suggestion allowed what was never seen")
	}
}

// TestAccessLogReopen: after rotation moves the file, SIGUSR1 reopens it.
func TestAccessLogReopen(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	accessLog := e.w.Dir + "/access.log"
	e.writeConfig("access_log: " + accessLog + "\n" + baseConfig)
	e.start()
	e.curl("https://github.com")
	// The line is written when the proxy closes the connection, just after
	// curl has its answer: rotate once it is in the file.
	if !waitFor(5*time.Second, func() bool {
		b, _ := os.ReadFile(accessLog)
		return strings.Contains(string(b), `"sni":"github.com"`)
	}) {
		t.Fatal("the connection was never logged")
	}
	if err := os.Rename(accessLog, accessLog+".1"); err != nil {
		t.Fatal(err)
	}
	e.d.Cmd.Process.Signal(syscall.SIGUSR1)
	if !waitFor(5*time.Second, func() bool { _, err := os.Stat(accessLog); return err == nil }) {
		t.Fatal("SIGUSR1 did not reopen the access log")
	}
	e.curl("https://www.github.com")
	if !waitFor(5*time.Second, func() bool {
		b, _ := os.ReadFile(accessLog)
		return strings.Contains(string(b), `"sni":"www.github.com"`)
	}) {
		t.Error("new lines did not go to the reopened file")
	}
	old, _ := os.ReadFile(accessLog + ".1")
	if !strings.Contains(string(old), `"sni":"github.com"`) {
		t.Errorf("rotated file lost its lines:\n%s", old)
	}
}

// TestFirewallSwitch: a restart with the other firewall backend removes
// what the first one installed, guests stay filtered, and `down` leaves the
// host as it was.
func TestFirewallSwitch(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	before := e.hostState()
	for i, fw := range []string{"nftables", "iptables", "nftables"} {
		e.writeConfig("firewall: " + fw + "\n" + baseConfig)
		e.start()
		state := e.hostState()
		hasNFT := strings.Contains(state, "table inet vmegress")
		hasIPT := strings.Contains(state, "-j VMEGRESS-")
		if hasNFT != (fw == "nftables") || hasIPT != (fw == "iptables") {
			t.Errorf("step %d (%s): nftables table present %v, iptables chains present %v:\n%s", i, fw, hasNFT, hasIPT, state)
		}
		if _, err := e.curl("https://www.github.com"); err != nil {
			t.Errorf("step %d (%s): allowed egress: %v", i, fw, err)
		}
		if _, err := e.curlAt("https://example.com", world.ExampleIP.String(), "--max-time", "3"); err == nil {
			t.Errorf("step %d (%s): example.com reached", i, fw)
		}
		if err := e.d.Stop(10 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
	// The daemon is stopped with nftables installed; the config names
	// iptables: down removes both kinds.
	e.writeConfig("firewall: iptables\n" + baseConfig)
	if _, err := e.vmegress("--config", e.cfg, "down"); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(before, e.hostState()); diff != "" {
		t.Errorf("down after a backend switch left (-before +after):\n%s", diff)
	}
	e.noLeaks()
}
