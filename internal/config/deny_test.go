package config

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestParseDenyAndPresets(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte(`
projects:
  a:
    allow:
      - sni: "*"
      - http: "*"
      - preset: pypi
    deny:
      - sni: evil.example
      - http: "*.evil.example"
        ports: [8080]
      - cidr: 198.51.100.0/24
      - sni: mail.example
        ports: [25]
`))
	if err != nil {
		t.Fatal(err)
	}
	p := cfg.Project("a")
	if len(p.Allow) != 4 || p.Allow[0].Name != AnyName || p.Allow[2].String() != "preset:pypi/sni:pypi.org" {
		t.Errorf("allow: %+v", p.Allow)
	}
	if len(p.Deny) != 4 || p.Deny[0].Ports != nil || p.Deny[2].Ports != nil || p.Deny[1].String() != "http:*.evil.example ports 8080" {
		t.Errorf("deny: %+v (a deny rule without ports has none: every port)", p.Deny)
	}
	if w := cfg.Warnings(); len(w) != 1 || !strings.Contains(w[0], "DNS exfiltration") {
		t.Errorf("warnings %q; want one about DNS exfiltration", w)
	}
	// The API form: the same rules, and a preset renders as itself.
	pr, err := ParsePolicy("", "a", []byte(`{"allow":[{"preset":"npm"},{"preset":"npm"},{"sni":"x.example"}],"deny":[{"sni":"*"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(PolicyDocument(pr))
	if want := `{"allow":[{"preset":"npm"},{"preset":"npm"},{"sni":"x.example"}],"deny":[{"sni":"*"}],"max_connections":1024,"mode":"enforce"}`; string(b) != want {
		t.Errorf("document %s; want %s", b, want)
	}
	again, err := ParsePolicy("", "a", b)
	if err != nil || !SameRules(again.Allow, pr.Allow) || !SameRules(again.Deny, pr.Deny) {
		t.Errorf("round trip: %+v, %v", again, err)
	}
}

// TestPresetsValid expands every preset through the validator, in both
// lists, and checks each names its sources and a version.
func TestPresetsValid(t *testing.T) {
	if len(Presets()) < 14 {
		t.Errorf("%d presets", len(Presets()))
	}
	for _, pre := range Presets() {
		for _, list := range []string{listAllow, listDeny} {
			rules, err := pre.Rules(list)
			if err != nil || len(rules) == 0 {
				t.Errorf("preset %s in %s: %d rules, %v", pre.Name, list, len(rules), err)
			}
			for _, r := range rules {
				if r.Preset != pre.Name {
					t.Errorf("preset %s: rule %s not marked", pre.Name, r)
				}
			}
		}
		if len(pre.Sources) == 0 || pre.Version == "" || pre.Description == "" {
			t.Errorf("preset %s: needs sources, a version and a description", pre.Name)
		}
		// The config parser takes it as an entry.
		if _, err := Parse("c.yaml", []byte("projects:\n  a:\n    allow:\n      - preset: "+pre.Name+"\n")); err != nil {
			t.Errorf("preset %s in a config: %v", pre.Name, err)
		}
	}
	// A preset body with a bad rule is refused by the same validator.
	bad := Preset{Name: "bad", Body: "- sni: \"a.*.com\"\n"}
	if _, err := bad.Rules(listAllow); err == nil || !strings.Contains(err.Error(), "wildcard") {
		t.Errorf("bad preset: %v; want the validator's error", err)
	}
}

// TestEnvoyRefusesDeny: dataplane envoy refuses cidr deny rules at load,
// naming each rule at its position (never a silent difference between
// planes); sni and http deny rules and http "*" are rendered, so accepted.
func TestEnvoyRefusesDeny(t *testing.T) {
	_, err := Parse("c.yaml", []byte("dataplane: envoy\nprojects:\n  a:\n    allow:\n      - sni: \"*\"\n      - http: \"*\"\n    deny:\n      - sni: evil.example\n      - cidr: 198.51.100.0/24\n      - http: \"*.evil.example\"\n"))
	if err == nil || !strings.Contains(err.Error(), `c.yaml:9:9: project "a": deny rule cidr:198.51.100.0/24 needs dataplane builtin`) ||
		strings.Contains(err.Error(), "sni:evil.example") || strings.Contains(err.Error(), "http:") || strings.Count(err.Error(), "\n") != 0 {
		t.Errorf("got %v; want the cidr deny rule alone", err)
	}
}

// TestParseTCP: tcp rules take a name or a *. wildcard and need ports;
// "*", port 25 and a missing ports list are refused; deny rules need no
// ports; dataplane envoy refuses them (and presets holding them) at load,
// naming the rule, and only in the projects that use them.
func TestParseTCP(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte(`
projects:
  a:
    allow:
      - tcp: GitHub.com.
        ports: [22]
      - tcp: "*.db.example"
        ports: [5432, 5433]
    deny:
      - tcp: bad.db.example
`))
	if err != nil {
		t.Fatal(err)
	}
	p := cfg.Project("a")
	if len(p.Allow) != 2 || p.Allow[0].String() != "tcp:github.com ports 22" || p.Allow[1].String() != "tcp:*.db.example ports 5432,5433" || p.Deny[0].String() != "tcp:bad.db.example" {
		t.Errorf("rules: %v / %v", p.Allow, p.Deny)
	}
	for _, tc := range []struct{ rule, want string }{
		{"- tcp: github.com", "c.yaml:5:14: tcp rule github.com needs ports"},
		{"- tcp: \"*\"\n        ports: [22]", `c.yaml:5:14: tcp: "*" is not allowed`},
		{"- tcp: mail.example\n        ports: [25]", "c.yaml:5:14: tcp rule mail.example: port 25 (SMTP) is never allowed by a name rule"},
		{"- tcp: -bad-.example\n        ports: [22]", "c.yaml:5:14: tcp: "},
	} {
		_, err := Parse("c.yaml", []byte("projects:\n  a:\n    subnet: 172.31.0.0/30\n    allow:\n      "+tc.rule+"\n"))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v; want %q", tc.rule, err, tc.want)
		}
	}
	// The ruleset decides tcp rules (either backend), so Envoy takes them.
	for _, fw := range []string{"nftables", "iptables"} {
		if _, err := Parse("c.yaml", []byte("dataplane: envoy\nfirewall: "+fw+"\nprojects:\n  a:\n    allow:\n      - tcp: github.com\n        ports: [22]\n    deny:\n      - tcp: bad.github.com\n  b:\n    allow:\n      - preset: github\n")); err != nil {
			t.Errorf("envoy on %s with tcp rules: %v", fw, err)
		}
	}
	// The API form carries tcp rules through.
	pr, err := ParsePolicy("", "a", []byte(`{"allow":[{"tcp":"github.com","ports":[22]}]}`))
	if err != nil || len(pr.Allow) != 1 || pr.Allow[0].Kind != KindTCP {
		t.Fatalf("policy: %+v, %v", pr, err)
	}
	b, _ := json.Marshal(PolicyDocument(pr))
	if !strings.Contains(string(b), `{"ports":[22],"tcp":"github.com"}`) {
		t.Errorf("document %s", b)
	}
}
