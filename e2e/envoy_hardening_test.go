package e2e

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/nettest"
	"github.com/vmegress/vmegress/internal/world"
)

// inetServer is an HTTP server in the fake internet that answers with the
// port it listens on and the Host it was asked for, and remembers every
// request it read.
type inetServer struct {
	mu   sync.Mutex
	reqs []string // "HOST PATH" per request read
}

// seen returns the requests read so far.
func (s *inetServer) seen() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.reqs...)
}

// serveInet starts an inetServer on addr (ip:port) in the fake internet;
// with tlsName set it speaks TLS with a self-signed certificate for that
// name (clients use -k: the test is about where a connection goes, not
// about certificates). It stops when the test ends.
func (e *env) serveInet(addr, tlsName string) *inetServer {
	e.t.Helper()
	ln, err := world.ListenIn(e.w.Inet, "tcp4", addr)
	if err != nil {
		e.t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(addr)
	s := &inetServer{}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			s.mu.Lock()
			s.reqs = append(s.reqs, r.Host+" "+r.URL.Path)
			s.mu.Unlock()
			fmt.Fprintf(rw, "port %s, host %s\n", port, r.Host)
		}),
		ReadHeaderTimeout: 5 * time.Second,
	}
	if tlsName != "" {
		srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{selfSignedFor(e.t, tlsName)}}
		ln = tls.NewListener(ln, srv.TLSConfig)
	}
	go srv.Serve(ln)
	e.t.Cleanup(func() { srv.Close() })
	return s
}

