package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmegress/vmegress/client"
	"github.com/vmegress/vmegress/internal/world"
)

// The red-team suite: attacks from a hostile guest and from an unprivileged
// local user against the round's new pieces (the re-serializing HTTP
// forwarder, the API, the engine, TAP ownership). Each test names what it
// attacks and what must hold.

// rawOrigin is an origin server in the fake internet that records every
// byte it receives and every request head it parses. It parses like a
// server that knows only Content-Length (Transfer-Encoding ignored, as a
// handler reading by Content-Length does), skips empty lines before a
// request, and accepts an h2c upgrade: it answers 101 and from then on only
// records what comes (an HTTP/2 server routes every stream by its own
// :authority, so whatever follows an accepted upgrade is unchecked).
type rawOrigin struct {
	mu       sync.Mutex
	raw      strings.Builder
	hosts    []string
	switched int
}

func (o *rawOrigin) reset() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.raw.Reset()
	o.hosts, o.switched = nil, 0
}

func (o *rawOrigin) snapshot() (raw string, hosts []string, switched int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.raw.String(), append([]string(nil), o.hosts...), o.switched
}

// recorder tees what the server reads into the origin's raw record.
type recorder struct {
	c net.Conn
	o *rawOrigin
}

func (r recorder) Read(b []byte) (int, error) {
	n, err := r.c.Read(b)
	r.o.mu.Lock()
	r.o.raw.Write(b[:n])
	r.o.mu.Unlock()
	return n, err
}

func (e *env) serveRawOrigin(addr string) *rawOrigin {
	e.t.Helper()
	ln, err := world.ListenIn(e.w.Inet, "tcp4", addr)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { ln.Close() })
	o := &rawOrigin{}
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

func (o *rawOrigin) serve(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(recorder{c, o})
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return
		}
		if strings.TrimSpace(line) == "" {
			continue
		}
		host, length, h2c := "", 0, false
		for {
			h, err := br.ReadString('\n')
			if err != nil {
				return
			}
			if h = strings.TrimSpace(h); h == "" {
				break
			}
			k, v, _ := strings.Cut(h, ":")
			v = strings.TrimSpace(v)
			switch strings.ToLower(strings.TrimSpace(k)) {
			case "host":
				host = v
			case "content-length":
				length, _ = strconv.Atoi(v)
			case "upgrade":
				h2c = h2c || strings.Contains(strings.ToLower(v), "h2c")
			}
		}
		o.mu.Lock()
		o.hosts = append(o.hosts, host)
		o.mu.Unlock()
		if h2c {
			o.mu.Lock()
			o.switched++
			o.mu.Unlock()
			io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
			io.Copy(io.Discard, br) // recorded; an HTTP/2 server would route by :authority
			return
		}
		if length > 0 {
			if _, err := io.CopyN(io.Discard, br, int64(length)); err != nil {
				return
			}
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
	}
}

