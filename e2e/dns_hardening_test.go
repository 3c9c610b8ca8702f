package e2e

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/vmegress/vmegress/internal/world"
)

// TestDNSEscapedLabels: with the rule *.github.com, a name whose first label
// holds a dot ("secret\.github.com" is the labels [secret.github, com], a
// name outside github.com) is refused by the resolver on its wire labels: no
// query for it reaches the fake internet's DNS server.
func TestDNSEscapedLabels(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, args := range [][]string{
		{"dig", "+time=3", "+tries=1", `secret\.github.com`},
		{"dig", "+time=3", "+tries=1", "+tcp", `secret\046github.com`},
		{"dig", "+time=3", "+tries=1", `a\032b.www.github.com`},
	} {
		out, err := e.guest(args...)
		if err != nil || !strings.Contains(out, "status: NXDOMAIN") {
			t.Errorf("%v: %v\n%s", args, err, out)
		}
	}
	e.accessLine("project", "alpha", "name", `secret\.github.com`, "verdict", "deny")
	// The valid name still works, and it is the only github.com query.
	if out, err := e.guest("dig", "+short", "www.github.com"); err != nil || strings.TrimSpace(out) != world.WWWGitHubIP.String() {
		t.Errorf("www.github.com: %q, %v", out, err)
	}
	noHostileQueries(t, e)
}