// selfSigned is a throwaway certificate for name.
func selfSignedFor(t *testing.T, name string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestSNIAndHTTPOnOnePort: a port with an sni rule and an http rule (issue
// 11): TLS goes by its server name, plain HTTP by its Host, on both planes
// (on Envoy the TLS inspector's verdict picks the chain).
func TestSNIAndHTTPOnOnePort(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: github.com
        ports: [8080]
      - http: www.github.com
        ports: [8080]
`)
	tlsSrv := e.serveInet(world.GitHubIP.String()+":8080", "github.com")
	httpSrv := e.serveInet(world.WWWGitHubIP.String()+":8080", "")
	e.start()

	// Plain HTTP for the http rule's name: allowed.
	if out, err := e.curlAt("http://www.github.com:8080/plain", world.WWWGitHubIP.String()); err != nil || !strings.HasPrefix(out, "port 8080, host www.github.com") {
		t.Errorf("plain HTTP to www.github.com:8080: %q, %v; want the 8080 server", out, err)
	}
	// TLS for the sni rule's name: allowed.
	if out, err := e.curlAt("https://github.com:8080/tls", world.GitHubIP.String(), "-k"); err != nil || !strings.HasPrefix(out, "port 8080, host github.com") {
		t.Errorf("TLS to github.com:8080: %q, %v", out, err)
	}
	// Each name in the other kind: refused.
	if out, err := e.curlAt("http://github.com:8080/wrongkind", world.GitHubIP.String(), "-w", "\n%{http_code}"); err == nil && !strings.HasSuffix(out, "\n403") {
		t.Errorf("plain HTTP to github.com:8080: %q; want refused", out)
	}
	if out, err := e.curlAt("https://www.github.com:8080/wrongkind", world.WWWGitHubIP.String(), "-k"); err == nil {
		t.Errorf("TLS to www.github.com:8080: %q; want refused", out)
	}
	for _, r := range append(tlsSrv.seen(), httpSrv.seen()...) {
		if strings.HasSuffix(r, "/wrongkind") {
			t.Errorf("a refused request reached a server: %s", r)
		}
	}
	if got := tlsSrv.seen(); len(got) != 1 || got[0] != "github.com:8080 /tls" {
		t.Errorf("the TLS server read %q; want the one TLS request", got)
	}
	e.noLeaks()
}

// TestNoSearchDomains: the host's resolv.conf has a search domain (with
// ndots:5) whose zone answers every name with the attacker's address
// (issue 12, item 2). Names are resolved as they are, on both planes: the
// guest reaches www.github.com and the attacker sees nothing.
func TestNoSearchDomains(t *testing.T) {
	t.Parallel()
	nettest.Privileged(t, "curl", "dig", "ping")
	w, err := world.New(context.Background(), world.Options{Prefix: "vmegs", Search: "corp.test",
		Guests: []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	cfg, err := w.WriteConfig("config.yaml", withSuite(baseConfig))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	e := &env{t: t, ctx: ctx, w: w, cfg: cfg, g: w.Guests[0]}
	e.start()

	if body, err := e.curl("https://www.github.com"); err != nil || !strings.HasPrefix(body, "hello from www.github.com") {
		t.Errorf("TLS to www.github.com: %q, %v", body, err)
	}
	if body, err := e.curl("http://www.github.com/"); err != nil || !strings.HasPrefix(body, "hello from www.github.com via http") {
		t.Errorf("HTTP to www.github.com: %q, %v", body, err)
	}
	for _, h := range e.hits("dns:") {
		if strings.HasSuffix(h.Server, ".corp.test") {
			t.Errorf("a resolver applied the search domain: %+v", h)
		}
	}
	e.noLeaks()
}

// TestHTTPUpstreamPort: an http rule on ports 80 and 8080; a request on
// 8080 goes to the server's 8080, never to its 80 (issue 12, item 5), also
// when the Host names port 80 (Envoy refuses that Host with 403).
func TestHTTPUpstreamPort(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - http: www.github.com
        ports: [80, 8080]
`)
	alt := e.serveInet(world.WWWGitHubIP.String()+":8080", "")
	e.start()

	ip := world.WWWGitHubIP.String()
	if out, err := e.curlAt("http://www.github.com:8080/alt", ip); err != nil || !strings.HasPrefix(out, "port 8080, host www.github.com") {
		t.Errorf("HTTP to www.github.com:8080: %q, %v; want the 8080 server", out, err)
	}
	if out, err := e.curlAt("http://www.github.com/", ip); err != nil || !strings.HasPrefix(out, "hello from www.github.com via http") {
		t.Errorf("HTTP to www.github.com:80: %q, %v; want the port 80 server", out, err)
	}
	port80 := len(e.hits("http:www.github.com"))
	// A Host naming port 80 on a connection to 8080.
	out, err := e.curlAt("http://www.github.com:8080/other-port", ip, "-H", "Host: www.github.com:80", "-w", "\n%{http_code}")
	if strings.Contains(out, "via http") || len(e.hits("http:www.github.com")) != port80 {
		t.Errorf("a request on 8080 with Host www.github.com:80 reached port 80: %q, %v", out, err)
	}
	if onEnvoy() && (err != nil || !strings.HasSuffix(out, "\n403")) {
		t.Errorf("Host www.github.com:80 on 8080: %q, %v; want 403", out, err)
	}
	if got := alt.seen(); len(got) == 0 || got[0] != "www.github.com:8080 /alt" {
		t.Errorf("the 8080 server read %q", got)
	}
	e.noLeaks()
}

// envoyAdmin asks the daemon's Envoy's admin (a unix socket in the state
// directory) for path.
func (e *env) envoyAdmin(path string) (string, error) {
	sock := filepath.Join(e.w.StateDir(), "envoy-admin.sock")
	return world.Output(e.ctx, world.NS(e.w.Host, "curl", "-sS", "--fail", "--max-time", "5", "--unix-socket", sock, "http://envoy"+path)...)
}

// TestEnvoyAdminSocket: the daemon's Envoy has its admin on a root-only
// unix socket and no TCP port but the egress listener (issue 12, item 8:
// any local user could read /config_dump, drain listeners, /quitquitquit).
func TestEnvoyAdminSocket(t *testing.T) {
	if !onEnvoy() {
		t.Skip("Envoy plane only (VMEGRESS_TEST_PLANE=envoy)")
	}
	t.Parallel()
	e := newEnv(t)
	sock := filepath.Join(e.w.StateDir(), "envoy-admin.sock")
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if fi.Mode()&fs.ModeSocket == 0 || fi.Mode().Perm() != 0o600 || st.Uid != 0 {
		t.Errorf("admin socket %s: mode %v, uid %d; want a 0600 socket owned by root", sock, fi.Mode(), st.Uid)
	}
	if out, err := e.envoyAdmin("/ready"); err != nil || strings.TrimSpace(out) != "LIVE" {
		t.Errorf("admin over the socket: %q, %v", out, err)
	}
	// Envoy's TCP listeners in the host namespace: the egress listener only.
	out, err := world.Output(e.ctx, world.NS(e.w.Host, "ss", "-Hltnp")...)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(l); strings.Contains(l, `"envoy"`) && len(f) > 3 && !strings.HasSuffix(f[3], ":15001") {
			t.Errorf("Envoy listens on TCP %s: %s", f[3], l)
		}
	}
	// An unprivileged local user cannot use it.
	if out, err := world.Output(e.ctx, world.NS(e.w.Host, "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
		"curl", "-sS", "--max-time", "5", "--unix-socket", sock, "http://envoy/config_dump")...); err == nil {
		t.Errorf("uid 65534 read the admin: %.200q", out)
	}
}

