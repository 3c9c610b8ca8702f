package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/tlsca"
)

// echoOrigin is an HTTPS origin for api.example.com that answers each
// request with the headers it received, and records the requests.
type echoOrigin struct {
	addr string
	mu   sync.Mutex
	reqs []*http.Request
}

func (o *echoOrigin) requests() []*http.Request {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]*http.Request(nil), o.reqs...)
}

func startEchoOrigin(t testing.TB, cert *tls.Certificate) *echoOrigin {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := &echoOrigin{addr: ln.Addr().String()}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			o.mu.Lock()
			o.reqs = append(o.reqs, r)
			o.mu.Unlock()
			fmt.Fprintf(w, "proto=%s\n", r.Proto)
			for _, v := range r.Header.Values("Authorization") {
				fmt.Fprintf(w, "authorization=%s\n", v)
			}
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{*cert}, NextProtos: []string{"h2", "http/1.1"}},
		ErrorLog:  log.New(io.Discard, "", 0),
	}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return o
}

// termRules are the rules of the proxy's tests, on the listener's port.
const termRules = `      - https: api.example.com
        ports: [%[1]d]
        methods: [GET]
        paths: ["/v1/*"]
        inject: {Authorization: "Bearer ${secret:key}"}
      - https: api.example.com
        ports: [%[1]d]
        methods: [POST]
        paths: [/v1/chat]
      - https: other.example.com
        ports: [%[1]d]
`

const secretValue = "s3cr3t-Value-42"

// termCerts are a termination test's certificates: the vmegress CA the
// proxy signs guests' leaves with (guestCAs trusts it), and an origin's
// CA with its leaf for api.example.com (originRoots trusts it).
type termCerts struct {
	ca          *tlsca.CA
	guestCAs    *x509.CertPool
	originCA    *tlsca.CA
	originDir   string // originCA's files
	originLeaf  *tls.Certificate
	originRoots *x509.CertPool
}

func newTermCerts(t testing.TB) termCerts {
	t.Helper()
	ca, err := tlsca.Load(t.TempDir(), tlsca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	originDir := t.TempDir()
	originCA, err := tlsca.Load(originDir, tlsca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := originCA.Leaf("api.example.com")
	if err != nil {
		t.Fatal(err)
	}
	c := termCerts{ca: ca, guestCAs: x509.NewCertPool(), originCA: originCA, originDir: originDir, originLeaf: leaf, originRoots: x509.NewCertPool()}
	c.guestCAs.AddCert(ca.Certificate())
	c.originRoots.AddCert(originCA.Certificate())
	return c
}

// termProxy is a running terminating proxy: its address, the pool a guest
// trusts it with, and its access log.
type termProxy struct {
	addr     string
	guestCAs *x509.CertPool
	access   *bytes.Buffer
	mu       *sync.Mutex
}

func (w termProxy) log() string { w.mu.Lock(); defer w.mu.Unlock(); return w.access.String() }

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// startTermProxy runs a proxy in front of originAddr that terminates TLS
// with certs.ca, verifies the upstream against upstreamRoots, has secret
// for ${secret:key} (and no other secret), and decides by rules (a format
// taking the listener's port). Its access log is shown if the test fails.
func startTermProxy(t testing.TB, certs termCerts, upstreamRoots *x509.CertPool, secret, rules, originAddr string) termProxy {
	t.Helper()
	var access bytes.Buffer
	mu := &sync.Mutex{}
	p := &Proxy{
		AccessLog: slog.New(slog.NewJSONHandler(lockedWriter{mu, &access}, nil)),
		Termination: &Termination{
			Leaf: certs.ca.Leaf,
			Secret: func(name string) (string, error) {
				if name == "key" {
					return secret, nil
				}
				return "", errors.New("no such secret")
			},
			UpstreamRoots: upstreamRoots,
		},
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.SetPolicy(testPolicy(t, fmt.Sprintf(rules, ln.Addr().(*net.TCPAddr).Port)), false)
	startProxy(t, p, ln, originAddr)
	w := termProxy{addr: ln.Addr().String(), guestCAs: certs.guestCAs, access: &access, mu: mu}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("access log:\n%s", w.log())
		}
	})
	return w
}

type termWorld struct {
	termProxy
	origin *echoOrigin
}

