package policy

import (
	"net"
	"net/netip"
	"net/url"
	"path"
	"strings"
	"testing"

	"github.com/vmegress/vmegress/internal/config"
)

const httpsPolicy = `
projects:
  a:
    subnet: 172.31.0.0/30
    allow:
      - sni: api.example.com        # the https rule below takes the name over
      - sni: plain.example.com
      - https: api.example.com
        methods: [GET]
        paths: ["/v1/*", /health]
        inject: {Authorization: "Bearer ${secret:key}"}
      - https: api.example.com
        methods: [POST]
        paths: [/v1/chat]
      - https: "*.files.example"
      - http: deb.debian.org
        methods: [GET, HEAD]
      - http: other.example
    deny:
      - sni: bad.files.example
`

func TestHTTPSNameStage(t *testing.T) {
	p := mustCompile(t, httpsPolicy)
	src := netip.MustParseAddr("172.31.0.2")
	dst := netip.MustParseAddrPort("198.51.100.1:443")
	if _, in := p.Connect(src, dst); in != InspectTLS {
		t.Errorf("port 443 inspects %v", in)
	}
	for _, tc := range []struct {
		name      string
		verdict   Verdict
		terminate bool
		rule      string
	}{
		{"api.example.com", Allow, true, "https:api.example.com methods GET paths /v1/*,/health inject Authorization"},
		{"plain.example.com", Allow, false, "sni:plain.example.com"},
		{"x.y.files.example", Allow, true, "https:*.files.example"},
		{"bad.files.example", Deny, false, "deny/sni:bad.files.example"},
		{"files.example", Deny, false, ""},
	} {
		d := p.Decide(Facts{Src: src, Dst: dst, Kind: KindTLS, Name: tc.name})
		term := d.Verdict == Allow && p.ProjectFor(src).Terminates(KindTLS, tc.name, 443)
		if d.Verdict != tc.verdict || term != tc.terminate || d.Rule != tc.rule {
			t.Errorf("%s: %+v; want %s terminate %v rule %q", tc.name, d, tc.verdict, tc.terminate, tc.rule)
		}
	}
	pr := p.ProjectFor(src)
	if !pr.AllowsName("x.files.example") || !pr.AllowsName("api.example.com") {
		t.Error("the resolver would not answer names of https rules")
	}
	// http: only hosts with request rules are read request by request.
	http := netip.MustParseAddrPort("198.51.100.1:80")
	if d := p.Decide(Facts{Src: src, Dst: http, Kind: KindHTTP, Name: "deb.debian.org"}); d.Verdict != Allow || !pr.Terminates(KindHTTP, "deb.debian.org", 80) {
		t.Errorf("deb.debian.org: %+v", d)
	}
	if d := p.Decide(Facts{Src: src, Dst: http, Kind: KindHTTP, Name: "other.example"}); d.Verdict != Allow || pr.Terminates(KindHTTP, "other.example", 80) {
		t.Errorf("other.example: %+v", d)
	}
}

func TestDecideRequest(t *testing.T) {
	p := mustCompile(t, httpsPolicy)
	pr := p.Project("a")
	req := func(host, method, path string) Request {
		esc := path
		if i := strings.Index(path, "|"); i >= 0 { // "decoded|escaped"
			path, esc = path[:i], path[i+1:]
		}
		return Request{Kind: KindTLS, Name: "api.example.com", Port: 443, Host: host, Method: method, Path: path, EscapedPath: esc}
	}
	for _, tc := range []struct {
		q      Request
		allow  bool
		inject bool
		reason string
	}{
		{req("api.example.com", "GET", "/v1/models"), true, true, ""},
		{req("API.example.com:443", "GET", "/health"), true, true, ""},
		{req("api.example.com", "POST", "/v1/chat"), true, false, ""}, // the second rule: no inject
		{req("api.example.com", "DELETE", "/v1/models"), false, false, "method DELETE not allowed for api.example.com"},
		{req("api.example.com", "GET", "/admin"), false, false, "path /admin not allowed for api.example.com"},
		{req("api.example.com", "GET", "/health/x"), false, false, "path /health/x not allowed"},
		{req("api.example.com", "GET", "/v1/../admin|/v1/%2e%2e/admin"), false, false, ". or .. segment"},
		{req("api.example.com", "GET", "/v1/..;/admin"), false, false, ". or .. segment"},
		{req("api.example.com", "GET", "/v1/a/b|/v1/a%2Fb"), false, false, "escaped /"},
		{req("api.example.com", "GET", `/v1/a\b`), false, false, "backslash"},
		{req("api.example.com", "GET", "/v1/%2e%2e/admin|/v1/%252e%252e/admin"), false, false, "escaped twice"},
		{req("other.example.com", "GET", "/v1/models"), false, false, "request for host other.example.com on a connection to api.example.com"},
		{req("api.example.com:8443", "GET", "/v1/models"), false, false, "port 8443"},
		{req("api.example.com", "get", "/v1/models"), false, false, "method get not allowed"},
	} {
		d := pr.DecideRequest(tc.q)
		if (d.Verdict == Allow) != tc.allow || (len(d.Inject) > 0) != tc.inject || !strings.Contains(d.Reason, tc.reason) {
			t.Errorf("%s %s %s: %+v; want allow %v inject %v reason with %q", tc.q.Method, tc.q.Host, tc.q.Path, d, tc.allow, tc.inject, tc.reason)
		}
	}
	if d := pr.DecideRequest(req("api.example.com", "GET", "/v1/models")); len(d.Inject) != 1 || d.Inject[0] != (config.Header{Name: "Authorization", Value: "Bearer ${secret:key}"}) {
		t.Errorf("inject %+v", d.Inject)
	}
	// A wildcard https rule with no methods or paths allows any request to the name.
	w := Request{Kind: KindTLS, Name: "a.files.example", Port: 443, Host: "a.files.example", Method: "PUT", Path: "/x/../y", EscapedPath: "/x/../y"}
	if d := pr.DecideRequest(w); d.Verdict != Allow || len(d.Inject) > 0 {
		t.Errorf("wildcard: %+v", d)
	}
	// Plain HTTP: the http rules, by method.
	h := Request{Kind: KindHTTP, Name: "deb.debian.org", Port: 80, Host: "deb.debian.org", Method: "POST", Path: "/", EscapedPath: "/"}
	if d := pr.DecideRequest(h); d.Verdict != Deny || !strings.Contains(d.Reason, "method POST") {
		t.Errorf("http POST: %+v", d)
	}
	h.Method = "HEAD"
	if d := pr.DecideRequest(h); d.Verdict != Allow {
		t.Errorf("http HEAD: %+v", d)
	}
}

