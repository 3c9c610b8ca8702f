package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"path"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/rawhttp"
	"github.com/vmegress/vmegress/internal/tlsca"
)

// Red-team tests of TLS termination (https rules) on the builtin plane: a
// hostile guest speaking raw HTTP/1.1 and HTTP/2 inside the terminated
// TLS, against an origin that records every request it gets and echoes
// its headers back (as TRACE, or any echo endpoint, does).

const rtSecret = "rt-S3cret-Val-9d1e"

// rtRules: GET /v1/* injects Authorization, POST /v1/chat injects nothing,
// /open/* (any method) injects X-Api-Key.
const rtRules = `      - https: api.example.com
        ports: [%[1]d]
        methods: [GET]
        paths: ["/v1/*"]
        inject: {Authorization: "Bearer ${secret:key}"}
      - https: api.example.com
        ports: [%[1]d]
        methods: [POST]
        paths: [/v1/chat]
      - https: api.example.com
        ports: [%[1]d]
        paths: ["/open/*"]
        inject: {X-Api-Key: "${secret:key}"}
`

// rtSeen is one request as the origin received it.
type rtSeen struct {
	method, uri, host, proto string
	header                   http.Header
	body                     string
	bodyErr                  error // the body did not arrive whole
}

func (s rtSeen) String() string {
	return fmt.Sprintf("%s %s host=%s %s %v", s.method, s.uri, s.host, s.proto, s.header)
}

type rtOrigin struct {
	addr    string
	accepts atomic.Int64
	mu      sync.Mutex
	seen    []rtSeen
}

func (o *rtOrigin) requests() []rtSeen {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]rtSeen(nil), o.seen...)
}

type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// startRTOrigin serves HTTPS (h2 and HTTP/1.1) with cert, echoing every
// request's line and headers in its answer.
func startRTOrigin(t *testing.T, cert *tls.Certificate) *rtOrigin {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := &rtOrigin{addr: ln.Addr().String()}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			s := rtSeen{method: r.Method, uri: r.RequestURI, host: r.Host, proto: r.Proto, header: r.Header.Clone()}
			body, err := io.ReadAll(r.Body)
			s.body, s.bodyErr = string(body), err
			o.mu.Lock()
			o.seen = append(o.seen, s)
			o.mu.Unlock()
			fmt.Fprintf(w, "%s %s %s\nHost: %s\n", r.Method, r.RequestURI, r.Proto, r.Host)
			var keys []string
			for k := range r.Header {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				for _, v := range r.Header[k] {
					fmt.Fprintf(w, "%s: %s\n", k, v)
				}
			}
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{*cert}, NextProtos: []string{"h2", "http/1.1"}},
		ErrorLog:  log.New(io.Discard, "", 0),
	}
	go srv.ServeTLS(countingListener{ln, &o.accepts}, "", "")
	t.Cleanup(func() { srv.Close() })
	return o
}

type rtWorld struct {
	termProxy
	origin *rtOrigin
}

// startRTWorld runs a proxy terminating api.example.com with rules (a
// format taking the listener's port) in front of an origin whose
// certificate is originLeaf(certs) (nil: the origin CA's leaf for
// api.example.com); the proxy trusts certs.originCA.
func startRTWorld(t *testing.T, rules string, originLeaf func(certs termCerts) *tls.Certificate) rtWorld {
	t.Helper()
	certs := newTermCerts(t)
	leaf := certs.originLeaf
	if originLeaf != nil {
		leaf = originLeaf(certs)
	}
	origin := startRTOrigin(t, leaf)
	w := rtWorld{termProxy: startTermProxy(t, certs, certs.originRoots, rtSecret, rules, origin.addr), origin: origin}
	t.Cleanup(func() {
		if t.Failed() {
			for _, s := range origin.requests() {
				t.Logf("origin saw: %s", s)
			}
		}
	})
	return w
}

