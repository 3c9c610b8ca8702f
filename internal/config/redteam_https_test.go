package config

import (
	"strings"
	"testing"
)

// TestRedteamTCPOverHTTPS: a tcp rule for the name and port of an https
// rule lets the guest past its methods and paths (decided by address
// first, never read): policy check warns.
func TestRedteamTCPOverHTTPS(t *testing.T) {
	cfg, err := Parse("t.yaml", []byte(`projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - https: api.example.com
        methods: [GET]
        paths: ["/v1/*"]
      - tcp: "*.example.com"
        ports: [443]
      - tcp: other.example.org
        ports: [443]
`))
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, w := range cfg.Warnings() {
		if strings.Contains(w, "unread") {
			found = append(found, w)
		}
	}
	if len(found) != 1 || !strings.Contains(found[0], "tcp:*.example.com") {
		t.Errorf("warnings %q; want one about tcp *.example.com", found)
	}
	for _, tc := range []struct {
		a, b string
		want bool
	}{{"*", "x.com", true}, {"*.a.com", "b.a.com", true}, {"*.a.com", "a.com", false}, {"*.a.com", "*.b.a.com", true}, {"a.com", "b.com", false}, {"*.a.com", "*.b.com", false}} {
		if got := namesOverlap(tc.a, tc.b); got != tc.want {
			t.Errorf("namesOverlap(%q, %q) = %v", tc.a, tc.b, got)
		}
	}
}
