package config

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseHTTPSRules(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte(`secrets_dir: /etc/vmegress/secrets/
upstream_ca_file: /etc/vmegress/upstream-ca.pem
projects:
  a:
    allow:
      - https: API.Example.com
        methods: [get, POST]
        paths: ["/v1/chat/*", /v1/models]
        inject:
          x-api-key: "k-${secret:example}"
          Authorization: "Bearer ${secret:openai}"
      - https: "*.example.org"
        ports: [8443]
      - http: deb.debian.org
        methods: [GET]
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.SecretsDir != "/etc/vmegress/secrets" || cfg.UpstreamCAFile != "/etc/vmegress/upstream-ca.pem" {
		t.Errorf("settings: %q %q", cfg.SecretsDir, cfg.UpstreamCAFile)
	}
	want := []Rule{
		{Kind: KindHTTPS, Name: "api.example.com", Methods: []string{"GET", "POST"}, Paths: []string{"/v1/chat/*", "/v1/models"},
			Inject: []Header{{"Authorization", "Bearer ${secret:openai}"}, {"X-Api-Key", "k-${secret:example}"}}, Pos: Position{6, 9}},
		{Kind: KindHTTPS, Name: "*.example.org", Ports: []uint16{8443}, Pos: Position{12, 9}},
		{Kind: KindHTTP, Name: "deb.debian.org", Methods: []string{"GET"}, Pos: Position{14, 9}},
	}
	if diff := cmp.Diff(want, cfg.Projects[0].Allow, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Errorf("rules (-want +got):\n%s", diff)
	}
	if got := cfg.Projects[0].Allow[0].EffectivePorts(); len(got) != 1 || got[0] != 443 {
		t.Errorf("https default ports %v", got)
	}
	if diff := cmp.Diff([]string{"openai", "example"}, cfg.Projects[0].SecretNames()); diff != "" {
		t.Errorf("secret names (-want +got):\n%s", diff)
	}
	// The API's document form keeps every field.
	b, _ := json.Marshal(PolicyDocument(cfg.Projects[0]))
	again, err := ParsePolicy("", "a", b)
	if err != nil {
		t.Fatal(err)
	}
	for i := range want {
		if !again.Allow[i].Same(cfg.Projects[0].Allow[i]) {
			t.Errorf("round trip of rule %d: %+v", i, again.Allow[i])
		}
	}
}

func TestParseHTTPSErrors(t *testing.T) {
	for _, tc := range []struct{ name, yaml, want string }{
		{"wildcard any", "projects:\n  a:\n    allow:\n      - https: \"*\"\n", `c.yaml:4:16: https: "*" is not allowed`},
		{"bad name", "projects:\n  a:\n    allow:\n      - https: a..b\n", `c.yaml:4:16: https: "a..b"`},
		{"method", "projects:\n  a:\n    allow:\n      - https: a.com\n        methods: [G3T]\n", `c.yaml:5:19: methods: "G3T" is not an HTTP method`},
		{"connect", "projects:\n  a:\n    allow:\n      - https: a.com\n        methods: [CONNECT]\n", `c.yaml:5:19: methods: CONNECT is never forwarded`},
		{"empty methods", "projects:\n  a:\n    allow:\n      - https: a.com\n        methods: []\n", `c.yaml:5:18: methods must list at least one method`},
		{"relative path", "projects:\n  a:\n    allow:\n      - https: a.com\n        paths: [v1]\n", `c.yaml:5:17: paths: "v1" must start with /`},
		{"inner star", "projects:\n  a:\n    allow:\n      - https: a.com\n        paths: [\"/a/*/b\"]\n", `c.yaml:5:17: paths: "/a/*/b": * is only allowed at the end`},
		{"dot segment", "projects:\n  a:\n    allow:\n      - https: a.com\n        paths: [\"/a/../b\"]\n", `c.yaml:5:17: paths: "/a/../b" has a ".." segment`},
		{"query", "projects:\n  a:\n    allow:\n      - https: a.com\n        paths: [\"/a?b=1\"]\n", `c.yaml:5:17: paths: "/a?b=1": byte '?'`},
		{"escape", "projects:\n  a:\n    allow:\n      - https: a.com\n        paths: [\"/a%2fb\"]\n", `c.yaml:5:17: paths: "/a%2fb": byte '%'`},
		{"bad header", "projects:\n  a:\n    allow:\n      - https: a.com\n        inject: {\"X Key\": v}\n", `c.yaml:5:18: inject: "X Key" is not a header name`},
		{"framing header", "projects:\n  a:\n    allow:\n      - https: a.com\n        inject: {host: evil.com}\n", `c.yaml:5:18: inject: header Host is never set`},
		{"twice", "projects:\n  a:\n    allow:\n      - https: a.com\n        inject: {x-a: v, X-A: w}\n", `c.yaml:5:26: inject: header X-A is set twice`},
		{"bad ref", "projects:\n  a:\n    allow:\n      - https: a.com\n        inject: {X-A: \"${env:HOME}\"}\n", `c.yaml:5:23: inject X-A: "${env:HOME}": "${" must start a ${secret:NAME} reference`},
		{"bad secret name", "projects:\n  a:\n    allow:\n      - https: a.com\n        inject: {X-A: \"${secret:../x}\"}\n", `secret name "../x"`},
		{"unclosed", "projects:\n  a:\n    allow:\n      - https: a.com\n        inject: {X-A: \"${secret:x\"}\n", `without a closing }`},
		{"inject list", "projects:\n  a:\n    allow:\n      - https: a.com\n        inject: [a]\n", `c.yaml:5:17: inject must be a mapping`},
		{"methods on sni", "projects:\n  a:\n    allow:\n      - sni: a.com\n        methods: [GET]\n", `c.yaml:5:18: rule sni:a.com methods GET: methods, paths and inject are only for https and http rules`},
		{"paths on cidr", "projects:\n  a:\n    allow:\n      - cidr: 10.0.0.0/8\n        ports: [1]\n        paths: [/]\n", `methods, paths and inject are only for https and http rules (a cidr rule`},
		{"https deny", "projects:\n  a:\n    deny:\n      - https: a.com\n", `c.yaml:4:16: deny rule https: a.com: https is an allow rule kind`},
		{"deny with paths", "projects:\n  a:\n    deny:\n      - http: a.com\n        paths: [/x]\n", `c.yaml:5:16: deny rule http:a.com paths /x: methods, paths and inject are only for allow rules`},
		{"https smtp", "projects:\n  a:\n    allow:\n      - https: a.com\n        ports: [25]\n", `port 25 (SMTP)`},
		{"secrets_dir relative", "secrets_dir: secrets\n", `c.yaml:1:14: secrets_dir: "secrets" must be an absolute path`},
		{"upstream_ca_file relative", "upstream_ca_file: ca.pem\n", `c.yaml:1:19: upstream_ca_file: "ca.pem" must be an absolute path`},
		{"envoy wildcard", "dataplane: envoy\nprojects:\n  a:\n    allow:\n      - sni: b.com\n      - https: \"*.a.com\"\n", `c.yaml:6:9: project "a": allow rule https:*.a.com needs dataplane builtin (Envoy shows a terminated guest certificates`},
		{"envoy http methods", "dataplane: envoy\nprojects:\n  a:\n    allow:\n      - http: a.com\n        methods: [GET]\n", `c.yaml:5:9: project "a": allow rule http:a.com methods GET needs dataplane builtin`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(tc.yaml))
			if err == nil || !IsInvalid(err) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v; want an error with %q", err, tc.want)
			}
		})
	}
}

// TestEnvoyHTTPS: https rules for names (methods, paths, inject) load on
// dataplane envoy.
func TestEnvoyHTTPS(t *testing.T) {
	y := "dataplane: envoy\nprojects:\n  a:\n    allow:\n      - https: a.com\n        methods: [GET]\n        paths: [\"/v1/*\"]\n        inject: {Authorization: \"Bearer ${secret:k}\"}\n"
	if _, err := Parse("c.yaml", []byte(y)); err != nil {
		t.Errorf("https rule on envoy: %v", err)
	}
}

func TestHTTPInjectWarns(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte("projects:\n  a:\n    allow:\n      - http: a.com\n        inject: {X-Key: \"${secret:k}\"}\n      - https: b.com\n        inject: {X-Key: \"${secret:k}\"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	w := cfg.Warnings()
	if len(w) != 1 || !strings.Contains(w[0], "http:a.com") || !strings.Contains(w[0], "unencrypted") {
		t.Errorf("warnings %q; want one about http:a.com injecting in clear", w)
	}
}