// TestRedteamHTTPForwarder sends request-smuggling variants from a guest to
// an origin allowed by `http: lenient.test` on port 8081. What must hold:
// the origin never parses a request head for evil.test, and never receives
// the string evil.test outside a request body it frames itself.
func TestRedteamHTTPForwarder(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	e.writeConfig(`projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - http: lenient.test
        ports: [8081]
`)
	e.start()
	addr := world.LenientIP.String() + ":8081"
	o := e.serveRawOrigin(addr)
	const h = "Host: lenient.test:8081\r\n"
	allowed := "GET /one HTTP/1.1\r\n" + h + "\r\n"
	evil := "GET /evil HTTP/1.1\r\nHost: evil.test\r\n\r\n"
	chunk := func(s string) string { return fmt.Sprintf("%x\r\n%s\r\n", len(s), s) }
	for _, tc := range []struct {
		name, raw string
		// inBody: evil.test is the content of a body the origin frames
		// itself; only its parsed heads count.
		inBody bool
		// finding: what this case attacks (for the report and skip).
		finding string
	}{
		{name: "h2c upgrade, then a request for another host",
			raw: "GET / HTTP/1.1\r\n" + h + "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n" + evil},
		{name: "h2c upgrade after an allowed request",
			raw: allowed + "GET / HTTP/1.1\r\n" + h + "Connection: Upgrade\r\nUpgrade: websocket, h2c\r\n\r\n" + evil},
		{name: "chunked trailer carrying Host and Content-Length",
			raw: "POST /t HTTP/1.1\r\n" + h + "Transfer-Encoding: chunked\r\n\r\n" + chunk("abc") + "0\r\nHost: evil.test\r\nContent-Length: 40\r\n\r\n"},
		{name: "Content-Length body holding a request (the origin frames it)", inBody: true,
			raw: fmt.Sprintf("POST /b HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s", h, len(evil), evil) + allowed},
		{name: "duplicate equal Content-Length", inBody: true,
			raw: fmt.Sprintf("POST /b HTTP/1.1\r\n%sContent-Length: %d\r\nContent-Length: %d\r\n\r\n%s", h, len(evil), len(evil), evil)},
		{name: "Expect 100-continue with a body holding a request", inBody: true,
			raw: fmt.Sprintf("POST /b HTTP/1.1\r\n%sExpect: 100-continue\r\nContent-Length: %d\r\n\r\n%s", h, len(evil), evil)},
		{name: "Transfer-Encoding with a space before the colon",
			raw: "POST / HTTP/1.1\r\n" + h + "Content-Length: 0\r\nTransfer-Encoding : chunked\r\n\r\n" + chunk(evil) + "0\r\n\r\n"},
		{name: "Host with a space before the colon",
			raw: "GET http://lenient.test:8081/ HTTP/1.1\r\nHost : evil.test\r\n\r\n"},
		{name: "absolute-form with userinfo",
			raw: "GET http://lenient.test:8081@evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"},
		{name: "absolute-form naming evil.test, Host allowed",
			raw: "GET http://evil.test:8081/ HTTP/1.1\r\n" + h + "\r\n"},
		{name: "absolute-form with an IPv6 literal",
			raw: "GET http://[::ffff:198.18.1.80]:8081/ HTTP/1.1\r\nHost: [::ffff:198.18.1.80]:8081\r\n\r\n"},
		{name: "percent-encoded Host",
			raw: "GET / HTTP/1.1\r\nHost: evil%2etest:8081\r\n\r\n"},
		{name: "Host with a trailing dot, then evil.test",
			raw: "GET / HTTP/1.1\r\nHost: LENIENT.TEST.:8081\r\n\r\n" + evil},
		{name: "HTTP/1.0 without Host", raw: "GET / HTTP/1.0\r\n\r\n" + evil},
		{name: "HTTP/0.9", raw: "GET /\r\n" + evil},
		{name: "obs-fold continuing Host",
			raw: "GET / HTTP/1.1\r\nHost: lenient.test:8081\r\n evil.test\r\n\r\n"},
		{name: "header line over 16 KiB, then evil.test",
			raw: "GET / HTTP/1.1\r\n" + h + "X-Pad: " + strings.Repeat("a", 17<<10) + "\r\n\r\n" + evil},
		{name: "NUL in a header value",
			raw: "GET / HTTP/1.1\r\n" + h + "X-A: a\x00\r\nHost: evil.test\r\n\r\n"},
		{name: "CONNECT to evil.test", raw: "CONNECT evil.test:80 HTTP/1.1\r\nHost: evil.test:80\r\n\r\n"},
		{name: "chunked body holding a request, to a server that frames by Content-Length only", inBody: true,
			raw:     "POST /c HTTP/1.1\r\n" + h + "Transfer-Encoding: chunked\r\n\r\n" + chunk("\r\n"+evil) + "0\r\n\r\n",
			finding: "a chunked request body is forwarded chunked; a server (or a handler) that ignores Transfer-Encoding and reads by Content-Length reads the body as the next request, for any host, on both planes (fix: forward chunked bodies up to a cap with Content-Length, 411 beyond it)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.finding != "" && os.Getenv("VMEGRESS_REDTEAM_FINDINGS") != "1" {
				t.Skip("FINDING (VMEGRESS_REDTEAM_FINDINGS=1 runs it): " + tc.finding)
			}
			o.reset()
			e.w.Log.Reset()
			got := e.rawHTTPQuiet(addr, tc.raw)
			raw, hosts, switched := o.snapshot()
			for _, host := range hosts {
				if strings.Contains(strings.ToLower(host), "evil") {
					t.Errorf("the origin parsed a request for %q (switched %d)\nthe guest got:\n%s", host, switched, got)
				}
			}
			if !tc.inBody && strings.Contains(raw, "evil.test") {
				t.Errorf("evil.test reached the origin (switched protocols %d times); it read:\n%q", switched, raw)
			}
		})
	}
	// The origin is reached at all: an allowed request is answered.
	o.reset()
	if got := e.rawHTTPQuiet(addr, allowed); !strings.Contains(got, "200 OK") {
		t.Errorf("an allowed request: %q", got)
	}
	e.noLeaks()
}

