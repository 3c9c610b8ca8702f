package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/tlsca"
	"github.com/vmegress/vmegress/internal/world"
)

// echoSeen is one request as an echoServer received it.
type echoSeen struct {
	method, uri, host, remote string
	header                    http.Header
}

func (s echoSeen) String() string {
	return fmt.Sprintf("%s %s host=%s from %s %v", s.method, s.uri, s.host, s.remote, s.header)
}

// echoServer is an HTTPS server in the fake internet that answers every
// request with its request line, Host and headers (as TRACE does), and
// records the requests.
type echoServer struct {
	mu   sync.Mutex
	reqs []echoSeen
}

func (s *echoServer) requests() []echoSeen {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]echoSeen(nil), s.reqs...)
}

// startEcho serves HTTPS (h2 and HTTP/1.1) on addr in the world's fake
// internet with cert.
func startEcho(t *testing.T, w *world.World, addr string, cert *tls.Certificate) *echoServer {
	t.Helper()
	ln, err := world.ListenIn(w.Inet, "tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &echoServer{}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			s.mu.Lock()
			s.reqs = append(s.reqs, echoSeen{r.Method, r.RequestURI, r.Host, r.RemoteAddr, r.Header.Clone()})
			s.mu.Unlock()
			io.Copy(io.Discard, r.Body)
			fmt.Fprintf(rw, "%s %s %s\nHost: %s\n", r.Method, r.RequestURI, r.Proto, r.Host)
			var keys []string
			for k := range r.Header {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				for _, v := range r.Header[k] {
					fmt.Fprintf(rw, "%s: %s\n", k, v)
				}
			}
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{*cert}, NextProtos: []string{"h2", "http/1.1"}},
		ErrorLog:  log.New(io.Discard, "", 0),
	}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return s
}

