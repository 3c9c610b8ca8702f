package policy

import (
	"fmt"
	"net/netip"
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
		{"exact", Facts{alpha, dst(443), true, "github.com"}, Decision{Allow, "alpha", "sni:github.com", ""}},
		{"exact, any case, trailing dot", Facts{alpha, dst(443), true, "GitHub.COM."}, Decision{Allow, "alpha", "sni:github.com", ""}},
		{"wildcard one level", Facts{alpha, dst(443), true, "www.github.com"}, Decision{Allow, "alpha", "sni:*.github.com", ""}},
		{"wildcard any depth", Facts{alpha, dst(443), true, "a.b.c.github.com"}, Decision{Allow, "alpha", "sni:*.github.com", ""}},
		{"lookalike suffix", Facts{alpha, dst(443), true, "evilgithub.com"}, Decision{Deny, "alpha", "", "no rule of project alpha allows evilgithub.com on port 443"}},
		{"lookalike prefix", Facts{alpha, dst(443), true, "github.com.evil.org"}, Decision{Deny, "alpha", "", "no rule of project alpha allows github.com.evil.org on port 443"}},
		{"other name", Facts{alpha, dst(443), true, "example.com"}, Decision{Deny, "alpha", "", "no rule of project alpha allows example.com on port 443"}},
		{"wrong port", Facts{alpha, dst(8443), true, "github.com"}, Decision{Deny, "alpha", "", "no rule of project alpha allows github.com on port 8443"}},
		{"explicit port", Facts{alpha, dst(8443), true, "api.example.org"}, Decision{Allow, "alpha", "sni:api.example.org ports 8443", ""}},
		{"explicit port replaces 443", Facts{alpha, dst(443), true, "api.example.org"}, Decision{Deny, "alpha", "", "no rule of project alpha allows api.example.org on port 443"}},
		{"not TLS", Facts{alpha, dst(443), false, ""}, Decision{Deny, "alpha", "", "not a TLS ClientHello"}},
		{"no SNI", Facts{alpha, dst(443), true, ""}, Decision{Deny, "alpha", "", "TLS ClientHello without a server name (SNI)"}},
		{"wildcard as SNI", Facts{alpha, dst(443), true, "*.github.com"}, Decision{Deny, "alpha", "", "server name is not a valid host name"}},
		{"garbage SNI", Facts{alpha, dst(443), true, "git hub.com"}, Decision{Deny, "alpha", "", "server name is not a valid host name"}},
		{"other project's rule", Facts{beta, dst(443), true, "github.com"}, Decision{Deny, "beta", "", "no rule of project beta allows github.com on port 443"}},
		{"beta's own rule", Facts{beta, dst(443), true, "example.com"}, Decision{Allow, "beta", "sni:example.com", ""}},
		{"project without rules allows nothing", Facts{empty, dst(443), true, "github.com"}, Decision{Deny, "empty", "", "no rule of project empty allows github.com on port 443"}},
		{"source in no project", Facts{netip.MustParseAddr("172.31.9.2"), dst(443), true, "github.com"}, Decision{Deny, "", "", "source address is in no project"}},
		{"IPv6 source", Facts{netip.MustParseAddr("2001:db8::2"), dst(443), true, "github.com"}, Decision{Deny, "", "", "source address is in no project"}},
		{"IPv4-mapped source", Facts{netip.MustParseAddr("::ffff:172.31.0.2"), dst(443), true, "github.com"}, Decision{Allow, "alpha", "sni:github.com", ""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, p.Decide(tc.facts)); diff != "" {
				t.Errorf("Decide(%+v) (-want +got):\n%s", tc.facts, diff)
			}
		})
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
	f := Facts{netip.MustParseAddr("172.31.0.2"), netip.MustParseAddrPort("198.18.1.1:443"), true, "a.b.zone4999.example.net"}
	b.ReportAllocs()
	for b.Loop() {
		if d := p.Decide(f); d.Verdict != Allow {
			b.Fatal(d)
		}
	}
}