// splitConn writes its first Write in two parts: the first n bytes at
// once, the rest after gate is closed (a client sending its ClientHello or
// request head across a policy change).
type splitConn struct {
	net.Conn
	n    int
	gate <-chan struct{}
	sent chan struct{}
	once sync.Once
}

func (s *splitConn) Write(b []byte) (int, error) {
	first := false
	s.once.Do(func() { first = true })
	if !first || len(b) <= s.n {
		return s.Conn.Write(b)
	}
	k, err := s.Conn.Write(b[:s.n])
	if err != nil {
		return k, err
	}
	close(s.sent)
	<-s.gate
	m, err := s.Conn.Write(b[s.n:])
	return k + m, err
}

// TestRedteamPolicySwapMidRequest: a guest whose policy is replaced through
// the API while its request head or ClientHello is half sent, and while a
// kept-alive HTTP connection is idle between requests. What must hold: the
// policy of the moment decides; nothing the new policy refuses reaches the
// server.
func TestRedteamPolicySwapMidRequest(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, "projects: {}\n")
	e.start()
	c := client.New(e.w.APISocket())
	open := client.Policy{Allow: []client.Rule{{HTTP: "lenient.test"}, {SNI: "www.github.com"}}}
	closed := client.Policy{Allow: sni("github.com")}
	p, err := c.PutProject(e.ctx, "alpha", client.ProjectSpec{Policy: &open})
	if err != nil {
		t.Fatal(err)
	}
	e.g = e.plug(p)
	swap := func(to client.Policy) {
		t.Helper()
		if _, err := c.SetPolicy(e.ctx, "alpha", to); err != nil {
			t.Fatalf("setting the policy: %v", err)
		}
	}
	lenientHits := func() int {
		n := 0
		for _, h := range e.hits("lenient:80") {
			if h.SNI != "" {
				n++
			}
		}
		return n
	}

	// 1. An HTTP request head sent one byte at a time, the policy replaced
	// after "Ho".
	e.w.Log.Reset()
	conn := e.guestConn(world.LenientIP.String() + ":80")
	head := "GET /swap HTTP/1.1\r\nHost: lenient.test\r\n\r\n"
	for i := 0; i < len(head); i++ {
		if i == strings.Index(head, "Ho")+2 {
			swap(closed)
		}
		if _, err := conn.Write([]byte{head[i]}); err != nil {
			break // refused already: as good
		}
		time.Sleep(5 * time.Millisecond) // separate segments
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, _ := io.ReadAll(conn)
	if lenientHits() != 0 || strings.Contains(string(got), "you asked for") {
		t.Errorf("a request completed after its policy was replaced reached the server: %q", got)
	}

	// 2. A ClientHello split across the change.
	swap(open)
	e.w.Log.Reset()
	gate := make(chan struct{})
	sc := &splitConn{Conn: e.guestConn(world.WWWGitHubIP.String() + ":443"), n: 20, gate: gate, sent: make(chan struct{})}
	done := make(chan error, 1)
	go func() {
		tc := tls.Client(sc, &tls.Config{ServerName: "www.github.com", InsecureSkipVerify: true})
		tc.SetDeadline(time.Now().Add(8 * time.Second))
		done <- tc.Handshake()
	}()
	<-sc.sent
	swap(closed)
	close(gate)
	if err := <-done; err == nil {
		t.Error("a ClientHello finished after its policy was replaced completed a handshake")
	}
	for _, h := range e.hits("tls:www.github.com") {
		t.Errorf("the server saw a ClientHello decided by the old policy: %+v", h)
	}

	// 3. A kept-alive HTTP connection idle across the change.
	swap(open)
	e.w.Log.Reset()
	kc := e.guestConn(world.LenientIP.String() + ":80")
	br := bufio.NewReader(kc)
	kc.SetDeadline(time.Now().Add(8 * time.Second))
	io.WriteString(kc, "GET /1 HTTP/1.1\r\nHost: lenient.test\r\n\r\n")
	if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != 200 {
		t.Fatalf("the first request: %v, %v", resp, err)
	} else {
		io.Copy(io.Discard, resp.Body)
	}
	swap(closed)
	if onEnvoy() {
		// Envoy acknowledges the new listener before its dispatcher has
		// closed the replaced chain's connections (drain time 0, a few
		// milliseconds later): a request sent inside that window is still
		// served by the old policy (README, Envoy differences). Outside it,
		// nothing is.
		time.Sleep(250 * time.Millisecond)
	}
	io.WriteString(kc, "GET /2 HTTP/1.1\r\nHost: lenient.test\r\n\r\n")
	rest, _ := io.ReadAll(br)
	if n := lenientHits(); n != 1 || strings.Contains(string(rest), "you asked for") {
		t.Errorf("a kept-alive connection sent a request after its policy was replaced (%d requests reached the server): %q", n, rest)
	}
	e.noLeaks()
}

