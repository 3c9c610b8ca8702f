package dns

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	mdns "github.com/miekg/dns"
)

func writeFile(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestHostUpstreams: systemd-resolved's stub is replaced by the servers it
// forwards to; anything else is kept as written.
func TestHostUpstreams(t *testing.T) {
	stub := writeFile(t, "resolv.conf", "# managed by resolved\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.test\n")
	real := writeFile(t, "resolved.conf", "nameserver 192.0.2.10\nnameserver 2001:db8::10\nnameserver 127.0.0.54\n")
	onlyStub := writeFile(t, "stub-only.conf", "nameserver 127.0.0.53\n")
	for _, tc := range []struct {
		name, resolv, resolved string
		want                   []string
	}{
		{"stub: its upstreams", stub, real, []string{"192.0.2.10:53", "[2001:db8::10]:53"}},
		{"stub, no resolved file: the stub, asked unmarked", stub, filepath.Join(t.TempDir(), "missing"), []string{"127.0.0.53:53"}},
		{"stub, resolved names only the stub", stub, onlyStub, []string{"127.0.0.53:53"}},
		{"a real server", writeFile(t, "a.conf", "nameserver 198.51.100.1\n"), real, []string{"198.51.100.1:53"}},
		{"stub and a real server: as written", writeFile(t, "b.conf", "nameserver 127.0.0.53\nnameserver 198.51.100.1\n"), real, []string{"127.0.0.53:53", "198.51.100.1:53"}},
		{"dnsmasq on loopback", writeFile(t, "c.conf", "nameserver 127.0.0.1\n"), real, []string{"127.0.0.1:53"}},
	} {
		got, err := HostUpstreams(tc.resolv, tc.resolved)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("%s: %v, %v; want %v", tc.name, got, err, tc.want)
		}
	}
	if _, err := HostUpstreams(writeFile(t, "d.conf", "search x\n"), real); err == nil {
		t.Error("a resolv.conf without nameservers gave upstreams")
	}
}

// TestLoopbackUpstreamUnmarked: a loopback upstream is asked with the
// unmarked exchangers (marked packets to the host's own addresses are
// dropped by the ruleset), every other one with the marked ones.
func TestLoopbackUpstreamUnmarked(t *testing.T) {
	marked := &fakeUpstream{rrs: map[string][]string{"github.com. A": {"github.com. 60 IN A 140.82.112.3"}}}
	local := &fakeUpstream{rrs: marked.rrs}
	r, _ := newTestResolver(t, marked)
	r.LocalUDP, r.LocalTCP = local, local
	r.Upstreams = []string{"127.0.0.53:53"}
	pr := r.policy.Load().Project("alpha")
	if _, err := r.Lookup(context.Background(), pr, "github.com"); err != nil {
		t.Fatal(err)
	}
	if len(local.asked) != 1 || len(marked.asked) != 0 {
		t.Errorf("loopback upstream: unmarked asked %q, marked asked %q", local.asked, marked.asked)
	}
	if err := r.Probe(context.Background(), "127.0.0.53:53"); err != nil || len(local.asked) != 2 {
		t.Errorf("probe of a loopback upstream: %v, unmarked asked %q", err, local.asked)
	}
	if err := r.Probe(context.Background(), "192.0.2.53:53"); err != nil || len(marked.asked) != 1 {
		t.Errorf("probe of a remote upstream: %v, marked asked %q", err, marked.asked)
	}
}

// TestNoSearchDomains: a resolv.conf with search domains and ndots:5 gives
// only its servers; the resolver asks for exactly the name it was given.
func TestNoSearchDomains(t *testing.T) {
	conf := writeFile(t, "resolv.conf", "search corp.test\noptions ndots:5\nnameserver 192.0.2.53\n")
	ups, err := HostUpstreams(conf, filepath.Join(t.TempDir(), "missing"))
	if err != nil {
		t.Fatal(err)
	}
	up := &fakeUpstream{rrs: map[string][]string{"www.example.org. A": {"www.example.org. 60 IN A 140.82.112.3"}}}
	r, _ := newTestResolver(t, up)
	r.Upstreams = ups
	pr := r.policy.Load().Project("alpha")
	if _, err := r.Lookup(context.Background(), pr, "www.example.org"); err != nil {
		t.Fatal(err)
	}
	r.answer(context.Background(), alpha, query("a.example.org.", mdns.TypeA))
	if want := []string{"www.example.org.", "a.example.org."}; !slices.Equal(up.asked, want) {
		t.Errorf("asked %q, want %q", up.asked, want)
	}
}
