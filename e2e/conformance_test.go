package e2e

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// The conformance suite (issue 11): the same connection gets the same
// verdict from the suite's data plane, as a real connection from a guest,
// and from `vmegress policy explain --json` over the same config. Each case
// also names the verdict the config means, so the two cannot agree on a
// wrong answer unnoticed.

// conformConfig holds every project of the main table. No sni rule names
// port 22: on Envoy, the TLS inspector would wait on it for a ClientHello
// (README), and the banner service there speaks first.
const conformConfig = `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: github.com           # the apex only, port 443
      - sni: "*.com"              # any depth, TLS on 8443
        ports: [8443]
      - sni: github.com           # 8080 has both kinds: the first byte tells
        ports: [8080]
      - http: example.com
        ports: [8080]
      - http: www.github.com      # port 80
      - cidr: 198.18.1.22/32      # the server-first banner service
        ports: [22]
      - cidr: 198.18.1.12/32      # example.com's address, uninspected
        ports: [9000]
  beta:
    subnet: 172.31.0.4/30
    allow:
      - sni: "*.github.com"       # subdomains, not the apex
      - http: "*.com"
      - cidr: 198.18.1.0/24
        ports: [9000]
  gamma:
    subnet: 172.31.0.8/30
`

// conformAuditConfig is the audit table's: mode audit is builtin-only.
const conformAuditConfig = `projects:
  watch:
    subnet: 172.31.0.12/30
    mode: audit
    allow:
      - sni: github.com
        ports: [443, 8443]
`

// conformPorts are the ports the suite's own servers listen on (on
// github.com's, www.github.com's, example.com's and the banner's
// addresses): each answers TLS (any name) or plain HTTP, told by the first
// byte, and anything else with a line of its own.
var conformPorts = []int{8080, 8443, 9000, 9443}

// conformCase is one connection.
type conformCase struct {
	name    string
	project string
	dst     netip.Addr
	port    uint16
	bytes   string // tls, http, raw, none (as policy.Bytes)
	sni     string // TLS server name or HTTP Host ("": none)
	want    string // the verdict the config means
}

var (
	ghIP   = world.GitHubIP
	wwwIP  = world.WWWGitHubIP
	exIP   = world.ExampleIP
	bannIP = world.BannerIP
)

