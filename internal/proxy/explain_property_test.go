package proxy_test

// The property test of issue 11: for random policies and random
// connections, policy.Explain gives the verdict the builtin data plane's
// own code gives. The data plane is the real Proxy, serving real loopback
// connections: its original destination is the accepted socket's local
// address, as under TPROXY, so the destinations are loopback addresses
// (127.0.0.0/8, all routed to lo without any setup) on a few listening
// ports, and the projects' /30s are loopback /30s the clients bind to. The
// verdict is read from the access log, the data plane's record of it.
//
// One stage is not the policy's: the proxy refuses to dial loopback (its
// address vetting, after the verdict). A connection decided by its address
// (a cidr rule; or in audit, one without a name) is refused there with the
// rule kept in the log line; the test reads the verdict before vetting back
// from that line. Names are dialled through a fake resolver's public
// address and a Dial that lands on a loopback sink.

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/proxy"
)

// Loopback destinations and sources. Every 127.0.0.0/8 address is local.
var (
	propDsts = []netip.Addr{
		netip.MustParseAddr("127.0.0.1"),
		netip.MustParseAddr("127.0.1.1"),
		netip.MustParseAddr("127.1.0.1"),
	}
	propPrefixes = []netip.Prefix{
		netip.MustParsePrefix("127.0.0.0/8"),
		netip.MustParsePrefix("127.0.0.0/16"),
		netip.MustParsePrefix("127.0.1.0/24"),
		netip.MustParsePrefix("127.1.0.1/32"),
	}
	propSubnets = []netip.Prefix{
		netip.MustParsePrefix("127.100.0.0/30"),
		netip.MustParsePrefix("127.100.0.4/30"),
		netip.MustParsePrefix("127.100.0.8/30"),
	}
	// propStranger is in no project.
	propStranger = netip.MustParseAddr("127.100.1.2")
	// Names from a small alphabet, so rules and connections collide.
	propNames    = []string{"x", "a.x", "b.x", "a.a.x", "b.a.x", "y", "a.y", "a.b.y"}
	propPatterns = append([]string{"*.x", "*.a.x", "*.y", "*.b.y"}, propNames...)
	// propPublic is what the fake resolver answers; it is never dialled
	// (Dial lands on the sink).
	propPublic = netip.MustParseAddr("8.8.8.8")
)

// propPortCount is how many ports each destination listens on.
const propPortCount = 3

const (
	propPolicies = 100 // random policies
	propConns    = 25  // random connections per policy
)

func TestExplainAgreesWithProxy(t *testing.T) {
	ports, lns := propListeners(t)
	sink := propSink(t)
	var dialled sync.Map // target string → true
	hellos := map[string][]byte{}
	for _, n := range append(propNames, "") {
		hellos[n] = clientHello(t, n)
	}
	logs := newLogCatcher()
	px := &proxy.Proxy{
		HostAddrs: notHost{},
		Resolver:  fakeResolver{},
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dialled.Store(addr, true)
			var d net.Dialer
			return d.DialContext(ctx, network, sink)
		},
		AccessLog: slog.New(logs),
		Log:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	rng := rand.New(rand.NewPCG(11, 2026)) // fixed: a failure is reproducible
	for i := range propPolicies {
		cfg := randomConfig(rng, ports)
		pol, err := policy.Compile(cfg)
		if err != nil {
			t.Fatalf("policy %d: %v", i, err)
		}
		px.SetPolicy(pol, false)
		if i == 0 {
			for _, ln := range lns {
				wg.Add(1)
				go func() { defer wg.Done(); px.Serve(ctx, ln) }()
			}
		}
		for range propConns {
			q := randomQuery(rng, ports)
			got, err := propConnect(q, hellos, logs)
			if err != nil {
				t.Fatalf("policy %d, %+v: %v", i, q, err)
			}
			want := pol.Explain(q)
			if got.verdict != want.Verdict || got.rule != want.Rule {
				t.Errorf("policy %d:\n%s\nconnection from %s to %s, %s with name %q:\n  data plane: %s %q (%s)\n  explain:    %s %q (%s)",
					i, renderConfig(cfg), q.Src, q.Dst, q.Bytes, q.Name, got.verdict, got.rule, got.reason, want.Verdict, want.Rule, want.Reason)
			}
		}
	}
	// Not a property: a check that the generator reaches the name path's
	// dial (a test whose connections were all refused would prove little).
	byName := 0
	dialled.Range(func(k, _ any) bool {
		if strings.HasPrefix(k.(string), propPublic.String()+":") {
			byName++
		}
		return true
	})
	if byName == 0 {
		t.Error("no connection allowed by name was ever dialled: the generator never reaches the allow path")
	}
}