// startTermWorld runs a proxy terminating for api.example.com in front of
// an echo origin; trustOrigin says whether the proxy's upstream roots hold
// the origin's CA.
func startTermWorld(t testing.TB, trustOrigin bool) termWorld {
	t.Helper()
	certs := newTermCerts(t)
	origin := startEchoOrigin(t, certs.originLeaf)
	roots := x509.NewCertPool()
	if trustOrigin {
		roots = certs.originRoots
	}
	return termWorld{termProxy: startTermProxy(t, certs, roots, secretValue, termRules, origin.addr), origin: origin}
}

// client is a guest's HTTPS client that reaches api.example.com at the
// proxy, trusting roots.
func (w termWorld) client(roots *x509.CertPool, h2 bool) *http.Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp4", w.addr)
		},
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		ForceAttemptHTTP2: h2,
	}
	if !h2 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func do(t *testing.T, c *http.Client, method, url string, hdr ...string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err) // the access log is in the world
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestTerminateRules(t *testing.T) {
	w := startTermWorld(t, true)
	for _, h2 := range []bool{false, true} {
		c := w.client(w.guestCAs, h2)
		// Allowed, injecting: the guest's own Authorization is replaced.
		st, body := do(t, c, "GET", "https://api.example.com/v1/models?key=qs", "Authorization", "Bearer guest-token")
		if st != 200 || !strings.Contains(body, "authorization=Bearer "+secretValue+"\n") || strings.Contains(body, "guest-token") {
			t.Errorf("h2 %v: GET /v1/models: %d %q; want the injected header only", h2, st, body)
		}
		if !strings.Contains(body, "proto=HTTP/2.0") {
			t.Errorf("upstream %q; want HTTP/2 (ALPN) upstream", body)
		}
		resp, err := c.Get("https://api.example.com/v1/x")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if want := map[bool]int{false: 1, true: 2}[h2]; resp.ProtoMajor != want {
			t.Errorf("guest side spoke HTTP/%d; want %d", resp.ProtoMajor, want)
		}
		// Allowed by a rule that injects nothing: nothing is injected.
		st, body = do(t, c, "POST", "https://api.example.com/v1/chat")
		if st != 200 || strings.Contains(body, secretValue) {
			t.Errorf("POST /v1/chat: %d %q; want no injected header", st, body)
		}
	}
	c := w.client(w.guestCAs, false)
	before := len(w.origin.requests())
	for _, tc := range []struct{ method, url, reason string }{
		{"DELETE", "https://api.example.com/v1/models", "method DELETE not allowed for api.example.com"},
		{"GET", "https://api.example.com/admin", "path /admin not allowed for api.example.com"},
		{"GET", "https://api.example.com/v1/%2e%2e/admin", ". or .. segment"},
		{"POST", "https://api.example.com/v1/models", "path /v1/models not allowed"},
	} {
		st, body := do(t, c, tc.method, tc.url, "Authorization", "Bearer guest")
		if st != http.StatusForbidden || !strings.Contains(body, "project alpha") || !strings.Contains(body, tc.reason) {
			t.Errorf("%s %s: %d %q; want 403 naming the project and %q", tc.method, tc.url, st, body, tc.reason)
		}
	}
	if n := len(w.origin.requests()) - before; n != 0 {
		t.Errorf("the origin saw %d refused requests", n)
	}
	log := w.log()
	if strings.Contains(log, secretValue) {
		t.Errorf("the access log holds the secret:\n%s", log)
	}
	for _, want := range []string{`"msg":"request"`, `"method":"DELETE"`, `"path":"/v1/models","verdict":"allow"`, `"verdict":"deny"`, `methods GET paths /v1/* inject Authorization"`} {
		if !strings.Contains(log, want) {
			t.Errorf("access log lacks %s:\n%s", want, log)
		}
	}
	if strings.Contains(log, "key=qs") {
		t.Errorf("the access log holds a query string:\n%s", log)
	}
}