var conformCases = []conformCase{
	// Exact names, default ports, kinds on the wrong port.
	{"apex exact", "alpha", ghIP, 443, "tls", "github.com", "allow"},
	{"exact rule is not a wildcard", "alpha", wwwIP, 443, "tls", "www.github.com", "deny"},
	{"name without rule", "alpha", exIP, 443, "tls", "example.com", "deny"},
	{"TLS without SNI", "alpha", ghIP, 443, "tls", "", "deny"},
	{"http exact", "alpha", wwwIP, 80, "http", "www.github.com", "allow"},
	{"http other name", "alpha", ghIP, 80, "http", "github.com", "deny"},
	{"TLS on an http port", "alpha", ghIP, 80, "tls", "github.com", "deny"},
	{"HTTP on a TLS port", "alpha", ghIP, 443, "http", "github.com", "deny"},
	{"raw bytes on a TLS port", "alpha", ghIP, 443, "raw", "", "deny"},
	{"raw bytes on an http port", "alpha", wwwIP, 80, "raw", "", "deny"},
	{"nothing on a TLS port", "alpha", ghIP, 443, "none", "", "deny"},
	// The port with an sni and an http rule (issue 11).
	{"sni+http port: HTTP to the http name", "alpha", exIP, 8080, "http", "example.com", "allow"},
	{"sni+http port: TLS to the sni name", "alpha", ghIP, 8080, "tls", "github.com", "allow"},
	{"sni+http port: HTTP to the sni name", "alpha", ghIP, 8080, "http", "github.com", "deny"},
	{"sni+http port: TLS to the http name", "alpha", exIP, 8080, "tls", "example.com", "deny"},
	{"sni+http port: TLS without SNI", "alpha", ghIP, 8080, "tls", "", "deny"},
	{"sni+http port: raw bytes", "alpha", exIP, 8080, "raw", "", "deny"},
	// Wildcard depth.
	{"*.com, depth 1", "alpha", ghIP, 8443, "tls", "github.com", "allow"},
	{"*.com, depth 2", "alpha", wwwIP, 8443, "tls", "www.github.com", "allow"},
	{"*.com, another name", "alpha", exIP, 8443, "tls", "example.com", "allow"},
	{"*.com is TLS only", "alpha", exIP, 8443, "http", "example.com", "deny"},
	// Ports no rule names.
	{"port not named (apex)", "alpha", ghIP, 9443, "tls", "github.com", "deny"},
	{"port not named (wildcard)", "alpha", wwwIP, 9443, "tls", "www.github.com", "deny"},
	{"port not named, http", "alpha", exIP, 9443, "http", "example.com", "deny"},
	// cidr rules: no inspection, ports always named.
	{"cidr: server first", "alpha", bannIP, 22, "none", "", "allow"},
	{"cidr: raw bytes", "alpha", bannIP, 22, "raw", "", "allow"},
	{"cidr: another port of the address", "alpha", bannIP, 9000, "raw", "", "deny"},
	{"cidr: raw bytes on 9000", "alpha", exIP, 9000, "raw", "", "allow"},
	{"cidr: TLS is not inspected", "alpha", exIP, 9000, "tls", "example.com", "allow"},
	{"cidr: HTTP is not inspected", "alpha", exIP, 9000, "http", "not-allowed.test", "allow"},
	{"cidr: another address", "alpha", ghIP, 9000, "raw", "", "deny"},
	// Another project's rules never apply.
	{"wildcard: subdomain", "beta", wwwIP, 443, "tls", "www.github.com", "allow"},
	{"wildcard: not the apex", "beta", ghIP, 443, "tls", "github.com", "deny"},
	{"http wildcard depth 2", "beta", wwwIP, 80, "http", "www.github.com", "allow"},
	{"http wildcard depth 1", "beta", ghIP, 80, "http", "github.com", "allow"},
	{"http wildcard, another name", "beta", exIP, 80, "http", "example.com", "allow"},
	{"http name decides, not the address", "beta", exIP, 80, "http", "www.github.com", "allow"},
	{"alpha's sni+http port is not beta's (TLS)", "beta", ghIP, 8080, "tls", "github.com", "deny"},
	{"alpha's sni+http port is not beta's (HTTP)", "beta", exIP, 8080, "http", "example.com", "deny"},
	{"alpha's cidr is not beta's", "beta", bannIP, 22, "none", "", "deny"},
	{"wider cidr", "beta", ghIP, 9000, "raw", "", "allow"},
	{"wider cidr, TLS", "beta", wwwIP, 9000, "tls", "www.github.com", "allow"},
	{"wider cidr, server first", "beta", bannIP, 9000, "none", "", "allow"},
	{"TLS without SNI under a wildcard", "beta", wwwIP, 443, "tls", "", "deny"},
	// A project without rules.
	{"no rules: TLS", "gamma", ghIP, 443, "tls", "github.com", "deny"},
	{"no rules: server first", "gamma", bannIP, 22, "none", "", "deny"},
}

var conformAuditCases = []conformCase{
	{"audit: allowed", "watch", ghIP, 443, "tls", "github.com", "allow"},
	{"audit: allowed on another port", "watch", ghIP, 8443, "tls", "github.com", "allow"},
	{"audit: name without rule", "watch", exIP, 443, "tls", "example.com", "would_deny"},
	{"audit: TLS without SNI", "watch", ghIP, 443, "tls", "", "would_deny"},
	{"audit: HTTP on a port without rules", "watch", exIP, 80, "http", "example.com", "would_deny"},
	{"audit: raw bytes on a TLS port", "watch", ghIP, 8443, "raw", "", "would_deny"},
	{"audit: raw bytes on a port without rules", "watch", exIP, 9000, "raw", "", "would_deny"},
	{"audit: server first", "watch", bannIP, 22, "none", "", "would_deny"},
}

// TestConformance runs every case as a real connection on the suite's data
// plane and through explain, and wants the same verdict from both.
func TestConformance(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{
		{Project: "alpha", Subnet: alphaSubnet},
		{Project: "beta", Subnet: netip.MustParsePrefix("172.31.0.4/30")},
		{Project: "gamma", Subnet: netip.MustParsePrefix("172.31.0.8/30")},
	}, conformConfig)
	startConformServers(t, e.w)
	e.start()
	runConformance(t, e, conformCases)
}

// TestConformanceAudit is the audit project's table. Envoy refuses mode
// audit at load (README), so on Envoy the test checks that refusal.
func TestConformanceAudit(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{{Project: "watch", Subnet: netip.MustParsePrefix("172.31.0.12/30")}}, conformAuditConfig)
	if onEnvoy() {
		if _, err := e.w.StartDaemon(e.ctx, binary, e.cfg); err == nil || !strings.Contains(err.Error(), "mode audit needs dataplane builtin") {
			t.Errorf("audit with Envoy: %v; want the config refused", err)
		}
		return
	}
	startConformServers(t, e.w)
	e.start()
	runConformance(t, e, conformAuditCases)
}