// tlsConn is a guest's TLS connection to the proxy for server name sni,
// offering alpn.
func (w rtWorld) tlsConn(t *testing.T, sni string, alpn ...string) *tls.Conn {
	t.Helper()
	c, err := tls.Dial("tcp4", w.addr, &tls.Config{ServerName: sni, RootCAs: w.guestCAs, NextProtos: alpn})
	if err != nil {
		t.Fatalf("TLS to the proxy as %s: %v", sni, err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second)) // a hang fails, not blocks
	t.Cleanup(func() { c.Close() })
	return c
}

// raw1 sends raw HTTP/1.1 bytes inside TLS for api.example.com and
// returns every response until the connection ends (or n responses).
func (w rtWorld) raw1(t *testing.T, raw string, n int) []string {
	t.Helper()
	return rawhttp.HTTP1(w.tlsConn(t, "api.example.com", "http/1.1"), raw, n)
}

// raw2 sends reqs as HTTP/2 streams 1, 3, ... on one TLS connection for
// sni and returns each stream's status and body ("RST" for a reset
// stream, "" when nothing came).
func (w rtWorld) raw2(t *testing.T, sni string, reqs ...rawhttp.H2Request) []string {
	t.Helper()
	c := w.tlsConn(t, sni, "h2")
	if p := c.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("ALPN %q; want h2", p)
	}
	return rawhttp.HTTP2(c, reqs...)
}

// noSecretOutside fails when the secret went to a request no injecting
// rule allows: per the rules, only GET /v1/* (Authorization) and /open/*
// (X-Api-Key) may carry it, for api.example.com.
func (w rtWorld) noSecretOutside(t *testing.T) {
	t.Helper()
	for _, s := range w.origin.requests() {
		var carries bool
		for _, vs := range s.header {
			for _, v := range vs {
				carries = carries || strings.Contains(v, rtSecret)
			}
		}
		if !carries {
			continue
		}
		p := strings.SplitN(s.uri, "?", 2)[0]
		clean := path.Clean(p)
		ok := s.host == "api.example.com" || strings.HasPrefix(s.host, "api.example.com:")
		ok = ok && ((s.method == "GET" && strings.HasPrefix(clean, "/v1/") && strings.HasPrefix(p, "/v1/")) ||
			strings.HasPrefix(clean, "/open/") && strings.HasPrefix(p, "/open/"))
		if !ok {
			t.Errorf("the secret reached the origin on %s", s)
		}
	}
	if l := w.log(); strings.Contains(l, rtSecret) {
		t.Errorf("the access log holds the secret:\n%s", l)
	}
}

