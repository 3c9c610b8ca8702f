package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/netip"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/rawhttp"
	"github.com/vmegress/vmegress/internal/tlsca"
	"github.com/vmegress/vmegress/internal/world"
)

const rtE2ESecret = "sk-redteam-Secret-41c7"

// TestRedteamTerminate: a hostile guest speaking raw HTTP/1.1 and HTTP/2
// inside terminated TLS tries to reach another host (domain fronting, one
// connection for several :authority values), a refused path or method
// (path and method disguises, method-override headers, pipelining,
// smuggling, upgrades, CONNECT), and to read or misplace the injected
// secret (TRACE, duplicate headers, another project's connections); the
// secret is then grepped for in every output. Both planes.
func TestRedteamTerminate(t *testing.T) {
	e := newWorldWith(t, []world.GuestSpec{
		{Project: "alpha", Subnet: alphaSubnet},
		{Project: "beta", Subnet: netip.MustParsePrefix("172.31.0.4/30")},
	}, baseConfig)
	dir := e.w.Dir
	originCA, err := tlsca.Load(filepath.Join(dir, "origin-ca"), tlsca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := originCA.Leaf("example.com")
	api := startEcho(t, e.w, net.JoinHostPort(world.ExampleIP.String(), "8443"), leaf)
	upstreamCA, secretsDir, _ := writeTermFiles(t, dir, originCA, rtE2ESecret)
	if err := e.writeConfig(fmt.Sprintf(`secrets_dir: %s
upstream_ca_file: %s
projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - https: example.com
        ports: [8443]
        methods: [GET]
        paths: ["/v1/*"]
        inject: {Authorization: "Bearer ${secret:apikey}"}
      - https: example.com
        ports: [8443]
        methods: [POST]
        paths: [/v1/chat]
      - https: example.com
        ports: [8443]
        paths: ["/open/*"]
        inject: {X-Api-Key: "${secret:apikey}"}
  beta:
    subnet: 172.31.0.4/30
    allow:
      - https: example.com
        ports: [8443]
`, secretsDir, upstreamCA)); err != nil {
		t.Fatal(err)
	}
	e.start()
	caPEM, err := e.vmegress("ca", "cert")
	if err != nil {
		t.Fatal(err)
	}
	guestCAs := x509.NewCertPool()
	guestCAs.AppendCertsFromPEM([]byte(caPEM))
	t.Cleanup(func() {
		if t.Failed() {
			for _, s := range api.requests() {
				t.Logf("the API server saw: %s", s)
			}
		}
	})

	// dialTLS opens a guest's TLS connection to example.com:8443 (the
	// vetted address anyway) from ns, offering alpn.
	dialTLS := func(ns string, alpn ...string) *tls.Conn {
		t.Helper()
		var c *tls.Conn
		err := world.InNS(ns, func() error {
			var err error
			c, err = tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp4", net.JoinHostPort(world.ExampleIP.String(), "8443"),
				&tls.Config{ServerName: "example.com", RootCAs: guestCAs, NextProtos: alpn})
			return err
		})
		if err != nil {
			t.Fatalf("TLS to example.com:8443 from %s: %v", ns, err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second)) // a hang fails, not blocks
		t.Cleanup(func() { c.Close() })
		return c
	}
	// raw1 sends raw HTTP/1.1 and returns up to n responses (status and
	// body) until the connection ends.
	raw1 := func(ns, raw string, n int) []string {
		t.Helper()
		return rawhttp.HTTP1(dialTLS(ns, "http/1.1"), raw, n)
	}
	// raw2 sends reqs as streams 1, 3, ... of one HTTP/2 connection and
	// returns each one's status and body.
	raw2 := func(ns string, reqs ...rawhttp.H2Request) []string {
		t.Helper()
		return rawhttp.HTTP2(dialTLS(ns, "h2"), reqs...)
	}
	get2 := func(auth, p string, extra ...[2]string) rawhttp.H2Request {
		return append(rawhttp.H2Request{{":method", "GET"}, {":scheme", "https"}, {":authority", auth}, {":path", p}}, extra...)
	}
	alpha, beta := e.g.NS, e.w.Guest("beta").NS
	var shown []string // everything the guest was shown, grepped for the secret in refusals
	refused := func(what string, got []string) {
		t.Helper()
		shown = append(shown, got...)
		if len(got) > 0 && strings.HasPrefix(got[0], "200 ") {
			t.Errorf("%s: %q; want refused", what, got[0])
		}
	}
	const tail = "Connection: close\r\n\r\n"

	// (c) Domain fronting: another host inside example.com's TLS.
	for _, raw := range []string{
		"GET /v1/x HTTP/1.1\r\nHost: github.com\r\n" + tail,
		"GET https://github.com/v1/x HTTP/1.1\r\nHost: example.com:8443\r\n" + tail,
		"GET /v1/x HTTP/1.1\r\nHost: example.com:443\r\n" + tail,
		"GET /v1/x HTTP/1.1\r\nHost: example.com.github.com\r\n" + tail,
	} {
		refused(fmt.Sprintf("fronting %q", raw), raw1(alpha, raw, 1))
	}
	// One HTTP/2 connection, several :authority values (coalescing).
	got := raw2(alpha, get2("github.com", "/v1/x"), get2("example.com:8443", "/v1/ok"), get2("www.github.com:8443", "/v1/x"),
		rawhttp.H2Request{{":method", "GET"}, {":scheme", "https"}, {":path", "/v1/x"}, {"host", "github.com"}})
	refused("h2 :authority github.com", got[0:1])
	refused("h2 :authority www.github.com", got[2:3])
	refused("h2 host github.com without :authority", got[3:4])
	if !strings.HasPrefix(got[1], "200 ") {
		t.Errorf("h2 :authority example.com:8443: %q; want allowed", got[1])
	}

	// (b) Path disguises, HTTP/1.1 and HTTP/2.
	paths := []string{"/v1/../admin", "/v1/%2e%2e/admin", "/v1/%2E%2e/admin", "/v1/..;/admin", "//v1/x", "/v1%2fx", "/V1/x",
		"/v1/x%00", "/admin?/v1/x", "/v1/%252e%252e/admin", "/v1\\..\\admin", "/v1/x/..", "*", "/v1"}
	var h2reqs []rawhttp.H2Request
	for _, p := range paths {
		refused("GET "+p, raw1(alpha, "GET "+p+" HTTP/1.1\r\nHost: example.com:8443\r\n"+tail, 1))
		h2reqs = append(h2reqs, get2("example.com:8443", p))
	}
	for i, g := range raw2(alpha, h2reqs...) {
		refused("h2 GET "+paths[i], []string{g})
	}
	// (b) Method disguises.
	for _, raw := range []string{
		"get /v1/x HTTP/1.1\r\nHost: example.com:8443\r\n" + tail,
		"HEAD /v1/x HTTP/1.1\r\nHost: example.com:8443\r\n" + tail,
		"GET /v1/x HTTP/1.1\r\nHost: example.com:8443\r\nX-HTTP-Method-Override: DELETE\r\n" + tail,
		"GET /v1/x HTTP/1.1\r\nHost: example.com:8443\r\nX-HTTP-Method: delete\r\n" + tail,
		"GET /v1/x HTTP/1.1\r\nHost: example.com:8443\r\nX-Method-Override: PUT\r\n" + tail,
		"POST /v1/chat HTTP/1.1\r\nHost: example.com:8443\r\nX-HTTP-Method-Override: DELETE\r\nContent-Length: 0\r\n" + tail,
		"POST /v1/chat?_method=DELETE HTTP/1.1\r\nHost: example.com:8443\r\nContent-Length: 0\r\n" + tail,
		"GET /v1/x?a=1;%5f%4Dethod=put HTTP/1.1\r\nHost: example.com:8443\r\n" + tail,
		"CONNECT github.com:443 HTTP/1.1\r\nHost: github.com:443\r\n" + tail,
	} {
		refused(fmt.Sprintf("method %q", raw), raw1(alpha, raw, 1))
	}
	got = raw2(alpha, get2("example.com:8443", "/v1/x", [2]string{"x-http-method-override", "DELETE"}),
		rawhttp.H2Request{{":method", "CONNECT"}, {":authority", "github.com:443"}})
	refused("h2 X-HTTP-Method-Override", got[0:1])
	refused("h2 CONNECT", got[1:2])
	// (a) TRACE echoes the request: never with the injected secret.
	refused("TRACE /open/x", raw1(alpha, "TRACE /open/x HTTP/1.1\r\nHost: example.com:8443\r\n"+tail, 1))
	refused("h2 TRACE /open/x", raw2(alpha, rawhttp.H2Request{{":method", "TRACE"}, {":scheme", "https"}, {":authority", "example.com:8443"}, {":path", "/open/x"}}))
	// The refusal names the override, on both planes.
	got = raw1(alpha, "GET /v1/x?_method=DELETE HTTP/1.1\r\nHost: example.com:8443\r\n"+tail, 1)
	refused("GET /v1/x?_method=DELETE", got)
	if len(got) != 1 || !strings.Contains(got[0], "_method query parameter (a method override) is not allowed for example.com") {
		t.Errorf("GET /v1/x?_method=DELETE: %q; want the refusal to name the _method query parameter", got)
	}
	got = raw1(alpha, "GET /v1/x HTTP/1.1\r\nHost: example.com:8443\r\nX-HTTP-Method-Override: DELETE\r\n"+tail, 1)
	if len(got) != 1 || !strings.Contains(got[0], "method-override header") {
		t.Errorf("GET /v1/x with X-HTTP-Method-Override: %q; want the refusal to name the method-override header", got)
	}
	refused("_method=TRACE /open/x", raw1(alpha, "GET /open/x?_method=TRACE HTTP/1.1\r\nHost: example.com:8443\r\n"+tail, 1))
	refused("override TRACE /open/x", raw1(alpha, "GET /open/x HTTP/1.1\r\nHost: example.com:8443\r\nX-HTTP-Method-Override: TRACE\r\n"+tail, 1))
	// Smuggling and pipelining: the hidden or second request never arrives.
	raw1(alpha, "GET /v1/a HTTP/1.1\r\nHost: example.com:8443\r\n\r\nGET /admin HTTP/1.1\r\nHost: example.com:8443\r\n"+tail, 2)
	raw1(alpha, "POST /v1/chat HTTP/1.1\r\nHost: example.com:8443\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: example.com:8443\r\n"+tail, 2)
	// Upgrades: h2c is not passed on; WebSocket to a refused path is refused.
	raw1(alpha, "GET /v1/h2c HTTP/1.1\r\nHost: example.com:8443\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"+tail, 1)
	refused("WebSocket to /admin", raw1(alpha, "GET /admin HTTP/1.1\r\nHost: example.com:8443\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", 1))
	// The guest's own Authorization, however spelt and repeated, is replaced.
	got = raw1(alpha, "GET /v1/auth HTTP/1.1\r\nHost: example.com:8443\r\nauthorization: Bearer guest1\r\nAUTHORIZATION: Bearer guest2\r\n"+tail, 1)
	if len(got) != 1 || strings.Count(got[0], "Authorization: ") != 1 || !strings.Contains(got[0], "Authorization: Bearer "+rtE2ESecret) {
		t.Errorf("duplicate Authorization: %q; want the injected one only", got)
	}
	got = raw2(alpha, get2("example.com:8443", "/v1/auth2", [2]string{"authorization", "Bearer guest1"}, [2]string{"authorization", "Bearer guest2"}))
	if strings.Count(got[0], "Authorization: ") != 1 || !strings.Contains(got[0], "Authorization: Bearer "+rtE2ESecret) {
		t.Errorf("h2 duplicate authorization: %q; want the injected one only", got[0])
	}
	// Another project's guest: nothing injected, and never an upstream
	// connection alpha's requests used (Envoy: a cluster per project).
	got = raw1(beta, "GET /v1/beta HTTP/1.1\r\nHost: example.com:8443\r\n"+tail, 1)
	if len(got) != 1 || !strings.HasPrefix(got[0], "200 ") || strings.Contains(got[0], rtE2ESecret) {
		t.Errorf("beta GET /v1/beta: %q; want allowed, nothing injected", got)
	}

	// What reached the API server: only what the rules allow, for
	// example.com, the secret only where an injecting rule allows it.
	alphaConns := map[string]bool{}
	for _, s := range api.requests() {
		p, _, _ := strings.Cut(s.uri, "?")
		clean := path.Clean(p)
		if s.host != "example.com" && s.host != "example.com:8443" {
			t.Errorf("the API server got a request for another host: %s", s)
		}
		if s.header.Get("Upgrade") != "" || s.header.Get("X-Http-Method-Override") != "" || s.header.Get("X-Method-Override") != "" || s.header.Get("X-Http-Method") != "" {
			t.Errorf("the API server got an upgrade or method override: %s", s)
		}
		allowed := (s.method == "GET" && strings.HasPrefix(p, "/v1/") && strings.HasPrefix(clean, "/v1/")) ||
			(s.method == "POST" && p == "/v1/chat") || (s.method != "TRACE" && strings.HasPrefix(clean, "/open/"))
		if !allowed && p != "/v1/beta" {
			t.Errorf("the API server got a refused request: %s", s)
		}
		carries := strings.Contains(fmt.Sprint(s.header), rtE2ESecret)
		if p == "/v1/beta" {
			if carries {
				t.Errorf("beta's request carried alpha's secret: %s", s)
			}
			if alphaConns[s.remote] {
				t.Errorf("beta's request went on an upstream connection of alpha's (%s)", s.remote)
			}
			continue
		}
		alphaConns[s.remote] = true
		if carries && !(s.method == "GET" && strings.HasPrefix(p, "/v1/")) && !strings.HasPrefix(p, "/open/") {
			t.Errorf("the secret went with a request no injecting rule allows: %s", s)
		}
	}

	// The secret in no output: refusals, daemon log, access log, status,
	// explain, metrics, Envoy's admin.
	e.accessLine("msg", "request", "path", "/v1/beta")
	outputs := map[string]string{"daemon log": e.d.Stderr(), "access log": e.d.RawAccessLog(), "refusals": strings.Join(shown, "\n")}
	for _, args := range [][]string{{"status", "--json"}, {"policy", "explain", "alpha", "example.com:8443"}, {"policy", "check"}} {
		out, _ := e.vmegress(args...)
		outputs[strings.Join(args, " ")] = out
	}
	metrics, _ := e.hostGet("http://127.0.0.1:9901/metrics")
	outputs["metrics"] = metrics
	if onEnvoy() {
		dump, _ := e.envoyAdmin("/config_dump?include_eds")
		outputs["Envoy config_dump"] = dump
		stats, _ := e.envoyAdmin("/stats")
		outputs["Envoy stats"] = stats
	}
	for what, text := range outputs {
		if strings.Contains(text, rtE2ESecret) {
			t.Errorf("the secret appears in the %s", what)
		}
	}
	e.noLeaks()
}
