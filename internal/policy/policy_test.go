package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/vmegress/vmegress/internal/config"
)

func mustCompile(t testing.TB, yaml string) *Policy {
	t.Helper()
	cfg, err := config.Parse("t.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	p, err := Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

const testPolicy = `
projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: github.com
      - sni: "*.github.com"
      - sni: api.example.org
        ports: [8443]
      - http: deb.debian.org
      - http: "*.both.example"
        ports: [8080]
      - sni: "*.both.example"
        ports: [8080]
      - cidr: 198.51.100.0/24
        ports: [22, 443]
      - cidr: 10.1.2.3/32
        ports: [5432]
  beta:
    subnet: 172.31.0.4/30
    allow:
      - sni: example.com
  empty:
    subnet: 172.31.0.8/30
  unplaced:
    allow:
      - sni: github.com
`

func TestDecide(t *testing.T) {
	p := mustCompile(t, testPolicy)
	alpha := netip.MustParseAddr("172.31.0.2")
	beta := netip.MustParseAddr("172.31.0.6")
	empty := netip.MustParseAddr("172.31.0.10")
	dst := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("198.18.1.1"), port) }
	for _, tc := range []struct {
		name  string
		facts Facts
		want  Decision
	}{
		{"exact", Facts{alpha, dst(443), KindTLS, "github.com"}, Decision{Allow, "alpha", "sni:github.com", ""}},
		{"exact, any case, trailing dot", Facts{alpha, dst(443), KindTLS, "GitHub.COM."}, Decision{Allow, "alpha", "sni:github.com", ""}},
		{"wildcard one level", Facts{alpha, dst(443), KindTLS, "www.github.com"}, Decision{Allow, "alpha", "sni:*.github.com", ""}},
		{"wildcard any depth", Facts{alpha, dst(443), KindTLS, "a.b.c.github.com"}, Decision{Allow, "alpha", "sni:*.github.com", ""}},
		{"lookalike suffix", Facts{alpha, dst(443), KindTLS, "evilgithub.com"}, Decision{Deny, "alpha", "", "no sni rule of project alpha allows evilgithub.com on port 443"}},
		{"lookalike prefix", Facts{alpha, dst(443), KindTLS, "github.com.evil.org"}, Decision{Deny, "alpha", "", "no sni rule of project alpha allows github.com.evil.org on port 443"}},
		{"other name", Facts{alpha, dst(443), KindTLS, "example.com"}, Decision{Deny, "alpha", "", "no sni rule of project alpha allows example.com on port 443"}},
		{"wrong port", Facts{alpha, dst(8443), KindTLS, "github.com"}, Decision{Deny, "alpha", "", "no sni rule of project alpha allows github.com on port 8443"}},
		{"explicit port", Facts{alpha, dst(8443), KindTLS, "api.example.org"}, Decision{Allow, "alpha", "sni:api.example.org ports 8443", ""}},
		{"explicit port replaces 443", Facts{alpha, dst(443), KindTLS, "api.example.org"}, Decision{Deny, "alpha", "", "no sni rule of project alpha allows api.example.org on port 443"}},
		{"not TLS", Facts{alpha, dst(443), KindNone, ""}, Decision{Deny, "alpha", "", "nothing to decide on: no ClientHello or HTTP request"}},
		{"no SNI", Facts{alpha, dst(443), KindTLS, ""}, Decision{Deny, "alpha", "", "TLS ClientHello without a server name (SNI)"}},
		{"wildcard as SNI", Facts{alpha, dst(443), KindTLS, "*.github.com"}, Decision{Deny, "alpha", "", "server name is not a valid host name"}},
		{"garbage SNI", Facts{alpha, dst(443), KindTLS, "git hub.com"}, Decision{Deny, "alpha", "", "server name is not a valid host name"}},
		{"other project's rule", Facts{beta, dst(443), KindTLS, "github.com"}, Decision{Deny, "beta", "", "no sni rule of project beta allows github.com on port 443"}},
		{"beta's own rule", Facts{beta, dst(443), KindTLS, "example.com"}, Decision{Allow, "beta", "sni:example.com", ""}},
		{"project without rules allows nothing", Facts{empty, dst(443), KindTLS, "github.com"}, Decision{Deny, "empty", "", "no sni rule of project empty allows github.com on port 443"}},
		{"source in no project", Facts{netip.MustParseAddr("172.31.9.2"), dst(443), KindTLS, "github.com"}, Decision{Deny, "", "", "source address is in no project"}},
		{"IPv6 source", Facts{netip.MustParseAddr("2001:db8::2"), dst(443), KindTLS, "github.com"}, Decision{Deny, "", "", "source address is in no project"}},
		{"http rule", Facts{alpha, dst(80), KindHTTP, "deb.debian.org"}, Decision{Allow, "alpha", "http:deb.debian.org", ""}},
		{"http rule is not an sni rule", Facts{alpha, dst(443), KindTLS, "deb.debian.org"}, Decision{Deny, "alpha", "", "no sni rule of project alpha allows deb.debian.org on port 443"}},
		{"sni rule is not an http rule", Facts{alpha, dst(80), KindHTTP, "github.com"}, Decision{Deny, "alpha", "", "no http rule of project alpha allows github.com on port 80"}},
		{"http without host", Facts{alpha, dst(80), KindHTTP, ""}, Decision{Deny, "alpha", "", "HTTP request without a Host"}},
		{"IPv4-mapped source", Facts{netip.MustParseAddr("::ffff:172.31.0.2"), dst(443), KindTLS, "github.com"}, Decision{Allow, "alpha", "sni:github.com", ""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, p.Decide(tc.facts)); diff != "" {
				t.Errorf("Decide(%+v) (-want +got):\n%s", tc.facts, diff)
			}
		})
	}
}