// FuzzDecideRequest: a request a rule with paths allows is one whose path,
// however a server normalises it (dot segments resolved, escapes decoded),
// stays under an allowed path; and a request for another host is never
// allowed.
func FuzzDecideRequest(f *testing.F) {
	for _, s := range []string{"/v1/models", "/v1/../admin", "/v1/%2e%2e/admin", "/v1/a%2fb", "/v1/..;/x", "/v1//x", `/v1\..\x`, "/health"} {
		f.Add("api.example.com", "GET", s)
	}
	f.Add("API.example.com:443", "GET", "/v1/x")
	f.Add("evil.com", "GET", "/v1/x")
	pr := mustCompile(f, httpsPolicy).Project("a")
	f.Fuzz(func(t *testing.T, host, method, escaped string) {
		u, err := url.Parse(escaped)
		if err != nil || u.Path == "" {
			return
		}
		d := pr.DecideRequest(Request{Kind: KindTLS, Name: "api.example.com", Port: 443, Host: host, Method: method, Path: u.Path, EscapedPath: u.EscapedPath()})
		if d.Verdict != Allow {
			return
		}
		h, _, err := net.SplitHostPort(host)
		if err != nil {
			h = host
		}
		if !strings.EqualFold(strings.TrimSuffix(h, "."), "api.example.com") {
			t.Fatalf("host %q allowed on a connection to api.example.com", host)
		}
		decoded, _ := url.PathUnescape(u.EscapedPath())
		decoded, _ = url.PathUnescape(decoded) // a server that decodes twice
		clean := path.Clean(strings.ReplaceAll(decoded, `\`, "/"))
		if !strings.HasPrefix(clean+"/", "/v1/") && clean != "/health" && clean != "/v1/chat" {
			t.Fatalf("%s %q (%q) allowed; a server may read it as %q", method, escaped, u.Path, clean)
		}
	})
}

// TestPolicyTerminates: a policy terminates when some project has an https
// name no deny covers (the Envoy plane serves certificates only then).
func TestPolicyTerminates(t *testing.T) {
	for _, tc := range []struct {
		name, yaml string
		want       bool
	}{
		{"https rule", httpsPolicy, true},
		{"no https rule", "projects:\n  a:\n    subnet: 172.31.0.0/30\n    allow:\n      - sni: api.example.com\n      - http: deb.debian.org\n", false},
		{"https rule denied", "projects:\n  a:\n    subnet: 172.31.0.0/30\n    allow:\n      - https: api.example.com\n    deny:\n      - sni: \"*.example.com\"\n", false},
		{"second project", "projects:\n  a:\n    subnet: 172.31.0.0/30\n    allow:\n      - sni: a.example\n  b:\n    subnet: 172.31.0.4/30\n    allow:\n      - https: b.example\n", true},
	} {
		if got := mustCompile(t, tc.yaml).Terminates(); got != tc.want {
			t.Errorf("%s: Terminates() = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestMethodOverrideQuery: a _method query parameter (Rails, Laravel,
// Symfony, Express's method-override) is refused where a rule limits
// methods or injects, in any case or escaping, and passes where it does
// neither.
func TestMethodOverrideQuery(t *testing.T) {
	p := mustCompile(t, httpsPolicy)
	pr := p.Project("a")
	for _, tc := range []struct {
		name, method, query string
		allow               bool
	}{
		{"api.example.com", "POST", "", true},
		{"api.example.com", "POST", "_method=DELETE", false},
		{"api.example.com", "POST", "x=1&_METHOD=post", false},
		{"api.example.com", "POST", "%5f%6Dethod=DELETE", false},
		{"api.example.com", "POST", "a=1;_method=PUT", false},
		{"api.example.com", "POST", "q=methodical", true},
		{"api.example.com", "POST", "%255fmethod=x", true}, // decodes once to %5fmethod: no server sees _method
		{"x.files.example", "GET", "_method=DELETE", true}, // neither methods nor inject
	} {
		path := "/v1/chat"
		if tc.name != "api.example.com" {
			path = "/any"
		}
		d := pr.DecideRequest(Request{Kind: KindTLS, Name: tc.name, Port: 443, Host: tc.name, Method: tc.method, Path: path, EscapedPath: path, RawQuery: tc.query})
		if (d.Verdict == Allow) != tc.allow {
			t.Errorf("%s %s%s?%s: %s (%s), want allowed %v", tc.method, tc.name, path, tc.query, d.Verdict, d.Reason, tc.allow)
		}
		if !tc.allow && !strings.Contains(d.Reason, "_method query parameter") {
			t.Errorf("%s?%s: reason %q does not name the _method parameter", path, tc.query, d.Reason)
		}
	}
}