func runConformance(t *testing.T, e *env, cases []conformCase) {
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			explained, explainedRule := e.explainVerdict(t, tc)
			real, realRule := e.realVerdict(t, tc)
			if !onEnvoy() && realRule != explainedRule {
				// Envoy's log names the chain, not the rule (README).
				t.Errorf("rule: data plane %q, explain %q", realRule, explainedRule)
			}
			if real != explained || real != tc.want {
				t.Errorf("%s %s:%d as %s (name %q): data plane %s, explain %s; the config means %s",
					tc.project, tc.dst, tc.port, tc.bytes, tc.sni, real, explained, tc.want)
			}
		})
	}
}

// explainVerdict asks `vmegress policy explain --json` about tc.
func (e *env) explainVerdict(t *testing.T, tc conformCase) (verdict, rule string) {
	t.Helper()
	hp := net.JoinHostPort(tc.dst.String(), fmt.Sprint(tc.port))
	args := []string{"--config", e.cfg, "policy", "explain", tc.project}
	if tc.sni != "" {
		args = append(args, net.JoinHostPort(tc.sni, fmt.Sprint(tc.port)), "--addr", tc.dst.String())
	} else {
		args = append(args, hp)
	}
	out, err := e.vmegress(append(args, "--as", tc.bytes, "--json")...)
	if err != nil {
		t.Fatalf("explain %v: %v", args, err)
	}
	var got struct{ Verdict, Rule, Reason, As, Inspect, Project string }
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("explain %v: output is not one JSON object: %v\n%s", args, err, out)
	}
	t.Logf("explain: %s", strings.TrimSpace(out))
	return got.Verdict, got.Rule
}

// conformMarkers are what only the fake internet's servers send back.
var conformMarkers = []string{"hello from ", "conform-ok", world.Banner}

// realVerdict makes tc's connection from its project's guest and returns
// the access log's verdict for it, checked against what the client saw:
// bytes from the server for allow and would_deny, none for deny.
// A connection refused at SYN has no log line: its verdict is deny.
func (e *env) realVerdict(t *testing.T, tc conformCase) (verdict, rule string) {
	t.Helper()
	g := e.w.Guest(tc.project)
	src, got, err := conformDial(g.NS, netip.AddrPortFrom(tc.dst, tc.port), tc.bytes, tc.sni)
	if src == "" {
		// Ports no rule of the project names are refused at SYN by the
		// kernel (no access-log line): that is a denial.
		if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) {
			t.Logf("refused at connect: %v", err)
			return "deny", ""
		}
		t.Fatalf("connecting from %s: %v", g.NS, err)
	}
	reached := hasMarker(got)
	// By source and destination: the guest's source port may be one an
	// earlier case's connection (to another destination) had.
	dst := netip.AddrPortFrom(tc.dst, tc.port).String()
	line, ok := e.d.WaitAccessLog(10*time.Second, func(m map[string]any) bool { return m["src"] == src && m["dst"] == dst })
	if !ok {
		t.Fatalf("no access-log line for %s (client saw %q, %v); log:\n%s", src, got, err, e.d.RawAccessLog())
	}
	verdict, rule = fmt.Sprint(line["verdict"]), fmt.Sprint(line["rule"])
	t.Logf("access log: verdict %s, rule %v, reason %v; client saw %q (%v)", verdict, line["rule"], line["reason"], got, err)
	switch {
	case verdict == "deny" && reached:
		t.Errorf("the log says deny, but the server answered: %q", got)
	case (verdict == "allow" || verdict == "would_deny") && !reached:
		t.Errorf("the log says %s, but the server never answered (client saw %q, %v)", verdict, got, err)
	}
	return verdict, rule
}