func TestConnect(t *testing.T) {
	p := mustCompile(t, testPolicy)
	alpha := netip.MustParseAddr("172.31.0.2")
	for _, tc := range []struct {
		name    string
		src     netip.Addr
		dst     string
		want    Decision
		inspect Inspect
	}{
		{"sni port", alpha, "198.18.1.1:443", Decision{Deny, "alpha", "", "not a TLS ClientHello"}, InspectTLS},
		{"http port", alpha, "198.18.1.1:80", Decision{Deny, "alpha", "", "not an HTTP request"}, InspectHTTP},
		{"both kinds on one port", alpha, "198.18.1.1:8080", Decision{Deny, "alpha", "", "neither a TLS ClientHello nor an HTTP request"}, InspectEither},
		{"cidr port: no inspection", alpha, "198.51.100.9:22", Decision{Allow, "alpha", "cidr:198.51.100.0/24 ports 22,443", ""}, InspectNone},
		{"cidr covers 443 without SNI", alpha, "198.51.100.9:443", Decision{Allow, "alpha", "cidr:198.51.100.0/24 ports 22,443", ""}, InspectNone},
		{"cidr wrong port", alpha, "198.51.100.9:23", Decision{Deny, "alpha", "", "no rule of project alpha allows port 23"}, InspectNone},
		{"cidr host rule", alpha, "10.1.2.3:5432", Decision{Allow, "alpha", "cidr:10.1.2.3/32 ports 5432", ""}, InspectNone},
		{"unknown port is refused at once", alpha, "198.18.1.1:25", Decision{Deny, "alpha", "", "no rule of project alpha allows port 25"}, InspectNone},
		{"no project", netip.MustParseAddr("172.31.5.5"), "198.51.100.9:22", Decision{Deny, "", "", "source address is in no project"}, InspectNone},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, in := p.Connect(tc.src, netip.MustParseAddrPort(tc.dst))
			if diff := cmp.Diff(tc.want, d); diff != "" || in != tc.inspect {
				t.Errorf("Connect: inspect %v, want %v; decision (-want +got):\n%s", in, tc.inspect, diff)
			}
		})
	}
}

func TestAllowsName(t *testing.T) {
	pr := mustCompile(t, testPolicy).Project("alpha")
	for name, want := range map[string]bool{
		"github.com": true, "www.github.com": true, "api.example.org": true, "deb.debian.org": true,
		"x.both.example": true, "both.example": false, "example.com": false, "debian.org": false, "com": false,
	} {
		if got := pr.AllowsName(name); got != want {
			t.Errorf("AllowsName(%q) = %v", name, got)
		}
	}
	if !pr.CIDRNames(netip.MustParseAddr("10.1.2.3")) || pr.CIDRNames(netip.MustParseAddr("10.1.2.4")) {
		t.Error("CIDRNames")
	}
}

func TestProjectsSkipsUnplaced(t *testing.T) {
	p := mustCompile(t, testPolicy)
	var names []string
	for _, pr := range p.Projects() {
		names = append(names, pr.Name)
	}
	if diff := cmp.Diff([]string{"alpha", "beta", "empty"}, names); diff != "" {
		t.Errorf("projects (-want +got):\n%s", diff)
	}
}

// BenchmarkDecide10k measures a decision against one project with 10,000 rules.
func BenchmarkDecide10k(b *testing.B) {
	y := "projects:\n  a:\n    subnet: 172.31.0.0/30\n    allow:\n"
	for i := 0; i < 5000; i++ {
		y += fmt.Sprintf("      - sni: host%d.example.com\n      - sni: \"*.zone%d.example.net\"\n", i, i)
	}
	p := mustCompile(b, y)
	f := Facts{netip.MustParseAddr("172.31.0.2"), netip.MustParseAddrPort("198.18.1.1:443"), KindTLS, "a.b.zone4999.example.net"}
	b.ReportAllocs()
	for b.Loop() {
		if d := p.Decide(f); d.Verdict != Allow {
			b.Fatal(d)
		}
	}
}

// BenchmarkReload4000x50 is a policy reload of 4,000 projects with 50 rules
// each: parse and validate the config, then compile the matchers.
func BenchmarkReload4000x50(b *testing.B) {
	var y strings.Builder
	y.WriteString("projects:\n")
	for p := 0; p < 4000; p++ {
		fmt.Fprintf(&y, "  p%d:\n    subnet: 172.31.%d.%d/30\n    allow:\n", p, (4*p)/256, (4*p)%256)
		for r := 0; r < 50; r++ {
			fmt.Fprintf(&y, "      - sni: h%d.p%d.example.com\n", r, p)
		}
	}
	data := []byte(y.String())
	b.ReportAllocs()
	for b.Loop() {
		cfg, err := config.Parse("big.yaml", data)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := Compile(cfg); err != nil {
			b.Fatal(err)
		}
	}
}
