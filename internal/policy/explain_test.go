package policy

import (
	"net/netip"
	"strings"
	"testing"
)

const explainPolicy = `
projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: a.example
        ports: [8080]
      - http: b.example
        ports: [8080]
      - sni: "*.github.com"
      - http: deb.debian.org
      - cidr: 198.51.100.0/24
        ports: [22]
  audited:
    subnet: 172.31.0.4/30
    mode: audit
    allow:
      - sni: github.com
  unplaced:
    allow:
      - http: example.com
`

func TestExplain(t *testing.T) {
	p := mustCompile(t, explainPolicy)
	ap := func(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
	port := func(n uint16) netip.AddrPort { return netip.AddrPortFrom(netip.Addr{}, n) }
	for _, tc := range []struct {
		name    string
		q       Query
		verdict Verdict
		rule    string
		inspect Inspect
		as      Kind
	}{
		// The port with both kinds: the first byte tells (issue 11).
		{"sni+http port, HTTP to the http name", Query{Project: "alpha", Dst: port(8080), Name: "b.example", Bytes: BytesHTTP}, Allow, "http:b.example ports 8080", InspectEither, KindHTTP},
		{"sni+http port, TLS to the sni name", Query{Project: "alpha", Dst: port(8080), Name: "a.example", Bytes: BytesTLS}, Allow, "sni:a.example ports 8080", InspectEither, KindTLS},
		{"sni+http port, TLS to the http name", Query{Project: "alpha", Dst: port(8080), Name: "b.example", Bytes: BytesTLS}, Deny, "", InspectEither, KindTLS},
		{"sni+http port, HTTP to the sni name", Query{Project: "alpha", Dst: port(8080), Name: "a.example", Bytes: BytesHTTP}, Deny, "", InspectEither, KindHTTP},
		{"sni+http port, raw bytes are read as HTTP", Query{Project: "alpha", Dst: port(8080), Bytes: BytesRaw}, Deny, "", InspectEither, KindNone},
		{"sni+http port, nothing", Query{Project: "alpha", Dst: port(8080), Bytes: BytesNone}, Deny, "", InspectEither, KindNone},
		{"wildcard, depth 2", Query{Project: "alpha", Dst: port(443), Name: "a.b.github.com", Bytes: BytesTLS}, Allow, "sni:*.github.com", InspectTLS, KindTLS},
		{"wildcard, not the apex", Query{Project: "alpha", Dst: port(443), Name: "github.com", Bytes: BytesTLS}, Deny, "", InspectTLS, KindTLS},
		{"TLS without SNI", Query{Project: "alpha", Dst: port(443), Bytes: BytesTLS}, Deny, "", InspectTLS, KindTLS},
		{"HTTP on a TLS port", Query{Project: "alpha", Dst: port(443), Name: "www.github.com", Bytes: BytesHTTP}, Deny, "", InspectTLS, KindNone},
		{"TLS on an HTTP port", Query{Project: "alpha", Dst: port(80), Name: "deb.debian.org", Bytes: BytesTLS}, Deny, "", InspectHTTP, KindNone},
		{"port without rules", Query{Project: "alpha", Dst: port(9999), Name: "www.github.com", Bytes: BytesTLS}, Deny, "", InspectNone, KindNone},
		{"cidr, server first", Query{Project: "alpha", Dst: ap("198.51.100.7:22"), Bytes: BytesNone}, Allow, "cidr:198.51.100.0/24 ports 22", InspectNone, KindNone},
		{"cidr, other port", Query{Project: "alpha", Dst: ap("198.51.100.7:23"), Bytes: BytesRaw}, Deny, "", InspectNone, KindNone},
		{"by source address", Query{Src: netip.MustParseAddr("172.31.0.2"), Dst: ap("198.18.1.11:443"), Name: "www.github.com", Bytes: BytesTLS}, Allow, "sni:*.github.com", InspectTLS, KindTLS},
		{"source in no project", Query{Src: netip.MustParseAddr("172.31.9.2"), Dst: ap("198.18.1.11:443"), Name: "www.github.com", Bytes: BytesTLS}, Deny, "", InspectNone, KindNone},
		{"audit: refused name", Query{Project: "audited", Dst: port(443), Name: "example.com", Bytes: BytesTLS}, WouldDeny, "", InspectTLS, KindTLS},
		{"audit: port without rules", Query{Project: "audited", Dst: port(22), Bytes: BytesNone}, WouldDeny, "", InspectNone, KindNone},
		{"audit: allowed stays allowed", Query{Project: "audited", Dst: port(443), Name: "github.com", Bytes: BytesTLS}, Allow, "sni:github.com", InspectTLS, KindTLS},
		{"unplaced project", Query{Project: "unplaced", Dst: port(80), Name: "example.com", Bytes: BytesHTTP}, Allow, "http:example.com", InspectHTTP, KindHTTP},
		{"unknown project", Query{Project: "nope", Dst: port(80), Name: "example.com", Bytes: BytesHTTP}, Deny, "", InspectNone, KindNone},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ex := p.Explain(tc.q)
			if ex.Verdict != tc.verdict || ex.Rule != tc.rule || ex.Inspect != tc.inspect || ex.As != tc.as {
				t.Errorf("Explain(%+v) = %+v; want verdict %s, rule %q, inspect %s, as %q", tc.q, ex, tc.verdict, tc.rule, tc.inspect, tc.as)
			}
			if ex.Verdict != Allow && ex.Reason == "" {
				t.Errorf("Explain(%+v): a refusal without a reason", tc.q)
			}
		})
	}
}