// TestRedteamTermFronting: a request inside TLS for api.example.com that
// names another host (Host, absolute-form target, HTTP/2 :authority,
// several :authority values on one connection) never reaches the origin
// and never gets the secret.
func TestRedteamTermFronting(t *testing.T) {
	w := startRTWorld(t, rtRules, nil)
	for _, raw := range []string{
		"GET /v1/x HTTP/1.1\r\nHost: evil.example.net\r\nConnection: close\r\n\r\n",
		"GET https://evil.example.net/v1/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
		"GET http://evil.example.net/v1/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
		"GET https://api.example.com@evil.example.net/v1/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
		"GET /v1/x HTTP/1.1\r\nHost: api.example.com.evil.example.net\r\nConnection: close\r\n\r\n",
		"GET /v1/x HTTP/1.1\r\nHost: api.example.com:1\r\nConnection: close\r\n\r\n",
		"GET /v1/x HTTP/1.1\r\nHost: api.example.com\r\nHost: evil.example.net\r\nConnection: close\r\n\r\n",
		"GET /v1/x HTTP/1.0\r\nConnection: close\r\n\r\n",
	} {
		got := w.raw1(t, raw, 1)
		if len(got) == 1 && !strings.HasPrefix(got[0], "403 ") && !strings.HasPrefix(got[0], "400 ") {
			t.Errorf("%q: %q; want refused", raw, got)
		}
	}
	// HTTP/2: each stream is decided by its own :authority; a Host field
	// next to :authority does not choose the upstream.
	get := func(auth string, extra ...[2]string) rawhttp.H2Request {
		r := rawhttp.H2Request{{":method", "GET"}, {":scheme", "https"}, {":authority", auth}, {":path", "/v1/x"}}
		return append(r, extra...)
	}
	got := w.raw2(t, "api.example.com",
		get("evil.example.net"),
		get("api.example.com"),
		get("api.example.com", [2]string{"host", "evil.example.net"}),
		rawhttp.H2Request{{":method", "GET"}, {":scheme", "https"}, {":path", "/v1/x"}, {"host", "evil.example.net"}},
		get("evil.example.net", [2]string{"host", "api.example.com"}),
	)
	for i, want := range []bool{false, true, true, false, false} {
		if allowed := strings.HasPrefix(got[i], "200 "); allowed != want {
			t.Errorf("h2 stream %d: %q; want allowed %v", 2*i+1, got[i], want)
		}
	}
	for _, s := range w.origin.requests() {
		if s.host != "api.example.com" || s.header.Get("Host") != "" {
			t.Errorf("the origin got a request for another host: %s", s)
		}
	}
	// An SNI other than the connection's own is not terminated at all.
	if c, err := tls.Dial("tcp4", w.addr, &tls.Config{ServerName: "evil.example.net", RootCAs: w.guestCAs}); err == nil {
		c.Close()
		t.Error("TLS for a name no rule allows was terminated")
	}
	w.noSecretOutside(t)
}

// TestRedteamTermPaths: path forms a server could resolve to a path the
// rules refuse are refused, and every request that reaches the origin is
// one the rules allow after the server's own normalisation.
func TestRedteamTermPaths(t *testing.T) {
	w := startRTWorld(t, rtRules, nil)
	refused := []string{
		"/v1/../admin", "/v1/%2e%2e/admin", "/v1/%2E%2e/admin", "/v1/.%2e/admin", "/v1/x/..", "/v1/x/%2e",
		"/v1/..;/admin", "/v1/x/..;a=b/admin", "/v1/;/../admin", "//v1/x", "/v1%2fx", "/v1/x%2f..%2f..%2fadmin",
		"/v1/x%5c..%5cadmin", "/v1\\..\\admin", "/v1/%252e%252e/admin", "/V1/x", "/v1/x%00", "/v1/x%0d%0aX:1",
		"/admin#/v1/x", "/admin?/v1/x", "/admin;/v1/x", "*", "/v1", "/v1/./../admin", "/./admin",
	}
	for _, p := range refused {
		got := w.raw1(t, "GET "+p+" HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n", 1)
		if len(got) == 1 && !strings.HasPrefix(got[0], "403 ") && !strings.HasPrefix(got[0], "400 ") {
			t.Errorf("GET %s: %q; want refused", p, got)
		}
	}
	// The same over HTTP/2, where no request-line parser stands between
	// the guest and :path.
	var reqs []rawhttp.H2Request
	for _, p := range refused {
		reqs = append(reqs, rawhttp.H2Request{{":method", "GET"}, {":scheme", "https"}, {":authority", "api.example.com"}, {":path", p}})
	}
	for i, got := range w.raw2(t, "api.example.com", reqs...) {
		if strings.HasPrefix(got, "200 ") {
			t.Errorf("h2 GET %s: %q; want refused", refused[i], got)
		}
	}
	for _, s := range w.origin.requests() {
		t.Errorf("the origin got a refused path: %s", s)
	}
	// Allowed: the query holds what looks like a path; the origin's path is /v1/x.
	if got := w.raw1(t, "GET /v1/x?a=/../../admin HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n", 1); len(got) != 1 || !strings.HasPrefix(got[0], "200 ") {
		t.Errorf("GET /v1/x?query: %q", got)
	}
	w.noSecretOutside(t)
}