func TestTerminateUntrusted(t *testing.T) {
	// An origin whose certificate the proxy does not trust: 502, and no
	// request reaches it.
	w := startTermWorld(t, false)
	st, body := do(t, w.client(w.guestCAs, false), "GET", "https://api.example.com/v1/models")
	if st != http.StatusBadGateway || !strings.Contains(body, "certificate") {
		t.Errorf("untrusted origin: %d %q; want 502 about its certificate", st, body)
	}
	if n := len(w.origin.requests()); n != 0 {
		t.Errorf("the untrusted origin got %d requests", n)
	}
	if l := w.log(); !strings.Contains(l, `"msg":"request"`) || !strings.Contains(l, `"verdict":"error"`) ||
		!strings.Contains(l, `"reason":"upstream: tls: failed to verify certificate`) || !strings.Contains(l, `"status":502`) {
		t.Errorf("the request's log line does not say the upstream failed:\n%s", l)
	}
	if strings.Contains(w.log(), secretValue) {
		t.Errorf("the access log holds the secret:\n%s", w.log())
	}
	// A guest that does not trust the vmegress CA: a TLS failure.
	_, err := w.client(x509.NewCertPool(), false).Get("https://api.example.com/v1/models")
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("guest without the CA: %v; want a certificate error", err)
	}
}

// TestRequestRulesPlainHTTP: an http rule with methods is decided request
// by request on one kept-alive connection; a refused request never reaches
// the origin.
func TestRequestRulesPlainHTTP(t *testing.T) {
	var mu sync.Mutex
	var seen []string
	origin, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Method+" "+r.URL.Path+r.Header.Get("Upgrade"))
		mu.Unlock()
		io.WriteString(w, "ok\n")
	})}
	go srv.Serve(origin)
	t.Cleanup(func() { srv.Close() })
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{Termination: &Termination{}}
	p.SetPolicy(testPolicy(t, fmt.Sprintf("      - http: deb.debian.org\n        ports: [%d]\n        methods: [GET]\n        paths: [\"/debian/*\"]\n", ln.Addr().(*net.TCPAddr).Port)), false)
	startProxy(t, p, ln, origin.Addr().String())
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp4", ln.Addr().String())
		},
		MaxConnsPerHost: 1, // one connection: every request after the first is on it
	}}
	if st, _ := do(t, c, "GET", "http://deb.debian.org/debian/dists"); st != 200 {
		t.Errorf("GET /debian/dists: %d", st)
	}
	if st, body := do(t, c, "POST", "http://deb.debian.org/debian/dists"); st != http.StatusForbidden || !strings.Contains(body, "method POST not allowed") {
		t.Errorf("POST: %d %q", st, body)
	}
	if st, _ := do(t, c, "GET", "http://deb.debian.org/other"); st != http.StatusForbidden {
		t.Errorf("GET /other: %d", st)
	}
	// An upgrade to h2c is not passed on: its streams would go unchecked.
	do(t, c, "GET", "http://deb.debian.org/debian/h2c", "Connection", "Upgrade, HTTP2-Settings", "Upgrade", "h2c", "HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA")
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 || seen[0] != "GET /debian/dists" || seen[1] != "GET /debian/h2c" {
		t.Errorf("the origin saw %q; want only the allowed request", seen)
	}
}