// TestRedteamAPIHostile: a caller of the API with hostile names, a huge
// body, slow-loris connections, and an event subscriber that never reads,
// while a guest floods denials. What must hold: names stay names (no path
// outside the state dir is written, nothing is placed), the daemon keeps
// answering, and the data plane never waits for a reader.
func TestRedteamAPIHostile(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	c := client.New(e.w.APISocket())
	sock := e.w.APISocket()
	call := func(method, path, body string) string {
		out, _ := world.Output(e.ctx, "curl", "-sS", "--path-as-is", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
			"--unix-socket", sock, "-X", method, "--data-binary", body, "http://vmegress"+path)
		return strings.TrimSpace(out)
	}
	for _, name := range []string{"..", "%2e%2e", "..%2F..%2Fpwned", "a%2Fb", "a%00b", "a%0Ab", "-x", ".hidden",
		strings.Repeat("a", 300), "tap-%2A", "alpha%20", "ALPHA"} {
		for _, path := range []string{"/v1/projects/" + name, "/v1/projects/" + name + "/policy"} {
			body := `{"allow":[{"sni":"example.com"}]}`
			if !strings.HasSuffix(path, "/policy") {
				body = `{"policy":` + body + `}`
			}
			if code := call("PUT", path, body); code == "200" {
				t.Errorf("PUT %s: 200; want a refusal", path)
			}
		}
	}
	filepath.Walk(filepath.Dir(e.w.StateDir()), func(p string, fi os.FileInfo, err error) error {
		if err == nil && strings.Contains(p, "pwned") {
			t.Errorf("a hostile name wrote %s", p)
		}
		return nil
	})
	if ents, err := os.ReadDir(filepath.Join(e.w.StateDir(), "policies")); err == nil {
		for _, en := range ents {
			t.Errorf("a hostile name left a policy file: %s", en.Name())
		}
	}

	// A 6 MiB body is refused, not read whole into memory forever.
	big := `{"policy":{"allow":[{"sni":"` + strings.Repeat("a", 6<<20) + `"}]}}`
	f := filepath.Join(t.TempDir(), "big.json")
	os.WriteFile(f, []byte(big), 0o600)
	if code := call("PUT", "/v1/projects/big", "@"+f); code == "200" {
		t.Error("a 6 MiB body was accepted")
	}

	// Slow-loris: connections that send half a request head and stop.
	for i := 0; i < 64; i++ {
		sc, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sc.Close() })
		io.WriteString(sc, "PUT /v1/projects/slow HTTP/1.1\r\nHost: v\r\nContent-Length: 100000\r\n\r\n{")
	}
	// An event subscriber that never reads, with a small receive buffer.
	ec, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ec.(*net.UnixConn).SetReadBuffer(4096)
	t.Cleanup(func() { ec.Close() })
	io.WriteString(ec, "GET /v1/events HTTP/1.1\r\nHost: v\r\n\r\n")
	time.Sleep(200 * time.Millisecond) // subscribed

	// The guest floods denials: each is an event the subscriber never reads.
	err = world.InNS(e.g.NS, func() error {
		for i := 0; i < 6000; i++ {
			d, err := net.DialTimeout("tcp4", world.AttackerIP.String()+":9", 2*time.Second)
			if err == nil {
				d.Close()
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// The data plane and the API still answer; a new subscriber gets events.
	if body, err := e.curl("https://www.github.com"); err != nil || !strings.HasPrefix(body, "hello from") {
		t.Errorf("after the flood, an allowed connection: %q, %v", body, err)
	}
	ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
	defer cancel()
	got := make(chan client.Event, 1)
	go func() {
		// Any event: the PUT below is one (a change), a denial another.
		for ev, err := range c.Events(ctx, client.EventFilter{}) {
			if err == nil {
				select {
				case got <- ev:
				default:
				}
				return
			}
		}
	}()
	time.Sleep(200 * time.Millisecond)
	if _, err := c.PutProject(ctx, "after", client.ProjectSpec{Policy: &client.Policy{Allow: sni("github.com")}}); err != nil {
		t.Errorf("a PUT while slow-loris connections and a stuck subscriber are open: %v", err)
	}
	e.curl("https://example.com", "--resolve", "example.com:443:"+world.ExampleIP.String())
	select {
	case <-got:
	case <-ctx.Done():
		t.Error("a new subscriber got no event after the stuck one")
	}
	e.noLeaks()
}

// links lists the host's interface names.
func (e *env) links() []string {
	e.t.Helper()
	out, err := world.Output(e.ctx, world.NS(e.w.Host, "ip", "-o", "link", "show")...)
	if err != nil {
		e.t.Fatal(err)
	}
	var names []string
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) > 1 {
			names = append(names, strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0])
		}
	}
	return names
}