// TestRedteamTermMethods: methods the rules refuse, under every disguise.
func TestRedteamTermMethods(t *testing.T) {
	w := startRTWorld(t, rtRules, nil)
	for _, tc := range []struct{ name, raw string }{
		{"lower-case get", "get /v1/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"},
		{"DELETE", "DELETE /v1/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"},
		{"HEAD where GET is allowed", "HEAD /v1/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"},
		{"unknown method", "PURGE /v1/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"},
		{"X-HTTP-Method-Override", "GET /v1/x HTTP/1.1\r\nHost: api.example.com\r\nX-HTTP-Method-Override: DELETE\r\nConnection: close\r\n\r\n"},
		{"X-HTTP-Method", "GET /v1/x HTTP/1.1\r\nHost: api.example.com\r\nX-HTTP-Method: DELETE\r\nConnection: close\r\n\r\n"},
		{"X-Method-Override", "GET /v1/x HTTP/1.1\r\nHost: api.example.com\r\nX-Method-Override: DELETE\r\nConnection: close\r\n\r\n"},
		{"override on the POST rule", "POST /v1/chat HTTP/1.1\r\nHost: api.example.com\r\nX-HTTP-Method-Override: DELETE\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"},
		{"_method in the query", "POST /v1/chat?_method=DELETE HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"},
		{"_method escaped", "GET /v1/x?%5F%6Dethod=DELETE HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"},
		{"_Method after ;", "GET /v1/x?a=1;_Method=delete HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n"},
		{"CONNECT", "CONNECT evil.example.net:443 HTTP/1.1\r\nHost: evil.example.net:443\r\nConnection: close\r\n\r\n"},
		{"CONNECT to itself", "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\nConnection: close\r\n\r\n"},
	} {
		got := w.raw1(t, tc.raw, 1)
		if len(got) == 1 && !strings.HasPrefix(got[0], "403 ") && !strings.HasPrefix(got[0], "400 ") {
			t.Errorf("%s: %q; want refused", tc.name, got)
		}
	}
	got := w.raw2(t, "api.example.com",
		rawhttp.H2Request{{":method", "get"}, {":scheme", "https"}, {":authority", "api.example.com"}, {":path", "/v1/x"}},
		rawhttp.H2Request{{":method", "GET"}, {":scheme", "https"}, {":authority", "api.example.com"}, {":path", "/v1/x"}, {"x-http-method-override", "DELETE"}},
		rawhttp.H2Request{{":method", "CONNECT"}, {":authority", "evil.example.net:443"}},
		rawhttp.H2Request{{":method", "CONNECT"}, {":protocol", "websocket"}, {":scheme", "https"}, {":authority", "api.example.com"}, {":path", "/v1/x"}},
	)
	for i, g := range got {
		if strings.HasPrefix(g, "200 ") {
			t.Errorf("h2 stream %d: %q; want refused", 2*i+1, g)
		}
	}
	for _, s := range w.origin.requests() {
		t.Errorf("the origin got a refused request: %s", s)
	}
}

