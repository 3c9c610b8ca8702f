package policy

import (
	"net/netip"
	"testing"
)

const denyPolicy = `
projects:
  open:
    subnet: 172.31.0.0/30
    allow:
      - sni: "*"
      - http: "*"
      - sni: "*"
        ports: [8443]
      - sni: api.blocked.example   # an exact allow under a denied wildcard
      - cidr: 198.51.100.0/24
        ports: [22]
    deny:
      - sni: blocked.example
      - sni: "*.blocked.example"
      - http: "*.tracker.example"
      - sni: only443.example
        ports: [443]
      - cidr: 198.51.100.128/25
`

// TestDenyWins: a deny rule refuses what an allow rule (a wildcard, "*",
// or an exact name under a denied wildcard) allows, on both kinds, on the
// ports it names (every port when it names none), and the resolver answers
// only names allowed on some port no deny rule refuses them on.
func TestDenyWins(t *testing.T) {
	p := mustCompile(t, denyPolicy)
	src := netip.MustParseAddr("172.31.0.2")
	for _, tc := range []struct {
		kind    Kind
		name    string
		port    uint16
		verdict Verdict
		rule    string
	}{
		{KindTLS, "github.com", 443, Allow, "sni:*"},
		{KindTLS, "blocked.example", 443, Deny, "deny/sni:blocked.example"},
		{KindTLS, "blocked.example", 8443, Deny, "deny/sni:blocked.example"},
		{KindTLS, "a.b.blocked.example", 443, Deny, "deny/sni:*.blocked.example"},
		{KindTLS, "api.blocked.example", 443, Deny, "deny/sni:*.blocked.example"},
		{KindHTTP, "blocked.example", 80, Allow, "http:*"}, // an sni deny is not an http deny
		{KindHTTP, "x.tracker.example", 80, Deny, "deny/http:*.tracker.example"},
		{KindTLS, "x.tracker.example", 443, Allow, "sni:*"},
		{KindTLS, "only443.example", 443, Deny, "deny/sni:only443.example ports 443"},
		{KindTLS, "only443.example", 8443, Allow, "sni:* ports 8443"},
	} {
		d := p.Decide(Facts{Src: src, Dst: netip.AddrPortFrom(netip.MustParseAddr("203.0.113.1"), tc.port), Kind: tc.kind, Name: tc.name})
		if d.Verdict != tc.verdict || d.Rule != tc.rule {
			t.Errorf("%s %s:%d: %s by %q (%s); want %s by %q", tc.kind, tc.name, tc.port, d.Verdict, d.Rule, d.Reason, tc.verdict, tc.rule)
		}
	}
	// Addresses: a deny cidr (no ports: every port) beats an allow cidr.
	for _, tc := range []struct {
		dst     string
		verdict Verdict
		rule    string
	}{
		{"198.51.100.5:22", Allow, "cidr:198.51.100.0/24 ports 22"},
		{"198.51.100.200:22", Deny, "deny/cidr:198.51.100.128/25"},
	} {
		d, in := p.Connect(src, netip.MustParseAddrPort(tc.dst))
		if d.Verdict != tc.verdict || d.Rule != tc.rule || in != InspectNone {
			t.Errorf("connect %s: %s by %q (%v); want %s by %q", tc.dst, d.Verdict, d.Rule, in, tc.verdict, tc.rule)
		}
	}
	pr := p.Project("open")
	for name, want := range map[string]bool{
		"github.com":          true,
		"blocked.example":     true, // denied on every port for sni; http "*" still allows it
		"api.blocked.example": true, // http "*" allows it on 80
		"only443.example":     true, // sni 8443 is not denied
		"x.tracker.example":   true, // sni allows it
	} {
		if got := pr.AllowsName(name); got != want {
			t.Errorf("AllowsName(%s) = %v; want %v", name, got, want)
		}
	}
	if _, ok := pr.DeniesAddr(netip.MustParseAddr("198.51.100.200")); !ok {
		t.Error("DeniesAddr: a deny cidr with no ports should deny the address everywhere")
	}
}

// TestDenyNXDOMAIN: a name denied for every kind the project allows it
// for is not resolved.
func TestDenyNXDOMAIN(t *testing.T) {
	p := mustCompile(t, `
projects:
  p:
    subnet: 172.31.0.0/30
    allow:
      - sni: "*"
      - http: "*"
      - sni: "*.github.com"
    deny:
      - sni: evil.example
      - http: evil.example
      - sni: "*.github.com"
        ports: [443]
      - http: "*.github.com"
`)
	pr := p.Project("p")
	for name, want := range map[string]bool{"good.example": true, "evil.example": false, "api.github.com": false, "github.com": true} {
		if got := pr.AllowsName(name); got != want {
			t.Errorf("AllowsName(%s) = %v; want %v", name, got, want)
		}
	}
	ex := p.Explain(Query{Project: "p", Dst: netip.AddrPortFrom(netip.Addr{}, 443), Name: "evil.example", Bytes: BytesTLS})
	if ex.Verdict != Deny || ex.Rule != "deny/sni:evil.example" {
		t.Errorf("explain evil.example: %+v; want denied by the deny rule", ex)
	}
}

// TestViewDropsCoveredAllows: the view Envoy renders has the deny patterns
// per port and no allow pattern a deny pattern covers.
func TestViewDropsCoveredAllows(t *testing.T) {
	p := mustCompile(t, denyPolicy)
	for _, v := range p.Project("open").Ports() {
		if v.Port != 443 {
			continue
		}
		if got := Patterns(v.SNI); len(got) != 1 || got[0] != "*" {
			t.Errorf("443 SNI allows %q; want only * (api.blocked.example is covered by *.blocked.example)", got)
		}
		if got := Patterns(v.DenySNI); len(got) != 3 {
			t.Errorf("443 SNI denies %q; want blocked.example, *.blocked.example, only443.example", got)
		}
	}
	for _, tc := range []struct {
		a, b string
		want bool
	}{
		{"*", "x.y", true}, {"*.y", "x.y", true}, {"*.y", "*.x.y", true}, {"*.y", "y", false},
		{"*.x.y", "*.y", false}, {"x.y", "x.y", true}, {"x.y", "*.x.y", false}, {"*.y", "*", false}, {"*.y", "xy", false},
	} {
		if got := Covers(tc.a, tc.b); got != tc.want {
			t.Errorf("Covers(%q, %q) = %v; want %v", tc.a, tc.b, got, tc.want)
		}
	}
}