// TestTerminateWebSocket: an allowed upgrade request is answered by the
// origin's 101 and the bytes then flow both ways; a refused one never
// reaches it.
func TestTerminateWebSocket(t *testing.T) {
	certs := newTermCerts(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var upgrades sync.Map
	origin := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			upgrades.Store(r.URL.Path, r.Header.Get("Authorization"))
			c, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			defer c.Close()
			io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
			line, _ := brw.ReadString('\n')
			io.WriteString(c, "echo "+line)
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{*certs.originLeaf}},
		ErrorLog:  log.New(io.Discard, "", 0),
	}
	go origin.ServeTLS(ln, "", "")
	t.Cleanup(func() { origin.Close() })
	pl, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{Termination: &Termination{Leaf: certs.ca.Leaf, UpstreamRoots: certs.originRoots,
		Secret: func(string) (string, error) { return secretValue, nil }}}
	p.SetPolicy(testPolicy(t, fmt.Sprintf("      - https: api.example.com\n        ports: [%d]\n        paths: [/ws]\n        inject: {Authorization: \"${secret:k}\"}\n", pl.Addr().(*net.TCPAddr).Port)), false)
	startProxy(t, p, pl, ln.Addr().String())
	ws := func(path string) string {
		c, err := tls.Dial("tcp4", pl.Addr().String(), &tls.Config{ServerName: "api.example.com", RootCAs: certs.guestCAs, NextProtos: []string{"http/1.1"}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: api.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", path)
		// As WebSocket clients do, the first frame waits for the 101
		// (net/http's reverse proxy drops bytes sent before it).
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		head := resp.Status
		if resp.StatusCode != http.StatusSwitchingProtocols {
			return head
		}
		io.WriteString(c, "hello\n")
		rest, _ := io.ReadAll(br)
		return head + "|" + string(rest)
	}
	if got := ws("/ws"); got != "101 Switching Protocols|echo hello\n" {
		t.Errorf("allowed upgrade: %q", got)
	}
	if v, _ := upgrades.Load("/ws"); v != secretValue {
		t.Errorf("the upgrade request carried Authorization %q; want the injected one", v)
	}
	if got := ws("/other"); got != "403 Forbidden" {
		t.Errorf("refused upgrade: %q", got)
	}
	if _, ok := upgrades.Load("/other"); ok {
		t.Error("the refused upgrade reached the origin")
	}
}

// anySession is a client session cache that offers its one session for
// every name: what a guest playing tricks with tickets would do.
type anySession struct {
	mu sync.Mutex
	cs *tls.ClientSessionState
}

func (a *anySession) Get(string) (*tls.ClientSessionState, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.cs, a.cs != nil
}

func (a *anySession) Put(_ string, cs *tls.ClientSessionState) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if cs != nil {
		a.cs = cs
	}
}