// TestRedteamTermTrace: a TRACE answer echoes the request, so a TRACE
// carrying an injected credential hands it to the guest (RFC 9110 9.3.8:
// a client must not send credentials in TRACE). The /open/* rule allows
// any method and injects X-Api-Key.
func TestRedteamTermTrace(t *testing.T) {
	w := startRTWorld(t, rtRules, nil)
	for _, m := range []string{"TRACE", "TRACK"} {
		got := w.raw1(t, m+" /open/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n", 1)
		if len(got) == 1 && strings.Contains(got[0], rtSecret) {
			t.Errorf("%s /open/x: the guest read the injected secret: %q", m, got[0])
		}
	}
	got := w.raw2(t, "api.example.com", rawhttp.H2Request{{":method", "TRACE"}, {":scheme", "https"}, {":authority", "api.example.com"}, {":path", "/open/x"}})
	if strings.Contains(got[0], rtSecret) {
		t.Errorf("h2 TRACE /open/x: the guest read the injected secret: %q", got[0])
	}
	for _, s := range w.origin.requests() {
		if s.method == "TRACE" || s.method == "TRACK" {
			if strings.Contains(fmt.Sprint(s.header), rtSecret) {
				t.Errorf("the origin got a %s carrying the secret: %s", s.method, s)
			}
		}
	}
	// Allowed methods on /open/* still get the secret.
	if got := w.raw1(t, "PUT /open/x HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 1); len(got) != 1 || !strings.Contains(got[0], "X-Api-Key: "+rtSecret) {
		t.Errorf("PUT /open/x: %q; want the injected header", got)
	}
}

// TestRedteamTermHeaders: header tricks against injection and framing.
func TestRedteamTermHeaders(t *testing.T) {
	w := startRTWorld(t, rtRules, nil)
	// The guest's own Authorization, in any case and any number, is
	// replaced by the one injected value.
	got := w.raw1(t, "GET /v1/x HTTP/1.1\r\nHost: api.example.com\r\nauthorization: Bearer guest1\r\nAUTHORIZATION: Bearer guest2\r\nAuthorization: Bearer guest3\r\nConnection: close\r\n\r\n", 1)
	if len(got) != 1 || !strings.HasPrefix(got[0], "200 ") || strings.Count(got[0], "Authorization: ") != 1 || strings.Contains(got[0], "guest") {
		t.Errorf("duplicate Authorization: %q; want only the injected one", got)
	}
	h2got := w.raw2(t, "api.example.com", rawhttp.H2Request{{":method", "GET"}, {":scheme", "https"}, {":authority", "api.example.com"}, {":path", "/v1/x"},
		{"authorization", "Bearer guest1"}, {"authorization", "Bearer guest2"}})
	if !strings.HasPrefix(h2got[0], "200 ") || strings.Count(h2got[0], "Authorization: ") != 1 || strings.Contains(h2got[0], "guest") {
		t.Errorf("h2 duplicate authorization: %q; want only the injected one", h2got[0])
	}
	// obs-fold continuing Authorization: refused or replaced, never kept.
	got = w.raw1(t, "GET /v1/x HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer\r\n guest-fold\r\nConnection: close\r\n\r\n", 1)
	if len(got) == 1 && strings.Contains(got[0], "guest-fold") {
		t.Errorf("obs-fold: %q", got)
	}
	// Pipelining: the second request goes to a refused path; the origin
	// sees the first only. TE+CL: a body framed two ways is refused or
	// re-framed; the origin never sees the hidden request.
	w.raw1(t, "GET /v1/a HTTP/1.1\r\nHost: api.example.com\r\n\r\nGET /admin HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n", 2)
	w.raw1(t, "POST /v1/chat HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"+
		"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n", 2)
	w.raw1(t, "POST /v1/chat HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\nContent-Length: 40\r\n\r\n"+
		"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n", 2)
	// h2c upgrade and a WebSocket upgrade to a refused path.
	w.raw1(t, "GET /v1/h2c HTTP/1.1\r\nHost: api.example.com\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n", 1)
	if got := w.raw1(t, "GET /admin HTTP/1.1\r\nHost: api.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", 1); len(got) != 1 || !strings.HasPrefix(got[0], "403 ") {
		t.Errorf("WebSocket upgrade to a refused path: %q; want 403", got)
	}
	for _, s := range w.origin.requests() {
		if !strings.HasPrefix(s.uri, "/v1/") {
			t.Errorf("the origin got a refused request: %s", s)
		}
		if s.header.Get("Upgrade") != "" || s.header.Get("Http2-Settings") != "" {
			t.Errorf("the origin got an upgrade: %s", s)
		}
	}
	w.noSecretOutside(t)
}