// writeTermFiles writes, under dir, what a config with https rules names:
// originCA's certificate as the upstream_ca_file, and a secrets_dir
// holding secret as the secret apikey (secretFile).
func writeTermFiles(t *testing.T, dir string, originCA *tlsca.CA, secret string) (upstreamCA, secretsDir, secretFile string) {
	t.Helper()
	upstreamCA = filepath.Join(dir, "upstream-ca.pem")
	if err := os.WriteFile(upstreamCA, originCA.CertPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	secretsDir = filepath.Join(dir, "secrets")
	if err := os.Mkdir(secretsDir, 0o700); err != nil {
		t.Fatal(err)
	}
	secretFile = filepath.Join(secretsDir, "apikey")
	if err := os.WriteFile(secretFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return upstreamCA, secretsDir, secretFile
}

const httpsSecret = "sk-e2e-Secret-7f3a9c"

// TestHTTPSTermination: an https rule terminates TLS with the vmegress CA,
// decides every request by method and path, injects a secret the guest
// never holds (replacing the guest's own header) only where the rule says,
// and forwards over verified TLS; an sni rule still never terminates.
func TestHTTPSTermination(t *testing.T) {
	e := newWorld(t)
	dir := e.w.Dir
	// The fake internet's API server (example.com:8443) with a certificate
	// of a CA vmegress is told to trust (upstream_ca_file), and an impostor
	// on example.com:9443 with a certificate of a CA it does not trust.
	originCA, err := tlsca.Load(filepath.Join(dir, "origin-ca"), tlsca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	badCA, err := tlsca.Load(filepath.Join(dir, "bad-ca"), tlsca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	good, _ := originCA.Leaf("example.com")
	bad, _ := badCA.Leaf("example.com")
	api := startEcho(t, e.w, net.JoinHostPort(world.ExampleIP.String(), "8443"), good)
	impostor := startEcho(t, e.w, net.JoinHostPort(world.ExampleIP.String(), "9443"), bad)
	upstreamCA, secretsDir, secretFile := writeTermFiles(t, dir, originCA, httpsSecret)
	cfg := fmt.Sprintf(`secrets_dir: %s
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
        ports: [9443]
        inject: {Authorization: "Bearer ${secret:apikey}"}
      - sni: github.com
`, secretsDir, upstreamCA)
	if err := e.writeConfig(cfg); err != nil {
		t.Fatal(err)
	}
	if onEnvoy() {
		// A wildcard https rule cannot be carried out by Envoy (one
		// certificate per name, issued before the connection): refused
		// at load, naming the rule's position.
		if err := e.writeConfig(strings.Replace(cfg, "- sni: github.com", "- https: \"*.example.org\"", 1)); err != nil {
			t.Fatal(err)
		}
		if _, err := e.w.StartDaemon(e.ctx, binary, e.cfg); err == nil || !regexp.MustCompile(`:\d+:\d+: project "alpha": allow rule https:\*\.example\.org needs dataplane builtin`).MatchString(err.Error()) {
			t.Errorf("a wildcard https rule on Envoy: %v; want the config refused naming the rule", err)
		}
		if err := e.writeConfig(cfg); err != nil {
			t.Fatal(err)
		}
	}
	// A secret file others can read fails the start, naming the file and
	// not the value.
	os.Chmod(secretFile, 0o644)
	if _, err := e.w.StartDaemon(e.ctx, binary, e.cfg); err == nil || !strings.Contains(err.Error(), "permissions 0644") || strings.Contains(err.Error(), httpsSecret) {
		t.Errorf("start with a world-readable secret: %v; want it refused, naming the permissions", err)
	}
	os.Chmod(secretFile, 0o600)
	e.start()
	// The API's event stream, followed for the whole test.
	evCtx, stopEvents := context.WithCancel(e.ctx)
	var events bytes.Buffer
	ev := exec.CommandContext(evCtx, "ip", world.NS(e.w.Host, binary, "--state-dir", e.w.StateDir(), "--api-socket", e.w.APISocket(),
		"--config", e.cfg, "events", "--project", "alpha")[1:]...)
	ev.Stdout = &events
	if err := ev.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stopEvents(); ev.Wait() }()
	pem, err := e.vmegress("ca", "cert")
	if err != nil {
		t.Fatal(err)
	}
	vmCA := filepath.Join(dir, "vmegress-ca.pem")
	if err := os.WriteFile(vmCA, []byte(pem), 0o644); err != nil {
		t.Fatal(err)
	}
	var refusals []string // what the guest was shown of refusals, grepped for the secret at the end
	curl := func(extra ...string) (string, error) {
		args := append([]string{"curl", "-sS", "--max-time", "10", "--cacert", vmCA}, extra...)
		return e.guest(args...)
	}

	// Allowed and injecting, HTTP/1.1 and HTTP/2: the guest's own
	// Authorization is replaced by the secret.
	for _, proto := range []string{"--http1.1", "--http2"} {
		out, err := curl(proto, "-H", "Authorization: Bearer guest-own", "https://example.com:8443/v1/models?q=1")
		if err != nil || !strings.Contains(out, "Authorization: Bearer "+httpsSecret+"\n") || strings.Contains(out, "guest-own") {
			t.Errorf("%s GET /v1/models: %q, %v; want only the injected Authorization", proto, out, err)
		}
	}
	// Allowed by a rule that injects nothing: nothing injected.
	out, err := curl("-X", "POST", "-H", "Authorization: Bearer guest-own", "https://example.com:8443/v1/chat")
	if err != nil || strings.Contains(out, httpsSecret) || !strings.Contains(out, "Authorization: Bearer guest-own") {
		t.Errorf("POST /v1/chat: %q, %v; want the guest's header and no secret", out, err)
	}
	// Refused: 403 naming project and reason; the server sees nothing.
	before := len(api.requests())
	for _, tc := range []struct{ args []string }{
		{[]string{"-X", "DELETE", "https://example.com:8443/v1/models"}},
		{[]string{"https://example.com:8443/admin"}},
		{[]string{"--path-as-is", "https://example.com:8443/v1/../admin"}},
	} {
		out, err := curl(append([]string{"-w", "\n%{http_code}"}, tc.args...)...)
		refusals = append(refusals, out)
		if err != nil || !strings.HasSuffix(out, "\n403") || !strings.Contains(out, "project alpha") || !strings.Contains(out, "not allowed for example.com") {
			t.Errorf("%v: %q, %v; want 403 naming the project and the reason", tc.args, out, err)
		}
	}
	if got := api.requests()[before:]; len(got) != 0 {
		t.Errorf("the server saw refused requests: %v", got)
	}
	e.accessLine("msg", "request", "method", "DELETE", "path", "/v1/models", "verdict", "deny")
	e.accessLine("msg", "request", "method", "GET", "path", "/v1/models", "verdict", "allow", "sni", "example.com")

	// An upstream with a certificate vmegress does not trust: refused
	// (502), the server gets no request and no secret.
	out, _ = curl("-w", "\n%{http_code}", "https://example.com:9443/")
	refusals = append(refusals, out)
	if !strings.HasSuffix(out, "\n502") || !strings.Contains(out, "certificate") {
		t.Errorf("untrusted upstream: %q; want 502 about its certificate", out)
	}
	if got := impostor.requests(); len(got) != 0 {
		t.Errorf("the impostor got requests: %v", got)
	}
	// A guest that does not trust the vmegress CA fails closed.
	if out, err := e.curl("https://example.com:8443/v1/models"); err == nil {
		t.Errorf("a guest without the vmegress CA got through: %q", out)
	}
	// A changed secret is used without a restart.
	if err := os.WriteFile(secretFile, []byte("rotated-"+httpsSecret), 0o600); err != nil {
		t.Fatal(err)
	}
	// The builtin plane reads the file per request; Envoy gets the new
	// value over SDS once the daemon's xDS server has read it again.
	rotated := func() (string, error, bool) {
		out, err := curl("https://example.com:8443/v1/x")
		return out, err, err == nil && strings.Contains(out, "Authorization: Bearer rotated-"+httpsSecret)
	}
	out, err, ok := rotated()
	for deadline := time.Now().Add(10 * time.Second); !ok && onEnvoy() && time.Now().Before(deadline); {
		time.Sleep(200 * time.Millisecond)
		out, err, ok = rotated()
	}
	if !ok {
		t.Errorf("after rotation: %q, %v", out, err)
	}
	// An sni rule never terminates: the guest sees github.com's own
	// certificate (the world's CA verifies it; the vmegress CA does not).
	if out, err := e.curl("https://github.com/"); err != nil || !strings.Contains(out, "hello from github.com") {
		t.Errorf("sni rule with the server's CA: %q, %v", out, err)
	}
	if out, err := curl("https://github.com/"); err == nil {
		t.Errorf("sni rule: the vmegress CA verified github.com (terminated?): %q", out)
	}

	// The secret is in no output: not the daemon's log, not the access log,
	// not the API's event stream, not what the guest was shown of refusals.
	e.accessLine("msg", "request", "method", "GET", "path", "/v1/x") // the last request is logged
	stopEvents()
	ev.Wait()
	if !strings.Contains(events.String(), `"type":"request"`) {
		t.Errorf("the event stream has no request events:\n%s", events.String())
	}
	outputs := map[string]string{"daemon log": e.d.Stderr(), "access log": e.d.RawAccessLog(), "event stream": events.String()}
	if onEnvoy() {
		// Envoy's admin output: the secrets it was served are there
		// (by name), their values redacted, no private key either.
		dump, err := e.envoyAdmin("/config_dump")
		if err != nil || !strings.Contains(dump, "vmegress_inject/") || !strings.Contains(dump, "vmegress_cert/example.com") {
			t.Errorf("Envoy's config_dump: %v; want the SDS secrets listed (redacted)", err)
		}
		if strings.Contains(dump, "PRIVATE KEY") {
			t.Error("Envoy's config_dump shows a private key")
		}
		outputs["Envoy config_dump"] = dump
	}
	for what, text := range outputs {
		if strings.Contains(text, httpsSecret) {
			t.Errorf("the secret appears in the %s", what)
		}
	}
	for _, o := range refusals {
		if strings.Contains(o, httpsSecret) {
			t.Errorf("a refusal shows the secret: %q", o)
		}
	}
	e.noLeaks()
}
