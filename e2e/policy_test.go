package e2e

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/vmegress/vmegress/internal/world"
)

// explainJSON runs `policy explain PROJECT HOSTPORT --as AS --json`.
func (e *env) explainJSON(project, hostport, as string) (verdict, rule string) {
	e.t.Helper()
	out, err := e.vmegress("--config", e.cfg, "policy", "explain", project, hostport, "--as", as, "--json")
	if err != nil {
		e.t.Fatalf("explain %s %s: %v\n%s", project, hostport, err, out)
	}
	var got struct{ Verdict, Rule string }
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		e.t.Fatalf("explain: %v\n%s", err, out)
	}
	return got.Verdict, got.Rule
}

// TestDenyBeatsWildcard: allow any name (sni and http "*"), deny some: the
// denied names are refused for TLS and HTTP, get NXDOMAIN when denied for
// every kind, and explain names the deny rule; the rest is reachable.
func TestDenyBeatsWildcard(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: "*"
      - http: "*"
    deny:
      - sni: example.com
      - http: example.com
      - sni: "*.github.com"
`)
	e.start()

	if body, err := e.curl("https://github.com"); err != nil || !strings.HasPrefix(body, "hello from github.com") {
		t.Errorf("TLS to github.com (allowed by sni *): %q, %v", body, err)
	}
	// DNS: denied for both kinds, so never resolved.
	if out, err := e.guest("dig", "+time=3", "+tries=1", "example.com"); err != nil || !strings.Contains(out, "status: NXDOMAIN") {
		t.Errorf("dig example.com: %v\n%s; want NXDOMAIN", err, out)
	}
	// TLS and HTTP to its address: refused.
	_, err := e.curlAt("https://example.com", world.ExampleIP.String())
	refusedReadably(t, err, true)
	if out, err := e.curlAt("http://example.com/", world.ExampleIP.String(), "-w", "\n%{http_code}"); err == nil && !strings.HasSuffix(out, "\n403") {
		t.Errorf("HTTP to example.com: %q; want refused", out)
	}
	// www.github.com: TLS denied by the wildcard deny, HTTP still allowed
	// (so it resolves).
	_, err = e.curl("https://www.github.com")
	refusedReadably(t, err, true)
	if body, err := e.curl("http://www.github.com/"); err != nil || !strings.HasPrefix(body, "hello from www.github.com via http") {
		t.Errorf("HTTP to www.github.com: %q, %v", body, err)
	}
	if h := append(append(e.hits("tls:example.com"), e.hits("http:example.com")...), e.hits("tls:www.github.com")...); len(h) > 0 {
		t.Errorf("a denied connection reached a server: %+v", h)
	}
	e.accessLine("sni", "example.com", "verdict", "deny", "rule", "deny/sni:example.com")
	if onEnvoy() {
		// Envoy's per-request line knows the chain, not the virtual host;
		// the 403's body names the rule.
		if out, _ := e.curlAt("http://example.com/", world.ExampleIP.String()); !strings.Contains(out, "denied by rule http:example.com") {
			t.Errorf("HTTP to example.com on envoy: %q; want a 403 naming the deny rule", out)
		}
	} else {
		e.accessLine("host", "example.com", "verdict", "deny", "rule", "deny/http:example.com")
	}
	for _, tc := range []struct{ hostport, as, verdict, rule string }{
		{"example.com:443", "tls", "deny", "deny/sni:example.com"},
		{"example.com:80", "http", "deny", "deny/http:example.com"},
		{"www.github.com:443", "tls", "deny", "deny/sni:*.github.com"},
		{"github.com:443", "tls", "allow", "sni:*"},
	} {
		if v, r := e.explainJSON("alpha", tc.hostport, tc.as); v != tc.verdict || r != tc.rule {
			t.Errorf("explain %s as %s: %s by %q; want %s by %q", tc.hostport, tc.as, v, r, tc.verdict, tc.rule)
		}
	}
	e.noLeaks()
}

// TestPresetProject: a project allowed `- preset: github` reaches the
// preset's names and nothing else; explain and the access log name the
// preset and its rule.
func TestPresetProject(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - preset: github
`)
	e.start()
	if body, err := e.curl("https://github.com"); err != nil || !strings.HasPrefix(body, "hello from github.com") {
		t.Errorf("TLS to github.com: %q, %v", body, err)
	}
	if body, err := e.curl("https://www.github.com"); err != nil || !strings.HasPrefix(body, "hello from www.github.com") {
		t.Errorf("TLS to www.github.com: %q, %v", body, err)
	}
	if _, err := e.curl("https://example.com"); err == nil || !strings.Contains(err.Error(), "Could not resolve host") {
		t.Errorf("example.com: %v; want NXDOMAIN", err)
	}
	e.accessLine("sni", "github.com", "verdict", "allow", "rule", wantRule("preset:github/sni:github.com", "sni", "alpha/tls/443"))
	if v, r := e.explainJSON("alpha", "www.github.com:443", "tls"); v != "allow" || r != "preset:github/sni:*.github.com" {
		t.Errorf("explain www.github.com: %s by %q; want allow by preset:github/sni:*.github.com", v, r)
	}
	e.noLeaks()
}

// TestAnyName: sni "*" and http "*" allow every name, on both planes; the
// resolver answers any name (what the README warns about).
func TestAnyName(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: "*"
      - http: "*"
`)
	e.start()
	if body, err := e.curl("https://example.com"); err != nil || !strings.HasPrefix(body, "hello from example.com") {
		t.Errorf("TLS to example.com: %q, %v", body, err)
	}
	if body, err := e.curl("http://www.github.com/"); err != nil || !strings.HasPrefix(body, "hello from www.github.com via http") {
		t.Errorf("HTTP to www.github.com: %q, %v", body, err)
	}
	// SNI spoofing is still refused: the name's own address is dialled.
	if body, err := e.curlAt("https://github.com", world.AttackerIP.String()); err != nil || !strings.HasPrefix(body, "hello from github.com") {
		t.Errorf("github.com pinned to the attacker: %q, %v; want the real github.com", body, err)
	}
	e.noLeaks()
}
