package envoy

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestRedteamMethodGuards: every allow route of a rule with methods
// requires each method-override header to be missing or one of the
// methods, and every allow route of an injecting rule refuses TRACE and
// TRACK (by :method or by an override), as policy.DecideRequest does.
func TestRedteamMethodGuards(t *testing.T) {
	const cfg = `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - https: api.example.com
        methods: [GET]
        paths: ["/v1/*"]
        inject: {Authorization: "Bearer ${secret:apikey}"}
      - https: api.example.com
        methods: [POST]
        paths: [/v1/chat]
      - https: api.example.com
        paths: ["/open/*"]
        inject: {X-Api-Key: "${secret:apikey}"}
`
	pol := mustPolicy(t, cfg)
	var lst any
	if err := json.Unmarshal(JSON(Listener(pol, termOptions(t))), &lst); err != nil {
		t.Fatal(err)
	}
	// Walk to every route with allow metadata.
	var routes []map[string]any
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if md, ok := v["metadata"].(map[string]any); ok && strings.Contains(mustJSON(md), `"verdict":"allow"`) {
				routes = append(routes, v)
			}
			for _, x := range v {
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(lst)
	if len(routes) != 3 {
		t.Fatalf("%d allow routes; want 3", len(routes))
	}
	for _, r := range routes {
		rule := mustJSON(r["metadata"])
		headers := mustJSON(r["match"])
		if strings.Contains(rule, "methods") {
			for _, h := range []string{"x-http-method-override", "x-http-method", "x-method-override"} {
				if !strings.Contains(headers, `"name":"`+h+`"`) {
					t.Errorf("route of %s does not check %s: %s", rule, h, headers)
				}
			}
		}
		if strings.Contains(rule, "inject") && !strings.Contains(headers, "TRACE|TRACK") {
			t.Errorf("route of %s lets TRACE through with injected headers: %s", rule, headers)
		}
	}
}

func mustJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
