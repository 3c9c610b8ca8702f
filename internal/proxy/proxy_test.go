package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/policy"
)

// publicAddr is what the fake resolver answers; the proxy's dial goes to the
// test's origin whatever the address.
var publicAddr = netip.MustParseAddr("93.184.216.34")

type notHost struct{}

func (notHost) IsHostAddr(netip.Addr) (bool, error) { return false, nil }

type fixedResolver struct{}

func (fixedResolver) Lookup(context.Context, *policy.Project, string) ([]netip.Addr, error) {
	return []netip.Addr{publicAddr}, nil
}

// testPolicy compiles a policy for project alpha at 127.0.0.0/30 (the
// test's client is 127.0.0.1) with the given allow rules.
func testPolicy(t testing.TB, rules string) *policy.Policy {
	t.Helper()
	cfg, err := config.Parse("t.yaml", []byte("vm_cidr: 127.0.0.0/16\nprojects:\n  alpha:\n    subnet: 127.0.0.0/30\n    allow:\n"+rules))
	if err != nil {
		t.Fatal(err)
	}
	pol, err := policy.Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return pol
}

// lenientOrigin is an HTTP/1.x server as lenient as the ones the review
// used: bare LF line ends, empty lines before a request skipped, the Host
// header obeyed, a body on GET and HEAD never read (Python's http.server),
// Upgrade ignored. It answers every request with the host asked for, and
// records the hosts.
type lenientOrigin struct {
	ln    net.Listener
	mu    sync.Mutex
	hosts []string
}

func startLenientOrigin(t *testing.T) *lenientOrigin {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := &lenientOrigin{ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go o.serve(c)
		}
	}()
	return o
}

func (o *lenientOrigin) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	for {
		line := ""
		for line == "" {
			l, err := br.ReadString('\n')
			if err != nil {
				return
			}
			line = strings.TrimRight(l, "\r\n")
		}
		method, _, _ := strings.Cut(line, " ")
		host, length, closing := "", 0, false
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				return
			}
			l = strings.TrimRight(l, "\r\n")
			if l == "" {
				break
			}
			k, v, _ := strings.Cut(l, ":")
			switch strings.ToLower(strings.TrimSpace(k)) {
			case "host":
				host = strings.TrimSpace(v)
			case "content-length":
				length, _ = strconv.Atoi(strings.TrimSpace(v))
			case "connection":
				closing = strings.EqualFold(strings.TrimSpace(v), "close")
			}
		}
		if method != "GET" && method != "HEAD" && length > 0 {
			if _, err := io.CopyN(io.Discard, br, int64(length)); err != nil {
				return
			}
		}
		o.mu.Lock()
		o.hosts = append(o.hosts, host)
		o.mu.Unlock()
		body := "you asked for " + host + "\n"
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		if closing {
			return
		}
	}
}

func (o *lenientOrigin) seen() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]string(nil), o.hosts...)
}

// startProxy serves p on a loopback listener whose port is the original
// destination's; every dial goes to origin.
func startProxy(t testing.TB, p *Proxy, ln net.Listener, origin string) {
	t.Helper()
	p.HostAddrs, p.Resolver = notHost{}, fixedResolver{}
	p.Dial = func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, origin)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
}

// exchangeRaw sends raw on a new connection to addr and returns all that
// comes back until the proxy closes.
func exchangeRaw(t *testing.T, addr, raw string) string {
	t.Helper()
	c, err := net.Dial("tcp4", addr)
	if errors.Is(err, syscall.ECONNRESET) {
		return "" // reset before the dial saw it connected
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second)) // a hang fails, not blocks
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	got, _ := io.ReadAll(c)
	return string(got)
}