// TestRedteamEngineRaces: concurrent API calls that conflict. What must
// hold: one winner; the host holds exactly what the state says (one TAP per
// placed project, on its /30; no TAP and no policy file for a project the
// state does not have).
func TestRedteamEngineRaces(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, "projects: {}\n")
	e.start()
	c := client.New(e.w.APISocket())
	ctx := e.ctx
	const n = 8
	pol := &client.Policy{Allow: sni("github.com")}
	parallel := func(f func(i int) error) (ok int) {
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() { defer wg.Done(); errs[i] = f(i) }()
		}
		wg.Wait()
		for _, err := range errs {
			if err == nil {
				ok++
			}
		}
		return ok
	}
	consistent := func(what string) {
		t.Helper()
		ps, err := c.Projects(ctx)
		if err != nil {
			t.Fatal(err)
		}
		placed := map[string]string{} // tap -> subnet
		for _, p := range ps {
			if p.Placement != nil {
				placed[p.Placement.TAP] = p.Placement.Subnet
			}
		}
		for _, l := range e.links() {
			if !strings.HasPrefix(l, "tap-") || strings.HasPrefix(l, "tap-vmege") {
				continue
			}
			sub, ok := placed[l]
			if !ok {
				t.Errorf("%s: %s is on the host but no project has it", what, l)
				continue
			}
			out, _ := world.Output(ctx, world.NS(e.w.Host, "ip", "-4", "-o", "addr", "show", "dev", l)...)
			host := netip.MustParsePrefix(sub).Addr().Next().String() + "/30"
			if !strings.Contains(out, host) {
				t.Errorf("%s: %s holds %q; its project's subnet is %s", what, l, out, sub)
			}
			delete(placed, l)
		}
		for tap := range placed {
			t.Errorf("%s: the state places %s but the host has no such interface", what, tap)
		}
		byName := map[string]bool{}
		for _, p := range ps {
			byName[p.Name] = true
		}
		ents, _ := os.ReadDir(filepath.Join(e.w.StateDir(), "policies"))
		for _, en := range ents {
			if name := strings.TrimSuffix(en.Name(), ".json"); !byName[name] && !strings.HasPrefix(en.Name(), ".") {
				t.Errorf("%s: policy file %s for no project", what, en.Name())
			}
		}
	}

	// One name, eight subnets at once.
	parallel(func(i int) error {
		_, err := c.PutProject(ctx, "race", client.ProjectSpec{Subnet: fmt.Sprintf("172.31.1.%d/30", 4*i), Policy: pol})
		return err
	})
	consistent("one name, eight subnets")
	// Eight names, one subnet.
	if ok := parallel(func(i int) error {
		_, err := c.PutProject(ctx, fmt.Sprintf("same%d", i), client.ProjectSpec{Subnet: "172.31.2.0/30", Policy: pol})
		return err
	}); ok != 1 {
		t.Errorf("eight projects asked for one /30: %d placed; want 1", ok)
	}
	consistent("eight names, one subnet")
	// Eight names, one TAP.
	if ok := parallel(func(i int) error {
		_, err := c.PutProject(ctx, fmt.Sprintf("tap%d", i), client.ProjectSpec{TAP: "tap-shared", Policy: pol})
		return err
	}); ok != 1 {
		t.Errorf("eight projects asked for one TAP: %d placed; want 1", ok)
	}
	consistent("eight names, one TAP")
	// PUT and DELETE of one name, interleaved, with policy writes.
	for round := 0; round < 5; round++ {
		parallel(func(i int) error {
			var err error
			switch i % 3 {
			case 0:
				_, err = c.PutProject(ctx, "flip", client.ProjectSpec{Policy: pol})
			case 1:
				_, err = c.DeleteProject(ctx, "flip")
			default:
				_, err = c.SetPolicy(ctx, "flip", client.Policy{Allow: sni("example.com")})
			}
			return err
		})
		consistent(fmt.Sprintf("put/delete/policy round %d", round))
	}
	if err := e.d.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	e.start()
	consistent("after a restart")
}