// conformDial connects from namespace ns to dst, sends what kind says and
// reads what comes back (until a server's marker, the end, or a bound). It
// returns the client's address as the data plane sees it.
func conformDial(ns string, dst netip.AddrPort, kind, name string) (src, got string, err error) {
	var c net.Conn
	if err := world.InNS(ns, func() error {
		var err error
		c, err = net.DialTimeout("tcp4", dst.String(), 5*time.Second)
		return err
	}); err != nil {
		return "", "", err
	}
	defer c.Close()
	src = c.LocalAddr().String()
	// A bound on the whole exchange, not an expectation of speed.
	c.SetDeadline(time.Now().Add(10 * time.Second))
	host := name
	if host == "" {
		host = dst.Addr().String()
	}
	request := "GET / HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n\r\n"
	var r io.Reader = c
	switch kind {
	case "tls":
		tc := tls.Client(c, &tls.Config{ServerName: name, InsecureSkipVerify: true}) // an empty name sends no SNI
		if err := tc.Handshake(); err != nil {
			return src, "", fmt.Errorf("TLS handshake: %w", err)
		}
		if _, err := io.WriteString(tc, request); err != nil {
			return src, "", err
		}
		r = tc
	case "http":
		if _, err := io.WriteString(c, request); err != nil {
			return src, "", err
		}
	case "raw":
		if _, err := io.WriteString(c, "SSH-2.0-conformance\r\n"); err != nil {
			return src, "", err
		}
	case "none":
		// Wait for the server to speak; if nothing comes (a data plane
		// waiting for a ClientHello), end the client's side: a client that
		// never sends is then seen as one.
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		b := make([]byte, 512)
		n, rerr := c.Read(b)
		if n > 0 || !isTimeout(rerr) {
			got := string(b[:n])
			if rerr != nil || hasMarker(got) {
				return src, got, rerr
			}
			more, err := readMarker(c)
			return src, got + more, err
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		c.(*net.TCPConn).CloseWrite()
	}
	got, err = readMarker(r)
	return src, got, err
}

func isTimeout(err error) bool {
	var ne net.Error
	return err != nil && errors.As(err, &ne) && ne.Timeout()
}

func hasMarker(s string) bool {
	for _, m := range conformMarkers {
		if strings.Contains(s, m) {
			return true
		}
	}
	return false
}

// readMarker reads until a server's marker shows, the end, or an error.
func readMarker(r io.Reader) (string, error) {
	var buf bytes.Buffer
	b := make([]byte, 4096)
	for {
		n, err := r.Read(b)
		buf.Write(b[:n])
		if hasMarker(buf.String()) {
			return buf.String(), nil
		}
		if err != nil {
			if err == io.EOF {
				err = nil
			}
			return buf.String(), err
		}
	}
}

// startConformServers listens on conformPorts of the fake internet's
// named addresses. Each connection: TLS (a self-signed certificate for any
// name) if the first byte is 0x16; then an HTTP request is answered 200
// with "conform-ok" and what was asked; other bytes get a "conform-ok raw"
// line. On the banner's address they speak first, with its banner.
func startConformServers(t *testing.T, w *world.World) {
	t.Helper()
	cert := selfSigned(t)
	for _, ip := range []netip.Addr{ghIP, wwwIP, exIP, bannIP} {
		for _, port := range conformPorts {
			addr := net.JoinHostPort(ip.String(), fmt.Sprint(port))
			ln, err := world.ListenIn(w.Inet, "tcp4", addr)
			if err != nil {
				t.Fatalf("starting the conformance server on %s: %v", addr, err)
			}
			var wg sync.WaitGroup
			t.Cleanup(func() { ln.Close(); wg.Wait() })
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					wg.Add(1)
					go func() { defer wg.Done(); serveConform(c, cert, addr, ip == bannIP) }()
				}
			}()
		}
	}
}

func serveConform(c net.Conn, cert tls.Certificate, addr string, serverFirst bool) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if serverFirst {
		io.WriteString(c, world.Banner)
	}
	br := bufio.NewReader(c)
	first, err := br.Peek(1)
	if err != nil {
		return
	}
	var rw io.ReadWriter = struct {
		io.Reader
		io.Writer
	}{br, c}
	how := "plain"
	if first[0] == 0x16 {
		tc := tls.Server(&peekedConn{Conn: c, r: br}, &tls.Config{Certificates: []tls.Certificate{cert}})
		if err := tc.Handshake(); err != nil {
			return
		}
		how = "tls sni=" + tc.ConnectionState().ServerName
		rw, br = tc, bufio.NewReader(tc)
	}
	req, err := http.ReadRequest(br)
	if err != nil {
		fmt.Fprintf(rw, "conform-ok raw on %s\n", addr)
		return
	}
	body := fmt.Sprintf("conform-ok %s http host=%s on %s\n", how, req.Host, addr)
	fmt.Fprintf(rw, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
}

// peekedConn is a conn whose first bytes sit in a bufio.Reader.
type peekedConn struct {
	net.Conn
	r *bufio.Reader
}

func (p *peekedConn) Read(b []byte) (int, error) { return p.r.Read(b) }

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "conformance"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