// TestProxySmuggling: the review's three reproductions, through the whole
// proxy to a lenient origin: the origin never reads a request for
// evil.test, the allowed requests are answered, and the refused one gets
// a 403 after them.
func TestProxySmuggling(t *testing.T) {
	origin := startLenientOrigin(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	p := &Proxy{}
	p.SetPolicy(testPolicy(t, fmt.Sprintf("      - http: www.github.com\n        ports: [%d]\n", port)), true)
	startProxy(t, p, ln, origin.ln.Addr().String())

	get := "GET /one HTTP/1.1\r\nHost: www.github.com\r\n\r\n"
	evil := "GET /two HTTP/1.1\r\nHost: evil.test\r\n\r\n"
	for _, tc := range []struct{ name, raw string }{
		{"bare LF", get + "GET http://www.github.com/lf HTTP/1.1\nHost: evil.test\n\n"},
		{"bare LF first", "GET http://www.github.com/lf HTTP/1.1\nHost: evil.test\n\n"},
		{"after a refused upgrade", "GET /ws HTTP/1.1\r\nHost: www.github.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\r\n" + evil},
		{"GET with a body", get + fmt.Sprintf("GET /b HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: %d\r\n\r\n%s", len(evil), evil)},
		{"GET with a body first", fmt.Sprintf("GET /b HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: %d\r\n\r\n%s", len(evil), evil)},
		{"Host with another port", get + "GET / HTTP/1.1\r\nHost: www.github.com:1\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := exchangeRaw(t, ln.Addr().String(), tc.raw)
			if strings.Contains(got, "evil.test\n") {
				t.Errorf("the origin answered for evil.test:\n%s", got)
			}
			if !strings.Contains(got, "403 Forbidden") {
				t.Errorf("no 403:\n%s", got)
			}
			if strings.Count(tc.raw, "www.github.com\r\n\r\n") > 0 && strings.HasPrefix(tc.raw, "GET /") && !strings.Contains(got, "you asked for www.github.com") {
				t.Errorf("the allowed request got no answer:\n%s", got)
			}
			if i, j := strings.LastIndex(got, "you asked"), strings.Index(got, "403 Forbidden"); j >= 0 && i > j {
				t.Errorf("the 403 came before an answer:\n%s", got)
			}
		})
	}
	for _, h := range origin.seen() {
		if h != "www.github.com" {
			t.Errorf("the origin read a request for %q (all: %q)", h, origin.seen())
		}
	}
}

// TestPolicyAtDecisionTime: a connection accepted under a policy that
// allows it, whose request comes after a reload that does not, is decided
// by the new policy (the review's "connections decided by an old policy").
func TestPolicyAtDecisionTime(t *testing.T) {
	origin := startLenientOrigin(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	allow := testPolicy(t, fmt.Sprintf("      - http: www.github.com\n        ports: [%d]\n", port))
	deny := testPolicy(t, fmt.Sprintf("      - http: example.com\n        ports: [%d]\n", port))
	p := &Proxy{}
	p.SetPolicy(allow, true)
	startProxy(t, p, ln, origin.ln.Addr().String())

	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second)) // a hang fails, not blocks
	// The handler has taken the accept-time policy once the connection
	// is counted; only then does the policy change.
	for p.Active("alpha") == 0 {
		time.Sleep(time.Millisecond)
	}
	p.SetPolicy(deny, true)
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: www.github.com\r\nConnection: close\r\n\r\n")
	got, _ := io.ReadAll(c)
	if !strings.Contains(string(got), "403 Forbidden") || len(origin.seen()) > 0 {
		t.Errorf("decided by the policy of accept time: origin saw %q; the client got:\n%s", origin.seen(), got)
	}
}

// flakyListener fails its first Accepts with errs, then accepts.
type flakyListener struct {
	net.Listener
	mu   sync.Mutex
	errs []error
}

func (l *flakyListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if len(l.errs) > 0 {
		err := l.errs[0]
		l.errs = l.errs[1:]
		l.mu.Unlock()
		if err == nil {
			return l.Listener.Accept()
		}
		return nil, err
	}
	l.mu.Unlock()
	return l.Listener.Accept()
}

func acceptErr(errno syscall.Errno) error {
	return &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", errno)}
}

// spares is an OpenSpare that counts, and fails the opens listed in fail.
type spares struct {
	mu           sync.Mutex
	opens, close int
	fail         map[int]bool
}

func (s *spares) open() (io.Closer, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.opens++
	if s.fail[s.opens] {
		return nil, syscall.EMFILE
	}
	return closerFunc(func() error { s.mu.Lock(); s.close++; s.mu.Unlock(); return nil }), nil
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }

// syncBuffer is an access log's writer.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func httpRulePolicy(t *testing.T, ln net.Listener) *policy.Policy {
	return testPolicy(t, fmt.Sprintf("      - http: www.github.com\n        ports: [%d]\n", ln.Addr().(*net.TCPAddr).Port))
}

const getWWW = "GET / HTTP/1.1\r\nHost: www.github.com\r\nConnection: close\r\n\r\n"