// TestRedteamTermUpstreamCert: the upstream is verified for the rule's
// name against the configured roots; any failure is a 502 and the origin
// gets no request (and so no secret).
func TestRedteamTermUpstreamCert(t *testing.T) {
	for _, tc := range []struct {
		name string
		leaf func(t *testing.T) func(certs termCerts) *tls.Certificate
	}{
		{"another name", func(t *testing.T) func(certs termCerts) *tls.Certificate {
			return func(certs termCerts) *tls.Certificate { l, _ := certs.originCA.Leaf("evil.example.net"); return l }
		}},
		{"expired", func(t *testing.T) func(certs termCerts) *tls.Certificate {
			return func(certs termCerts) *tls.Certificate {
				// The trusted origin CA's own files, loaded with a clock
				// three days back: its leaves expired two days ago.
				old, err := tlsca.Load(certs.originDir, tlsca.Options{Now: func() time.Time { return time.Now().Add(-72 * time.Hour) }})
				if err != nil {
					t.Fatal(err)
				}
				l, _ := old.Leaf("api.example.com")
				if !l.Leaf.NotAfter.Before(time.Now()) || !old.Certificate().Equal(certs.originCA.Certificate()) {
					t.Fatalf("the leaf is not an expired one of the trusted CA (not after %s)", l.Leaf.NotAfter)
				}
				return l
			}
		}},
		{"untrusted CA", func(t *testing.T) func(certs termCerts) *tls.Certificate {
			return func(termCerts) *tls.Certificate {
				other, err := tlsca.Load(t.TempDir(), tlsca.Options{})
				if err != nil {
					t.Fatal(err)
				}
				l, _ := other.Leaf("api.example.com")
				return l
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := startRTWorld(t, rtRules, tc.leaf(t))
			got := w.raw1(t, "GET /v1/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n", 1)
			if len(got) != 1 || !strings.HasPrefix(got[0], "502 ") || strings.Contains(got[0], rtSecret) {
				t.Errorf("%q; want 502 without the secret", got)
			}
			if n := len(w.origin.requests()); n != 0 {
				t.Errorf("the origin got %d requests", n)
			}
			w.noSecretOutside(t)
		})
	}
}

// TestRedteamTermUntrustedGuest: a guest that does not trust the vmegress
// CA fails the handshake and nothing is dialled upstream.
func TestRedteamTermUntrustedGuest(t *testing.T) {
	w := startRTWorld(t, rtRules, nil)
	c, err := tls.Dial("tcp4", w.addr, &tls.Config{ServerName: "api.example.com", RootCAs: x509.NewCertPool()})
	if err == nil {
		c.Close()
		t.Fatal("a guest without the vmegress CA completed the handshake")
	}
	// And one that goes on regardless (InsecureSkipVerify) is still only
	// served by the rules; the point is that the refusing one dialled
	// nothing.
	if n := w.origin.accepts.Load(); n != 0 {
		t.Errorf("the origin accepted %d connections for a guest that refused the CA", n)
	}
}

// TestRedteamTermErrorsNoSecret: a secret whose value cannot go in a header
// (a line break) fails the request without showing the value anywhere.
func TestRedteamTermErrorsNoSecret(t *testing.T) {
	certs := newTermCerts(t)
	origin := startRTOrigin(t, certs.originLeaf)
	const bad = "line1-" + rtSecret + "\r\nX-Evil: 1"
	w := rtWorld{termProxy: startTermProxy(t, certs, certs.originRoots, bad, rtRules, origin.addr), origin: origin}
	got := w.raw1(t, "GET /v1/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n", 1)
	got = append(got, w.raw2(t, "api.example.com", rawhttp.H2Request{{":method", "GET"}, {":scheme", "https"}, {":authority", "api.example.com"}, {":path", "/v1/x"}})...)
	for _, g := range got {
		if strings.Contains(g, rtSecret) || strings.HasPrefix(g, "200 ") {
			t.Errorf("a secret with a line break: %q; want a failure without the value", g)
		}
	}
	for _, s := range origin.requests() {
		t.Errorf("the origin got %s", s)
	}
	if l := w.log(); strings.Contains(l, rtSecret) {
		t.Errorf("the access log holds the secret:\n%s", l)
	}
}

// TestRedteamTermBodyOverride: a POST whose form body names another method
// (_method: Rails and Laravel act on it) never reaches the origin whole on
// a rule that limits methods or injects: the guest gets a 403, in any
// encoding, with the name split across reads, after megabytes of body;
// forms without it, and bodies that are not forms, pass whole.
func TestRedteamTermBodyOverride(t *testing.T) {
	w := startRTWorld(t, rtRules, nil)
	post := func(path, ctype, body string, chunked bool) string {
		head := "POST " + path + " HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n"
		if ctype != "" {
			head += "Content-Type: " + ctype + "\r\n"
		}
		if !chunked {
			return head + fmt.Sprintf("Content-Length: %d\r\n\r\n", len(body)) + body
		}
		// Chunks of 7 bytes: the name is split across them.
		head += "Transfer-Encoding: chunked\r\n\r\n"
		for len(body) > 0 {
			n := min(7, len(body))
			head += fmt.Sprintf("%x\r\n%s\r\n", n, body[:n])
			body = body[n:]
		}
		return head + "0\r\n\r\n"
	}
	big := strings.Repeat("a=1&", 1<<18) // 1 MiB before the field
	multipart := "--b\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--b--\r\n"
	for _, tc := range []struct {
		name, path, ctype, body string
		chunked                 bool
	}{
		{"urlencoded", "/v1/chat", "application/x-www-form-urlencoded", "_method=DELETE", false},
		{"no Content-Type", "/v1/chat", "", "a=1&%5F%6Dethod=delete", false},
		{"multipart", "/v1/chat", "multipart/form-data; boundary=b", multipart, false},
		{"split across chunks", "/v1/chat", "application/x-www-form-urlencoded; charset=utf-8", "a=123&_method=PUT", true},
		{"after 1 MiB", "/v1/chat", "application/x-www-form-urlencoded", big + "_method=DELETE", false},
		{"injecting rule", "/open/x", "application/x-www-form-urlencoded", "_method=TRACE", false},
	} {
		got := w.raw1(t, post(tc.path, tc.ctype, tc.body, tc.chunked), 1)
		if len(got) != 1 || !strings.HasPrefix(got[0], "403 ") || !strings.Contains(got[0], "_method field in the form body") {
			t.Errorf("%s: %.200q; want a 403 naming the _method field", tc.name, got)
		}
	}
	// A form without the field, and a JSON body with the text, pass whole.
	whole := []string{"model=x&prompt=hello", `{"_method":"DELETE"}`}
	for i, ctype := range []string{"application/x-www-form-urlencoded", "application/json"} {
		got := w.raw1(t, post("/v1/chat", ctype, whole[i], false), 1)
		if len(got) != 1 || !strings.HasPrefix(got[0], "200 ") {
			t.Errorf("%s %q: %q; want 200", ctype, whole[i], got)
		}
	}
	// (The origin records a request once its body is read: a refused one's
	// read may end after these.)
	for _, b := range whole {
		if !slices.ContainsFunc(w.origin.requests(), func(s rtSeen) bool { return s.body == b && s.bodyErr == nil }) {
			t.Errorf("the origin did not get the body %q whole: %v", b, w.origin.requests())
		}
	}
	time.Sleep(200 * time.Millisecond) // the refused requests' reads end
	for _, s := range w.origin.requests() {
		if s.bodyErr == nil && policy.QueryOverridesMethod(s.body) && !strings.HasPrefix(s.body, "{") {
			t.Errorf("the origin got a whole form body naming another method: %s", s)
		}
	}
}
