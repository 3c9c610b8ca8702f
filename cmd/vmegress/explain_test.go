package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// explainConfig's only DNS upstream is a loopback port where nothing
// listens: explain never sends a query off the machine.
const explainConfig = `dns:
  upstreams: [127.0.0.1:1]
projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: a.example
        ports: [8080]
      - http: b.example
        ports: [8080]
      - cidr: 198.51.100.0/24
        ports: [22]
`

func TestExplainCLI(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(cfg, []byte(explainConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	explain := func(args ...string) string {
		t.Helper()
		code, out, errOut := runCLI(t, nil, append([]string{"--config", cfg, "policy", "explain"}, args...)...)
		if code != 0 {
			t.Fatalf("explain %v: exit %d: %s", args, code, errOut)
		}
		return out
	}
	// Both kinds on 8080: both verdicts, the first byte decides (issue 11).
	out := explain("alpha", "b.example:8080")
	for _, want := range []string{"as: TLS (sni rules)\nverdict: deny", "as: plain HTTP (http rules)\nverdict: allow\nrule: http:b.example ports 8080"} {
		if !strings.Contains(out, want) {
			t.Errorf("no %q in:\n%s", want, out)
		}
	}
	var got []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(explain("alpha", "b.example:8080", "--json")), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		got = append(got, m)
	}
	if len(got) != 2 || got[0]["as"] != "tls" || got[0]["verdict"] != "deny" || got[1]["as"] != "http" || got[1]["verdict"] != "allow" || got[1]["inspect"] != "tls-or-http" || got[1]["project"] != "alpha" {
		t.Errorf("--json: %v", got)
	}
	// One kind asked for; an address decided by a cidr rule.
	if out := explain("alpha", "a.example:8080", "--as", "tls", "--json"); !strings.Contains(out, `"verdict":"allow"`) || strings.Count(out, "\n") != 1 {
		t.Errorf("--as tls: %s", out)
	}
	if out := explain("alpha", "x.example:22", "--addr", "198.51.100.9", "--as", "none"); !strings.Contains(out, "verdict: allow\nrule: cidr:198.51.100.0/24 ports 22\ninspection: none (cidr rule)") {
		t.Errorf("--addr: %s", out)
	}
	if code, _, _ := runCLI(t, nil, "--config", cfg, "policy", "explain", "alpha", "a.example", "--as", "quic"); code != 2 {
		t.Errorf("--as quic: exit %d; want 2", code)
	}
}