// TestTerminateResumption: a guest that resumes its TLS session with the
// proxy skips the full handshake, and a session resumes only for the
// server name it was made for (a ticket of api.example.com offered for
// other.example.com gets a full handshake, with other.example.com's
// certificate).
func TestTerminateResumption(t *testing.T) {
	w := startTermWorld(t, true)
	cache := &anySession{}
	handshake := func(name string, verify bool) tls.ConnectionState {
		t.Helper()
		raw, err := net.Dial("tcp4", w.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		raw.SetDeadline(time.Now().Add(10 * time.Second)) // a hang fails, not blocks
		c := tls.Client(raw, &tls.Config{ServerName: name, RootCAs: w.guestCAs, ClientSessionCache: cache,
			InsecureSkipVerify: !verify, NextProtos: []string{"http/1.1"}})
		// A request, so that the session ticket (sent after the
		// handshake in TLS 1.3) is read.
		fmt.Fprintf(c, "GET /v1/models HTTP/1.1\r\nHost: %s\r\n\r\n", name)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return c.ConnectionState()
	}
	if cs := handshake("api.example.com", true); cs.DidResume {
		t.Fatal("first connection resumed a session")
	}
	if cs := handshake("api.example.com", true); !cs.DidResume {
		t.Error("second connection to the same name did not resume")
	}
	cs := handshake("other.example.com", false)
	if cs.DidResume {
		t.Error("a session of api.example.com resumed for other.example.com")
	}
	if len(cs.PeerCertificates) == 0 || cs.PeerCertificates[0].VerifyHostname("other.example.com") != nil {
		t.Error("other.example.com was not shown its own certificate")
	}
}

// BenchmarkTerminateKeepAlive: requests through an https rule on one
// kept-alive HTTP/1.1 guest connection (handshakes excluded).
func BenchmarkTerminateKeepAlive(b *testing.B) {
	w := startTermWorld(b, true)
	c := w.client(w.guestCAs, false)
	get := func() {
		resp, err := c.Get("https://api.example.com/v1/models")
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	get() // the connection and the upstream pool are set up
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		get()
	}
}

// BenchmarkTerminateNewConn: one request per new guest TLS connection.
func BenchmarkTerminateNewConn(b *testing.B) {
	w := startTermWorld(b, true)
	c := w.client(w.guestCAs, false)
	c.Transport.(*http.Transport).DisableKeepAlives = true
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		resp, err := c.Get("https://api.example.com/v1/models")
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}

// TestTerminateStreams: a response's parts reach the guest while the
// origin waits for the guest to have read them (it goes on only when told):
// a head whose known-length body the origin holds back, and the events of
// a server-sent event stream. Held in the proxy's buffers, they would not
// arrive and the test would fail at its read deadline.
func TestTerminateStreams(t *testing.T) {
	certs := newTermCerts(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	next := make(chan struct{}) // the guest read what came so far
	origin := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			rc := http.NewResponseController(w)
			switch r.URL.Path {
			case "/head":
				w.Header().Set("Content-Length", "5")
				w.WriteHeader(http.StatusOK)
				rc.Flush()
				<-next
				io.WriteString(w, "body\n")
			case "/events":
				w.Header().Set("Content-Type", "text/event-stream")
				for i := range 3 {
					fmt.Fprintf(w, "data: %d\n\n", i)
					rc.Flush()
					<-next
				}
			}
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{*certs.originLeaf}},
		ErrorLog:  log.New(io.Discard, "", 0),
	}
	go origin.ServeTLS(ln, "", "")
	t.Cleanup(func() { origin.Close() })
	pl, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{Termination: &Termination{Leaf: certs.ca.Leaf, UpstreamRoots: certs.originRoots}}
	p.SetPolicy(testPolicy(t, fmt.Sprintf("      - https: api.example.com\n        ports: [%d]\n", pl.Addr().(*net.TCPAddr).Port)), false)
	startProxy(t, p, pl, ln.Addr().String())
	get := func(path string) (*bufio.Reader, *http.Response) {
		c, err := tls.Dial("tcp4", pl.Addr().String(), &tls.Config{ServerName: "api.example.com", RootCAs: certs.guestCAs, NextProtos: []string{"http/1.1"}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		// Not a measure of time: what never arrives fails the test
		// instead of hanging it.
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: api.example.com\r\n\r\n", path)
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: reading the head: %v", path, err)
		}
		return br, resp
	}

	_, resp := get("/head")
	next <- struct{}{}
	if b, err := io.ReadAll(resp.Body); err != nil || string(b) != "body\n" {
		t.Errorf("/head: body %q, %v", b, err)
	}

	_, resp = get("/events")
	sc := bufio.NewReader(resp.Body)
	for i := range 3 {
		line, err := sc.ReadString('\n')
		if want := fmt.Sprintf("data: %d\n", i); err != nil || line != want {
			t.Fatalf("/events: %q, %v; want %q", line, err, want)
		}
		sc.ReadString('\n') // the event's blank line
		next <- struct{}{}
	}
}

// stallConn passes its first write (the ClientHello) and swallows the
// rest: a guest whose handshake stops halfway.
type stallConn struct {
	net.Conn
	writes int
}

func (c *stallConn) Write(b []byte) (int, error) {
	if c.writes++; c.writes > 1 {
		return len(b), nil
	}
	return c.Conn.Write(b)
}

// TestTerminateHandshakeStalls: a guest that stops in the middle of the
// TLS handshake is closed once the hello timeout is over, and logged.
func TestTerminateHandshakeStalls(t *testing.T) {
	ca, _ := tlsca.Load(t.TempDir(), tlsca.Options{})
	pl, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var access bytes.Buffer
	p := &Proxy{Termination: &Termination{Leaf: ca.Leaf}, HelloTimeout: 50 * time.Millisecond,
		AccessLog: slog.New(slog.NewJSONHandler(lockedWriter{&mu, &access}, nil))}
	p.SetPolicy(testPolicy(t, fmt.Sprintf("      - https: api.example.com\n        ports: [%d]\n", pl.Addr().(*net.TCPAddr).Port)), false)
	startProxy(t, p, pl, "127.0.0.1:1") // nothing is ever dialled
	raw, err := net.Dial("tcp4", pl.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	// Not a measure of time: a connection never closed fails the test
	// instead of hanging it.
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	roots := x509.NewCertPool()
	roots.AddCert(ca.Certificate())
	c := tls.Client(&stallConn{Conn: raw}, &tls.Config{ServerName: "api.example.com", RootCAs: roots})
	c.Handshake() // done on the guest's side: its Finished was swallowed
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read on a stalled handshake: %v; want the proxy to close the connection", err)
	}
	giveUp := time.Now().Add(10 * time.Second) // as above: never hang
	for {
		mu.Lock()
		log := access.String()
		mu.Unlock()
		if strings.Contains(log, "TLS handshake with the guest failed") {
			break
		}
		if time.Now().After(giveUp) {
			t.Fatalf("no log line for the stalled handshake:\n%s", log)
		}
		time.Sleep(10 * time.Millisecond) // the line is written after the close
	}
}