// propResult is the data plane's verdict read back from its access log.
type propResult struct {
	verdict      policy.Verdict
	rule, reason string
}

// loopbackRefusal starts the proxy's reason for refusing to dial loopback.
const loopbackRefusal = "destination is not a routable unicast address"

// propConnect makes q's connection and returns the verdict the data plane
// logged for it, read back from before the address vetting (see the top).
func propConnect(q policy.Query, hellos map[string][]byte, logs *logCatcher) (propResult, error) {
	// Bind the source ourselves so its port is known even when the data
	// plane resets the connection before connect() returns (a port no
	// rule names is refused before any read).
	var src string
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var berr error
		err := rc.Control(func(fd uintptr) {
			if berr = unix.Bind(int(fd), &unix.SockaddrInet4{Addr: q.Src.As4()}); berr != nil {
				return
			}
			sa, err := unix.Getsockname(int(fd))
			if err != nil {
				berr = err
				return
			}
			src = netip.AddrPortFrom(q.Src, uint16(sa.(*unix.SockaddrInet4).Port)).String()
		})
		return errors.Join(err, berr)
	}}
	c, err := d.Dial("tcp4", q.Dst.String())
	if err == nil {
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second)) // a bound, not an expectation
		switch q.Bytes {
		case policy.BytesTLS:
			c.Write(hellos[q.Name])
		case policy.BytesHTTP:
			fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", q.Name)
		case policy.BytesRaw:
			io.WriteString(c, "SSH-2.0-property\r\n")
		}
		c.(*net.TCPConn).CloseWrite()
		io.Copy(io.Discard, c)
	} else if src == "" || !errors.Is(err, syscall.ECONNRESET) {
		return propResult{}, fmt.Errorf("connecting: %w", err)
	}
	line, ok := logs.wait(src, 10*time.Second)
	if !ok {
		return propResult{}, fmt.Errorf("no access-log line for %s", src)
	}
	r := propResult{verdict: policy.Verdict(line["verdict"]), rule: line["rule"], reason: line["reason"]}
	if r.verdict == policy.Deny && strings.HasPrefix(r.reason, loopbackRefusal) {
		// Refused at the dial, after the verdict: an address-decided
		// connection the policy let through (its rule kept), or an audit
		// project's would_deny.
		r.verdict = policy.Allow
		if r.rule == "" {
			r.verdict = policy.WouldDeny
		}
	}
	return r, nil
}

func randomConfig(rng *rand.Rand, ports []uint16) *config.Config {
	cfg := &config.Config{}
	for i, sn := range propSubnets {
		p := config.Project{Name: fmt.Sprintf("p%d", i), Subnet: sn, Mode: "enforce", MaxConnections: 1 << 20}
		if rng.IntN(4) == 0 {
			p.Mode = "audit"
		}
		for range rng.IntN(7) {
			r := config.Rule{Ports: randomPorts(rng, ports)}
			switch rng.IntN(3) {
			case 0:
				r.Kind, r.Name = config.KindSNI, propPatterns[rng.IntN(len(propPatterns))]
			case 1:
				r.Kind, r.Name = config.KindHTTP, propPatterns[rng.IntN(len(propPatterns))]
			default:
				r.Kind, r.Prefix = config.KindCIDR, propPrefixes[rng.IntN(len(propPrefixes))]
			}
			p.Allow = append(p.Allow, r)
		}
		cfg.Projects = append(cfg.Projects, p)
	}
	return cfg
}

// randomPorts picks a non-empty subset of ports (the default ports 443 and
// 80 are never among them: a listener there would need privileges).
func randomPorts(rng *rand.Rand, ports []uint16) []uint16 {
	var out []uint16
	for _, p := range ports {
		if rng.IntN(2) == 0 {
			out = append(out, p)
		}
	}
	if len(out) == 0 {
		out = append(out, ports[rng.IntN(len(ports))])
	}
	return out
}

func randomQuery(rng *rand.Rand, ports []uint16) policy.Query {
	q := policy.Query{Dst: netip.AddrPortFrom(propDsts[rng.IntN(len(propDsts))], ports[rng.IntN(len(ports))])}
	if rng.IntN(10) == 0 {
		q.Src = propStranger
	} else {
		q.Src = propSubnets[rng.IntN(len(propSubnets))].Addr().Next().Next()
	}
	q.Bytes = []policy.Bytes{policy.BytesTLS, policy.BytesTLS, policy.BytesHTTP, policy.BytesHTTP, policy.BytesRaw, policy.BytesNone}[rng.IntN(6)]
	if q.Bytes == policy.BytesTLS || q.Bytes == policy.BytesHTTP {
		q.Name = propNames[rng.IntN(len(propNames))]
		if q.Bytes == policy.BytesTLS && rng.IntN(6) == 0 {
			q.Name = "" // a ClientHello without SNI
		}
	}
	return q
}