// noHostileQueries fails if a name with an escaped byte reached the fake
// internet's DNS server.
func noHostileQueries(t *testing.T, e *env) {
	t.Helper()
	for _, q := range e.w.Log.Queries() {
		if strings.Contains(q, "secret") || strings.Contains(q, `\`) {
			t.Errorf("a hostile name was forwarded upstream: %q (all: %q)", q, e.w.Log.Queries())
		}
	}
}

// TestSNIEscapedLabels: the same name as a TLS server name, to github.com's
// address, is refused by the data plane, which never resolves it.
func TestSNIEscapedLabels(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	err := world.InNS(e.g.NS, func() error {
		d := &net.Dialer{Timeout: 5 * time.Second}
		c, err := tls.DialWithDialer(d, "tcp4", world.GitHubIP.String()+":443",
			&tls.Config{ServerName: `secret\.github.com`, InsecureSkipVerify: true})
		if err == nil {
			c.Close()
			t.Errorf(`a TLS connection with server name secret\.github.com was allowed`)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	noHostileQueries(t, e)
}

// TestDNSTCPFlood: one guest opening many TCP connections to the resolver
// (TCP port 53 is redirected to it) holds at most its project's cap of the
// daemon's descriptors, and another guest keeps resolving and connecting.
func TestDNSTCPFlood(t *testing.T) {
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
      - sni: github.com
`)
	d := e.start()
	beta := e.w.Guest("beta")
	fds := func() int {
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", d.Cmd.Process.Pid))
		if err != nil {
			t.Fatalf("counting the daemon's descriptors: %v", err)
		}
		return len(ents)
	}
	before := fds()

	// flood is the number of connections alpha opens; cap is the resolver's
	// per-project cap (vdns.MaxTCPConnsPerProject) plus room for
	// connections accepted but not closed yet when sampled.
	const flood, cap = 1000, 16 + 24
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	// Dialled from this goroutine only: its thread is the one in the
	// guest's namespace (other goroutines' sockets would be the host's).
	err := world.InNS(e.g.NS, func() error {
		for i := 0; i < flood; i++ {
			c, err := net.DialTimeout("tcp4", world.DNSIP.String()+":53", 5*time.Second)
			if err != nil {
				return fmt.Errorf("connection %d: %w", i+1, err)
			}
			held = append(held, c)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Sample the daemon's descriptors while the flood is held (the resolver
	// closes idle connections after 2 s; without a cap all of them stay
	// open for as long as it waits for a first query).
	most := 0
	for i := 0; i < 10; i++ {
		most = max(most, fds()-before)
		time.Sleep(100 * time.Millisecond)
	}
	if most > cap {
		t.Errorf("alpha's %d connections to the resolver held up to %d more descriptors of the daemon; want at most %d", len(held), most, cap)
	}
	// Beta resolves over UDP and TCP and connects, during the flood.
	for _, args := range [][]string{{"dig", "+short", "+time=3", "github.com"}, {"dig", "+short", "+tcp", "+time=3", "github.com"}} {
		out, err := world.Output(e.ctx, world.NS(beta.NS, args...)...)
		if err != nil || strings.TrimSpace(out) != world.GitHubIP.String() {
			t.Errorf("beta %v during the flood: %q, %v", args, out, err)
		}
	}
	if body, err := world.Output(e.ctx, world.NS(beta.NS, "curl", "-sS", "--max-time", "10", "--cacert", e.w.CAFile, "https://github.com")...); err != nil || !strings.HasPrefix(body, "hello from github.com") {
		t.Errorf("beta's curl during the flood: %q, %v", body, err)
	}
	if !strings.Contains(d.Stderr(), "dns tcp connections over the cap are closed") {
		t.Errorf("no warning about the cap in the daemon's log")
	}
}

// TestDNSLoopbackUpstream: an upstream on the host's loopback (here a stub on
// 127.0.0.53, like systemd-resolved's) answers guests' queries: the resolver
// asks it without the upstream mark, which the output backstop drops towards
// the host's own addresses. doctor's upstream check says it answers.
func TestDNSLoopbackUpstream(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}},
		"dns:\n  upstreams: [\"127.0.0.53:53\"]\n"+baseConfig)
	pc, err := world.ListenPacketIn(e.w.Host, "udp4", "127.0.0.53:53")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var asked []string
	stub := &mdns.Server{PacketConn: pc, Handler: mdns.HandlerFunc(func(w mdns.ResponseWriter, req *mdns.Msg) {
		m := new(mdns.Msg)
		m.SetReply(req)
		if len(req.Question) == 1 {
			mu.Lock()
			asked = append(asked, req.Question[0].Name)
			mu.Unlock()
			if req.Question[0].Name == "github.com." && req.Question[0].Qtype == mdns.TypeA {
				m.Answer = append(m.Answer, &mdns.A{Hdr: mdns.RR_Header{Name: "github.com.", Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 60},
					A: world.GitHubIP.AsSlice()})
			}
		}
		w.WriteMsg(m)
	})}
	go stub.ActivateAndServe()
	t.Cleanup(func() { stub.Shutdown() })
	e.start()

	if out, err := e.guest("dig", "+short", "+time=3", "+tries=1", "github.com"); err != nil || strings.TrimSpace(out) != world.GitHubIP.String() {
		t.Errorf("github.com through the loopback upstream: %q, %v", out, err)
	}
	mu.Lock()
	if !slices.Contains(asked, "github.com.") {
		t.Errorf("the loopback upstream was asked %q", asked)
	}
	mu.Unlock()
	out, _ := e.vmegress("--config", e.cfg, "doctor", "--json")
	var results []struct {
		Name   string `json:"name"`
		OK     bool   `json:"ok"`
		Detail string `json:"detail"`
	}
	if err := json.Unmarshal([]byte(out), &results); err != nil {
		t.Fatalf("doctor --json: %v\n%s", err, out)
	}
	for _, r := range results {
		if r.Name == "upstream DNS" && (!r.OK || !strings.Contains(r.Detail, "127.0.0.53:53 answer")) {
			t.Errorf("doctor: %+v", r)
		}
	}
}

// TestNoSearchDomains: with the host's resolv.conf holding a search domain
// and ndots:5, neither the resolver (a guest's query) nor the data plane
// (resolving a name itself, for a destination the guest chose) ever asks
// for NAME.corp.test: every name sent upstream is fully qualified.
func TestNoSearchDomainsInQueries(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	conf := filepath.Join("/etc/netns", e.w.Host, "resolv.conf")
	if err := os.WriteFile(conf, []byte("search corp.test\noptions ndots:5\nnameserver "+world.DNSIP.String()+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	e.start()
	if out, err := e.guest("dig", "+short", "+time=3", "www.github.com"); err != nil || strings.TrimSpace(out) != world.WWWGitHubIP.String() {
		t.Errorf("dig www.github.com: %q, %v", out, err)
	}
	// Pinned to github.com's address, which the resolver did not give for
	// this name: the data plane resolves www.github.com itself.
	if body, err := e.curlAt("https://www.github.com", world.GitHubIP.String()); err != nil || !strings.HasPrefix(body, "hello from www.github.com") {
		t.Errorf("curl www.github.com pinned elsewhere: %q, %v", body, err)
	}
	for _, q := range e.w.Log.Queries() {
		if strings.Contains(q, "corp.test") {
			t.Errorf("a search domain was applied: %q (all: %q)", q, e.w.Log.Queries())
		}
	}
}
