package policy

import (
	"net/netip"
	"strings"
	"testing"
)

const tcpPolicy = `
projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - tcp: github.com
        ports: [22]
      - tcp: "*.db.example"
        ports: [5432]
      - sni: github.com
    deny:
      - tcp: bad.db.example
`

// TestTCPRules: a tcp rule allows a connection to an address the resolver
// handed the project for a name it matches, on its ports, uninspected; an
// address handed out for no such name, or for a name a tcp deny matches,
// is refused; the resolver answers the names tcp rules allow.
func TestTCPRules(t *testing.T) {
	p := mustCompile(t, tcpPolicy)
	src := netip.MustParseAddr("172.31.0.2")
	gh := netip.MustParseAddr("198.18.1.22")
	handed := map[netip.Addr][]string{
		gh:                                 {"github.com"},
		netip.MustParseAddr("198.18.2.1"):  {"main.db.example"},
		netip.MustParseAddr("198.18.2.2"):  {"bad.db.example"},
		netip.MustParseAddr("198.18.2.3"):  {"bad.db.example", "main.db.example"},
		netip.MustParseAddr("198.18.1.66"): {"attacker.test"},
	}
	var asked []string
	resolved := func(project string, a netip.Addr) []string {
		asked = append(asked, project)
		return handed[a]
	}
	for _, tc := range []struct {
		dst     string
		verdict Verdict
		inspect Inspect
		rule    string
	}{
		{"198.18.1.22:22", Allow, InspectNone, "tcp:github.com ports 22"},
		{"198.18.1.22:2222", Deny, InspectNone, ""},
		{"198.18.1.22:443", Deny, InspectTLS, ""}, // tcp rules are not on 443: sni decides
		{"198.18.1.66:22", Deny, InspectNone, ""},
		{"198.18.9.9:22", Deny, InspectNone, ""},
		{"198.18.2.1:5432", Allow, InspectNone, "tcp:*.db.example ports 5432"},
		{"198.18.2.2:5432", Deny, InspectNone, "deny/tcp:bad.db.example"},
		{"198.18.2.3:5432", Deny, InspectNone, "deny/tcp:bad.db.example"}, // deny wins when names share an address
	} {
		d, in := p.ConnectWith(src, netip.MustParseAddrPort(tc.dst), resolved)
		if d.Verdict != tc.verdict || in != tc.inspect || d.Rule != tc.rule {
			t.Errorf("%s: %s by %q, inspect %s (%s); want %s by %q, inspect %s", tc.dst, d.Verdict, d.Rule, in, d.Reason, tc.verdict, tc.rule, tc.inspect)
		}
	}
	for _, a := range asked {
		if a != "alpha" {
			t.Errorf("resolved asked for project %q", a)
		}
	}
	// Without the resolver's record nothing is allowed by a tcp rule.
	if d, _ := p.Connect(src, netip.MustParseAddrPort("198.18.1.22:22")); d.Verdict != Deny || !strings.Contains(d.Reason, "for no name a tcp rule allows on port 22") {
		t.Errorf("unresolved: %+v", d)
	}
	pr := p.Project("alpha")
	for name, want := range map[string]Verdict{"github.com": Allow, "x.db.example": Allow, "bad.db.example": Deny, "db.example": Deny, "gitlab.com": Deny} {
		if d := pr.Resolve(name); d.Verdict != want {
			t.Errorf("resolve %s: %+v; want %s", name, d, want)
		}
	}
}

// TestExplainTCP: explain decides a name as resolved ("allow once
// resolved") and an address conditionally, naming the tcp rules.
func TestExplainTCP(t *testing.T) {
	p := mustCompile(t, tcpPolicy)
	ex := p.Explain(Query{Project: "alpha", Name: "github.com", Dst: netip.AddrPortFrom(netip.Addr{}, 22), Bytes: BytesNone})
	if ex.Verdict != Allow || ex.Rule != "tcp:github.com ports 22" || !strings.HasPrefix(ex.Reason, "allow once resolved") {
		t.Errorf("name: %+v", ex)
	}
	ex = p.Explain(Query{Project: "alpha", Name: "bad.db.example", Dst: netip.AddrPortFrom(netip.Addr{}, 5432), Bytes: BytesNone})
	if ex.Verdict != Deny || ex.Rule != "deny/tcp:bad.db.example" {
		t.Errorf("denied name: %+v", ex)
	}
	ex = p.Explain(Query{Project: "alpha", Dst: netip.MustParseAddrPort("198.18.1.22:22"), Bytes: BytesNone})
	if ex.Verdict != Deny || !strings.Contains(ex.Reason, "allowed if the resolver handed 198.18.1.22 to the project for a name matching tcp:github.com ports 22") {
		t.Errorf("address: %+v", ex)
	}
}