// serveHeadsOnly starts, in the fake internet, an HTTP server that reads
// request heads only and never a body (as Python's http.server does for a
// GET): a body holding a request is read as the next request. It records
// the Host of every request it reads.
func (e *env) serveHeadsOnly(addr string) *inetServer {
	e.t.Helper()
	ln, err := world.ListenIn(e.w.Inet, "tcp4", addr)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { ln.Close() })
	s := &inetServer{}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if strings.TrimSpace(line) == "" {
						continue // RFC 9112 2.2: empty lines before a request
					}
					var host string
					for {
						h, err := r.ReadString('\n')
						if err != nil {
							return
						}
						if h = strings.TrimSpace(h); h == "" {
							break
						}
						if k, v, ok := strings.Cut(h, ":"); ok && strings.EqualFold(k, "host") {
							host = strings.TrimSpace(v)
						}
					}
					s.mu.Lock()
					s.reqs = append(s.reqs, host+" "+strings.Fields(line + " x x")[1])
					s.mu.Unlock()
					fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
				}
			}()
		}
	}()
	return s
}

// rawHTTPQuiet sends req from the guest to addr and returns what came back
// until the server closed or went quiet.
func (e *env) rawHTTPQuiet(addr, req string) string {
	e.t.Helper()
	var out []byte
	err := world.InNS(e.g.NS, func() error {
		c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.Write([]byte(req)); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		out, _ = io.ReadAll(c)
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return string(out)
}

// TestBodyOnGETNotSmuggled: a GET whose Content-Length body holds a
// second request for another host (issue 12, item 1): an origin that
// ignores bodies on GET would read it as a request no rule checked. It
// never reaches the server as a request for evil.test; Envoy answers 403
// (so does the builtin plane), also for a
// chunked body and for HEAD, OPTIONS, TRACE.
func TestBodyOnGETNotSmuggled(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - http: www.github.com
        ports: [8080]
`)
	srv := e.serveHeadsOnly(world.WWWGitHubIP.String() + ":8080")
	e.start()
	addr := world.WWWGitHubIP.String() + ":8080"

	smuggled := "GET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n"
	chunk := fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(smuggled), smuggled)
	for name, req := range map[string]string{
		"GET content-length":  fmt.Sprintf("GET /a HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: %d\r\n\r\n%s", len(smuggled), smuggled),
		"HEAD content-length": fmt.Sprintf("HEAD /a HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: %d\r\n\r\n%s", len(smuggled), smuggled),
		"OPTIONS chunked":     "OPTIONS /a HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk,
		"TRACE chunked":       "TRACE /a HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk,
	} {
		out := e.rawHTTPQuiet(addr, req)
		if !strings.HasPrefix(out, "HTTP/1.1 403") {
			t.Errorf("%s: got %.100q; want 403", name, out)
		}
	}
	// A GET without a body and a POST with one still work.
	if out := e.rawHTTPQuiet(addr, "GET /ok HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"); !strings.HasPrefix(out, "HTTP/1.1 200") {
		t.Errorf("GET with Content-Length: 0: %.100q; want 200", out)
	}
	if out := e.rawHTTPQuiet(addr, "POST /post HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"); !strings.HasPrefix(out, "HTTP/1.1 200") {
		t.Errorf("POST with a body: %.100q; want 200", out)
	}
	for _, r := range srv.seen() {
		if strings.HasPrefix(r, "evil.test") {
			t.Errorf("the server read a request for evil.test: %q (all: %q)", r, srv.seen())
		}
	}
	e.noLeaks()
}