// TestRedteamLocalUserHost: an unprivileged local user (uid 65534) tries to
// make the interfaces `net up` would adopt, or to re-mark a guest's TAP.
// What must hold: without CAP_NET_ADMIN none of it is possible, and the
// state directory lets nobody else in.
func TestRedteamLocalUserHost(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	asNobody := func(argv ...string) error {
		_, err := world.Output(e.ctx, world.NS(e.w.Host, append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"}, argv...)...)...)
		return err
	}
	for _, argv := range [][]string{
		{"ip", "tuntap", "add", "dev", "tap-evil", "mode", "tap"},
		{"ip", "link", "add", "tap-evil", "type", "dummy"},
		{"ip", "link", "add", "tap-evil", "type", "veth", "peer", "name", "tap-evil2"},
		{"ip", "link", "set", "dev", e.g.TAP, "alias", "vmegress:beta"},
		{"ip", "link", "set", "dev", e.g.TAP, "down"},
	} {
		if err := asNobody(argv...); err == nil {
			t.Errorf("uid 65534 could run %v", argv)
		}
	}
	for _, l := range e.links() {
		if strings.HasPrefix(l, "tap-evil") {
			t.Errorf("uid 65534 made %s", l)
		}
	}
	fi, err := os.Stat(e.w.StateDir())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		t.Errorf("the state directory is %v; want no access for others", fi.Mode().Perm())
	}
}