func renderConfig(cfg *config.Config) string {
	var b strings.Builder
	for _, p := range cfg.Projects {
		fmt.Fprintf(&b, "  %s %s %s:", p.Name, p.Subnet, p.Mode)
		for _, r := range p.Allow {
			fmt.Fprintf(&b, " [%s]", r)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// propListeners listens on propPortCount ports, each on every destination
// address; it retries when a port is taken on one of them.
func propListeners(t *testing.T) ([]uint16, []net.Listener) {
	t.Helper()
	var ports []uint16
	var lns []net.Listener
	for tries := 0; len(ports) < propPortCount; tries++ {
		if tries > 100 {
			t.Fatal("no free port on every loopback destination")
		}
		first, err := net.Listen("tcp4", netip.AddrPortFrom(propDsts[0], 0).String())
		if err != nil {
			t.Fatal(err)
		}
		port := uint16(first.Addr().(*net.TCPAddr).Port)
		group := []net.Listener{first}
		for _, a := range propDsts[1:] {
			ln, err := net.Listen("tcp4", netip.AddrPortFrom(a, port).String())
			if err != nil {
				break
			}
			group = append(group, ln)
		}
		if len(group) < len(propDsts) {
			for _, ln := range group {
				ln.Close()
			}
			continue
		}
		ports = append(ports, port)
		lns = append(lns, group...)
	}
	return ports, lns
}

// propSink accepts upstream connections, reads them to the end and closes.
func propSink(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				io.Copy(io.Discard, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// clientHello is what Go's TLS client sends first for serverName ("": no SNI).
func clientHello(t *testing.T, serverName string) []byte {
	t.Helper()
	c, s := net.Pipe()
	defer s.Close()
	go func() {
		tc := tls.Client(c, &tls.Config{ServerName: serverName, InsecureSkipVerify: true})
		tc.SetDeadline(time.Now().Add(5 * time.Second))
		tc.Handshake()
		c.Close()
	}()
	s.SetDeadline(time.Now().Add(5 * time.Second))
	hdr := make([]byte, 5) // a TLS record header: type, version, length
	if _, err := io.ReadFull(s, hdr); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[3:5]))
	if _, err := io.ReadFull(s, body); err != nil {
		t.Fatal(err)
	}
	return append(hdr, body...)
}

type notHost struct{}

func (notHost) IsHostAddr(netip.Addr) (bool, error) { return false, nil }

type fakeResolver struct{}

func (fakeResolver) Lookup(context.Context, *policy.Project, string) ([]netip.Addr, error) {
	return []netip.Addr{propPublic}, nil
}

// logCatcher is a slog.Handler keeping each access-log line's attributes
// by the connection's source address.
type logCatcher struct {
	mu    sync.Mutex
	cond  *sync.Cond
	lines map[string]map[string]string
}

func newLogCatcher() *logCatcher {
	l := &logCatcher{lines: map[string]map[string]string{}}
	l.cond = sync.NewCond(&l.mu)
	return l
}

func (l *logCatcher) Enabled(context.Context, slog.Level) bool { return true }
func (l *logCatcher) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logCatcher) WithGroup(string) slog.Handler            { return l }

func (l *logCatcher) Handle(_ context.Context, r slog.Record) error {
	m := map[string]string{}
	r.Attrs(func(a slog.Attr) bool { m[a.Key] = a.Value.String(); return true })
	l.mu.Lock()
	l.lines[m["src"]] = m // one line per connection
	l.cond.Broadcast()
	l.mu.Unlock()
	return nil
}

// wait returns the line for src, waiting up to d for it.
func (l *logCatcher) wait(src string, d time.Duration) (map[string]string, bool) {
	stop := time.AfterFunc(d, func() { l.mu.Lock(); l.cond.Broadcast(); l.mu.Unlock() })
	defer stop.Stop()
	deadline := time.Now().Add(d)
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		if m, ok := l.lines[src]; ok {
			delete(l.lines, src) // the source port may be used again
			return m, true
		}
		if !time.Now().Before(deadline) {
			return nil, false
		}
		l.cond.Wait()
	}
}