// TestExplainIsDecide: with a source address, Explain's verdict is
// Connect's, then Decide's, the two calls the data plane makes.
func TestExplainIsDecide(t *testing.T) {
	p := mustCompile(t, explainPolicy)
	src := netip.MustParseAddr("172.31.0.1")
	for _, dst := range []string{"198.51.100.1:22", "198.18.1.1:443", "198.18.1.1:8080", "198.18.1.1:80"} {
		for _, name := range []string{"a.example", "b.example", "x.github.com", "deb.debian.org"} {
			d := netip.MustParseAddrPort(dst)
			want, in := p.Connect(src, d)
			if in != InspectNone {
				kind := KindTLS
				if in == InspectHTTP {
					kind = KindHTTP
				}
				want = p.Decide(Facts{Src: src, Dst: d, Kind: kind, Name: name})
			}
			b := BytesTLS
			if in == InspectHTTP {
				b = BytesHTTP
			}
			if got := p.Explain(Query{Src: src, Dst: d, Name: name, Bytes: b}); got.Decision != want {
				t.Errorf("%s %s: Explain %+v, Connect/Decide %+v", dst, name, got.Decision, want)
			}
		}
	}
}

func TestParseBytes(t *testing.T) {
	for _, s := range []string{"tls", "http", "raw", "none"} {
		if b, err := ParseBytes(s); err != nil || string(b) != s {
			t.Errorf("ParseBytes(%q) = %q, %v", s, b, err)
		}
	}
	if _, err := ParseBytes("quic"); err == nil {
		t.Error("ParseBytes(quic): no error")
	}
}

// TestExplainRequest: where requests are decided one by one, explain
// decides the request given (default GET /) with DecideRequest.
func TestExplainRequest(t *testing.T) {
	p := mustCompile(t, `
projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - https: api.example
        methods: [GET]
        paths: ["/v1/*"]
      - sni: plain.example
`)
	dst := netip.AddrPortFrom(netip.Addr{}, 443)
	for _, tc := range []struct {
		name, method, path string
		verdict            Verdict
		request            string
	}{
		{"api.example", "GET", "/v1/models", Allow, "GET /v1/models"},
		{"api.example", "DELETE", "/v1/models", Deny, "DELETE /v1/models"},
		{"api.example", "", "", Deny, "GET /"},       // "/" is not under /v1/
		{"plain.example", "DELETE", "/x", Allow, ""}, // not terminated: the request is never seen
	} {
		ex := p.Explain(Query{Project: "alpha", Dst: dst, Name: tc.name, Bytes: BytesTLS, Method: tc.method, Path: tc.path})
		if ex.Verdict != tc.verdict || ex.Request != tc.request {
			t.Errorf("%s %s %s: %s (%q, %s); want %s (%q)", tc.name, tc.method, tc.path, ex.Verdict, ex.Request, ex.Reason, tc.verdict, tc.request)
		}
	}
}

// TestExplainResolved: with the resolver's record, an address's tcp rules
// are decided as the data plane decides them.
func TestExplainResolved(t *testing.T) {
	p := mustCompile(t, `
projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - tcp: git.example
        ports: [22]
`)
	dst := netip.MustParseAddrPort("192.0.2.7:22")
	handed := func(_ string, a netip.Addr) []string {
		if a == dst.Addr() {
			return []string{"git.example"}
		}
		return nil
	}
	if ex := p.Explain(Query{Project: "alpha", Dst: dst, Bytes: BytesNone, Resolved: handed}); ex.Verdict != Allow || ex.Rule != "tcp:git.example ports 22" {
		t.Errorf("handed out: %s by %q (%s)", ex.Verdict, ex.Rule, ex.Reason)
	}
	other := netip.MustParseAddrPort("192.0.2.8:22")
	if ex := p.Explain(Query{Project: "alpha", Dst: other, Bytes: BytesNone, Resolved: handed}); ex.Verdict != Deny || !strings.Contains(ex.Reason, "has not handed 192.0.2.8") {
		t.Errorf("not handed out: %s (%s)", ex.Verdict, ex.Reason)
	}
}
