// Package e2e holds vmegress's end-to-end tests: real nftables, real policy
// routing and TPROXY, the real vmegress binary, and real clients (curl, dig,
// ping) in network namespaces the tests create (see internal/world). They run
// as root; as non-root they skip, unless VMEGRESS_E2E=1 makes that a failure.
package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/nettest"
	"github.com/vmegress/vmegress/internal/world"
)

var counterRE = regexp.MustCompile(`counter packets \d+ bytes \d+`)

// binary is the vmegress binary built for this run.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "vmegress-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "vmegress")
	args := []string{"build", "-o", binary}
	if os.Getenv("VMEGRESS_RACE") == "1" {
		args = append(args, "-race") // the daemon under the race detector
	}
	out, err := exec.Command("go", append(args, "../cmd/vmegress")...).CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building vmegress: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// baseConfig names no DNS upstream: the host's resolv.conf (the world's
// DNS server) is the default.
const baseConfig = `vm_cidr: 172.31.0.0/16
guest_interfaces: ["tap-*"]
tproxy_port: 15001
projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: github.com
      - sni: "*.github.com"
      - http: www.github.com
      - sni: private.test     # resolve to denied addresses:
      - sni: loop.test        # the proxy must not dial them
      - sni: meta.test
      - cidr: 198.18.1.22/32  # a server-first banner service
        ports: [22]
`

var alphaSubnet = netip.MustParsePrefix("172.31.0.0/30")

// env is one test's world with vmegress running in it.
type env struct {
	t   *testing.T
	ctx context.Context
	w   *world.World
	g   *world.Guest
	d   *world.Daemon
	cfg string
}

// testPlane is the data plane the suite runs on: VMEGRESS_TEST_PLANE
// (builtin, the default, or envoy). .ci/run runs the suite on both.
var testPlane = func() string {
	if p := os.Getenv("VMEGRESS_TEST_PLANE"); p != "" {
		return p
	}
	return "builtin"
}()

// testFirewall is the firewall backend the suite runs on:
// VMEGRESS_TEST_FIREWALL (nftables, the default, or iptables). .ci/run runs
// the suite on both.
var testFirewall = func() string {
	if f := os.Getenv("VMEGRESS_TEST_FIREWALL"); f != "" {
		return f
	}
	return "nftables"
}()

// onIPTables reports whether the suite runs on the iptables backend.
func onIPTables() bool { return testFirewall == "iptables" }

// withSuite puts the suite's data plane and firewall backend into a config
// body that does not name its own.
func withSuite(body string) string {
	if !strings.Contains(body, "dataplane:") {
		body = "dataplane: " + testPlane + "\n" + body
	}
	if !strings.Contains(body, "firewall:") {
		body = "firewall: " + testFirewall + "\n" + body
	}
	return body
}

// writeConfig replaces the world's config file, on the suite's data plane
// and firewall backend unless body names them.
func (e *env) writeConfig(body string) error {
	return os.WriteFile(e.cfg, []byte(withSuite(body)), 0o644)
}

// wantRule is the access log's rule for a connection a rule allowed: the
// rule on the builtin plane; on Envoy, which only knows the chain, the rule
// kind and the project's chain ("sni (alpha/tls/443)").
func wantRule(builtin, envoyKind, chain string) string {
	if onEnvoy() {
		return envoyKind + " (" + chain + ")"
	}
	return builtin
}

// refusedReadably checks how a refused connection looked to the client:
// the builtin plane sends TLS access_denied (or 403, or RST); Envoy resets
// (a pinned difference, README).
func refusedReadably(t *testing.T, err error, tls bool) {
	t.Helper()
	switch {
	case err == nil:
		t.Error("the connection was not refused")
	case strings.Contains(err.Error(), "timed out"):
		t.Errorf("refused by a timeout, not promptly: %v", err)
	case tls && !onEnvoy() && !strings.Contains(err.Error(), "access denied"):
		t.Errorf("refused with %v; want a TLS access_denied alert", err)
	}
}

// onEnvoy reports whether the suite runs on the Envoy data plane.
func onEnvoy() bool { return testPlane == "envoy" }

// newWorld builds a world with guest alpha and baseConfig; vmegress is not started.
func newWorld(t *testing.T) *env {
	t.Helper()
	return newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, baseConfig)
}

// newWorldWith builds a world with the given guests and config.
func newWorldWith(t *testing.T, guests []world.GuestSpec, config string) *env {
	t.Helper()
	nettest.Privileged(t, "curl", "dig", "ping")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	w, err := world.New(ctx, world.Options{Prefix: "vmege", Guests: guests})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	cfg, err := w.WriteConfig("config.yaml", withSuite(config))
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, ctx: ctx, w: w, cfg: cfg}
	if len(w.Guests) > 0 {
		e.g = w.Guests[0]
	}
	return e
}