// TestServeKeepsAccepting: accept errors (out of descriptors, aborted
// connections, anything) never end Serve: it backs off and goes on, and
// out of descriptors it frees its spare one to take the pending connection
// (reset when no descriptor can be spared again).
func TestServeKeepsAccepting(t *testing.T) {
	origin := startLenientOrigin(t)
	real, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// A nil error is one real accept.
	ln := &flakyListener{Listener: real, errs: []error{
		acceptErr(syscall.EMFILE), nil,
		acceptErr(syscall.ECONNABORTED), acceptErr(syscall.ENOBUFS), errors.New("some other accept failure"),
		acceptErr(syscall.ENFILE), nil,
	}}
	sp := &spares{fail: map[int]bool{3: true}} // the spare cannot be had again once
	var access syncBuffer
	p := &Proxy{OpenSpare: sp.open, AccessLog: slog.New(slog.NewJSONHandler(&access, nil))}
	p.SetPolicy(httpRulePolicy(t, real), true)
	// Pending before Serve: taken on the first EMFILE with the spare's
	// descriptor, and served (the spare could be had again).
	c1, err := net.Dial("tcp4", real.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	startProxy(t, p, ln, origin.ln.Addr().String())
	c1.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c1, getWWW)
	if got, _ := io.ReadAll(c1); !strings.Contains(string(got), "you asked for www.github.com") {
		t.Errorf("first connection: %q", got)
	}
	// The ENFILE: the spare goes, the next connection takes its
	// descriptor and, the spare failing to reopen, is reset.
	got := exchangeRaw(t, real.Addr().String(), getWWW)
	if got != "" {
		t.Errorf("the connection taken with the spare's descriptor was not reset: %q", got)
	}
	// And then accepting goes on as ever.
	if got := exchangeRaw(t, real.Addr().String(), getWWW); !strings.Contains(got, "you asked for www.github.com") {
		t.Errorf("after the accept errors: %q", got)
	}
	if !strings.Contains(access.String(), "no file descriptor left") {
		t.Errorf("no access-log line for the reset connection:\n%s", access.String())
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.opens != 4 || sp.close != 2 {
		t.Errorf("spare opened %d times, closed %d; want 4 and 2", sp.opens, sp.close)
	}
}

// TestConnectionCap: beyond MaxConns open connections, new ones are reset
// with a reason in the access log; once one closes, they are served again.
func TestConnectionCap(t *testing.T) {
	origin := startLenientOrigin(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var access syncBuffer
	p := &Proxy{MaxConns: 1, AccessLog: slog.New(slog.NewJSONHandler(&access, nil))}
	p.SetPolicy(httpRulePolicy(t, ln), true)
	startProxy(t, p, ln, origin.ln.Addr().String())
	held, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	for p.Active("alpha") == 0 {
		time.Sleep(time.Millisecond)
	}
	if got := exchangeRaw(t, ln.Addr().String(), getWWW); got != "" {
		t.Errorf("a connection beyond the cap was served: %q", got)
	}
	// The line is written as the refused connection is closed: the client
	// may see the reset first.
	for end := time.Now().Add(5 * time.Second); !strings.Contains(access.String(), "connection cap (1") && time.Now().Before(end); {
		time.Sleep(time.Millisecond)
	}
	if !strings.Contains(access.String(), "connection cap (1") {
		t.Errorf("no access-log line with the reason:\n%s", access.String())
	}
	held.Close()
	for p.open.Load() != 0 {
		time.Sleep(time.Millisecond)
	}
	if got := exchangeRaw(t, ln.Addr().String(), getWWW); !strings.Contains(got, "you asked for www.github.com") {
		t.Errorf("below the cap again: %q", got)
	}
}

func TestConnCapFor(t *testing.T) {
	for nofile, want := range map[uint64]int{1024: 384, 20000: 9872, 1 << 20: (1<<20 - 256) / 2, 256: 64, 1: 1} {
		if got := connCapFor(nofile); got != want {
			t.Errorf("connCapFor(%d) = %d, want %d", nofile, got, want)
		}
	}
}

// TestProxyUpgrade: after the server answers 101 the rest goes as is both
// ways (WebSocket frames pass), and pipelined bytes sent with the upgrade
// request are not lost.
func TestProxyUpgrade(t *testing.T) {
	oln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { oln.Close() })
	go func() {
		c, err := oln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		io.Copy(c, br) // echo the new protocol
	}()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &Proxy{}
	p.SetPolicy(httpRulePolicy(t, ln), true)
	startProxy(t, p, ln, oln.Addr().String())
	frames := "\x81\x05helloGET / HTTP/1.1\r\nHost: evil.test\r\n\r\n" // not HTTP any more
	got := exchangeRaw(t, ln.Addr().String(), "GET /ws HTTP/1.1\r\nHost: www.github.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"+frames)
	if !strings.HasPrefix(got, "HTTP/1.1 101") || !strings.HasSuffix(got, "\r\n\r\n"+frames) {
		t.Errorf("after a 101: %q", got)
	}
}