// start runs `vmegress run`; on failure the daemon's logs are printed.
func (e *env) start() *world.Daemon {
	e.t.Helper()
	d, err := e.w.StartDaemon(e.ctx, binary, e.cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	e.d = d
	e.t.Cleanup(func() {
		if strings.Contains(d.Stderr(), "DATA RACE") {
			e.t.Errorf("the daemon has a data race:\n%s", d.Stderr())
		}
		if e.t.Failed() {
			e.t.Logf("vmegress log (Envoy's lines included):\n%s\naccess log:\n%s", d.Stderr(), d.RawAccessLog())
			if onEnvoy() {
				dump, _ := e.envoyAdmin("/config_dump")
				e.t.Logf("envoy config dump:\n%s", dump)
			}
		}
	})
	return d
}

// newEnv is newWorld plus a running daemon.
func newEnv(t *testing.T) *env {
	e := newWorld(t)
	e.start()
	return e
}

// guest runs argv in the guest namespace.
func (e *env) guest(argv ...string) (string, error) {
	return world.Output(e.ctx, world.NS(e.g.NS, argv...)...)
}

// curl runs curl in the guest with the world's CA; extra args go before the URL.
func (e *env) curl(url string, extra ...string) (string, error) {
	args := append([]string{"curl", "-sS", "--max-time", "10", "--cacert", e.w.CAFile}, extra...)
	return e.guest(append(args, url)...)
}

// curlAt is curl with name:port pinned to ip (DNS bypassed), as a guest
// that lies about where a name lives would do.
func (e *env) curlAt(url, ip string, extra ...string) (string, error) {
	u := strings.TrimPrefix(strings.TrimPrefix(url, "https://"), "http://")
	host, port := u, "443"
	if strings.HasPrefix(url, "http://") {
		port = "80"
	}
	if i := strings.IndexAny(u, "/"); i >= 0 {
		host = u[:i]
	}
	if h, p, err := net.SplitHostPort(host); err == nil {
		host, port = h, p
	}
	return e.curl(url, append([]string{"--resolve", host + ":" + port + ":" + ip}, extra...)...)
}

// vmegress runs the CLI in the host namespace.
func (e *env) vmegress(args ...string) (string, error) {
	return e.w.Vmegress(e.ctx, binary, args...)
}

// hits returns the fake internet's hits on servers whose label has prefix.
func (e *env) hits(prefix string) []world.Hit {
	var out []world.Hit
	for _, h := range e.w.Log.Hits() {
		if strings.HasPrefix(h.Server, prefix) {
			out = append(out, h)
		}
	}
	return out
}

// noLeaks fails the test if any packet with a guest source address reached
// the fake internet, or any connection or datagram reached the attacker.
func (e *env) noLeaks() {
	e.t.Helper()
	v4, v6, err := e.w.LeakedPackets(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	if v4 != 0 || v6 != 0 {
		e.t.Errorf("%d IPv4 and %d IPv6 packets with guest source addresses reached the fake internet", v4, v6)
	}
	if h := e.hits("attacker"); len(h) > 0 {
		e.t.Errorf("the attacker saw %d connections/datagrams: %+v", len(h), h)
	}
}

// accessLine waits for the access-log line matching every key=value given.
func (e *env) accessLine(kv ...string) map[string]any {
	e.t.Helper()
	m, ok := e.d.WaitAccessLog(5*time.Second, func(m map[string]any) bool {
		for i := 0; i+1 < len(kv); i += 2 {
			if fmt.Sprint(m[kv[i]]) != kv[i+1] {
				return false
			}
		}
		return true
	})
	if !ok {
		e.t.Fatalf("no access-log line with %v; log:\n%s", kv, e.d.RawAccessLog())
	}
	return m
}

// sendUDP sends one datagram from the guest with the Go stack.
func (e *env) sendUDP(network, addr string) {
	e.t.Helper()
	err := world.InNS(e.g.NS, func() error {
		c, err := net.Dial(network, addr)
		if err != nil {
			return nil // no route is as good as dropped
		}
		defer c.Close()
		c.Write([]byte("exfiltrate"))
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
}

// hostState is the host namespace's ruleset (nftables, iptables and
// ipsets; tables with no rules, which iptables-nft leaves behind, do not
// count), policy rules and routes.
func (e *env) hostState() string {
	e.t.Helper()
	var b strings.Builder
	sets, err := world.Ipsets(e.w.Host)
	if err != nil {
		e.t.Fatal(err)
	}
	fmt.Fprintf(&b, "# ipsets\n%s\n", strings.Join(sets, "\n"))
	for _, argv := range [][]string{
		{"nft", "list", "ruleset"},
		{"sh", "-c", "iptables-save | grep '^-A' || true"},
		{"sh", "-c", "ip6tables-save | grep '^-A' || true"},
		{"ip", "-4", "rule", "show"},
		{"ip", "-6", "rule", "show"},
		{"ip", "-4", "route", "show", "table", "all"},
		{"ip", "-6", "route", "show", "table", "all"},
		{"sh", "-c", "grep -H . /proc/sys/net/ipv4/conf/*/forwarding"},
	} {
		out, err := world.Output(e.ctx, world.NS(e.w.Host, argv...)...)
		if err != nil {
			e.t.Fatal(err)
		}
		if argv[0] == "nft" {
			out = dropEmptyTables(out)
		}
		fmt.Fprintf(&b, "# %s\n%s", strings.Join(argv, " "), out)
	}
	// Counters move with any stray packet (IPv6 router solicitations...).
	return counterRE.ReplaceAllString(b.String(), "counter")
}

// emptyChainLineRE matches what a table with no rules holds: chain headers,
// accepting base-chain policies and closing braces.
var emptyChainLineRE = regexp.MustCompile(`^\s*(chain \S+ \{|type .*policy accept;|\}|)$`)

// dropEmptyTables removes tables without rules or sets from an nft listing.
func dropEmptyTables(listing string) string {
	var out, block []string
	empty := true
	for _, l := range strings.Split(listing, "\n") {
		switch {
		case strings.HasPrefix(l, "table "):
			block, empty = []string{l}, true
		case block != nil && l == "}":
			if !empty {
				out = append(out, append(block, l)...)
			}
			block = nil
		case block != nil:
			block = append(block, l)
			if !emptyChainLineRE.MatchString(l) {
				empty = false
			}
		default:
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
