package dns

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/time/rate"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/policy"
)

// twoProjects is a resolver for alpha (172.31.0.0/30) and beta (172.31.0.4/30).
func twoProjects(t *testing.T, up *fakeUpstream) *Resolver {
	t.Helper()
	cfg, err := config.Parse("t.yaml", []byte(`
projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: github.com
  beta:
    subnet: 172.31.0.4/30
    allow:
      - sni: github.com
`))
	if err != nil {
		t.Fatal(err)
	}
	pol, err := policy.Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r := &Resolver{Upstreams: []string{"192.0.2.53:53"}, UDP: up, TCP: up, GuestRange: cfg.VMCIDR,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	r.SetPolicy(pol)
	return r
}

var (
	alphaAddr = &net.UDPAddr{IP: net.IPv4(172, 31, 0, 2), Port: 5353}
	betaAddr  = &net.UDPAddr{IP: net.IPv4(172, 31, 0, 6), Port: 5353}
)

// malformed is a header announcing a question that is not there: the DNS
// library answers it with FORMERR itself, without calling the handler.
var malformed = []byte{0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0}

type packet struct {
	b    []byte
	from net.Addr
}

// fakeReader hands out packets, then a timeout.
type fakeReader struct{ packets []packet }

func (f *fakeReader) ReadTCP(net.Conn, time.Duration) ([]byte, error) { return nil, io.EOF }
func (f *fakeReader) ReadUDP(*net.UDPConn, time.Duration) ([]byte, *mdns.SessionUDP, error) {
	return nil, nil, io.EOF
}
func (f *fakeReader) ReadPacketConn(net.PacketConn, time.Duration) ([]byte, net.Addr, error) {
	if len(f.packets) == 0 {
		return nil, nil, os.ErrDeadlineExceeded
	}
	p := f.packets[0]
	f.packets = f.packets[1:]
	return p.b, p.from, nil
}

// TestGuardedReaderChargesBeforeParse: malformed packets count against the
// project's rate like queries do; over it, packets are dropped unread.
func TestGuardedReaderChargesBeforeParse(t *testing.T) {
	r := twoProjects(t, &fakeUpstream{})
	r.Rate, r.Burst = rate.Every(time.Hour), 5 // no refill within the test
	valid, _ := query("github.com.", mdns.TypeA).Pack()
	f := &fakeReader{}
	for i := 0; i < 5; i++ {
		f.packets = append(f.packets, packet{malformed, alphaAddr})
	}
	f.packets = append(f.packets, packet{valid, alphaAddr}, packet{valid, &net.UDPAddr{IP: net.IPv4(172, 31, 9, 2), Port: 1}}, packet{valid, betaAddr})
	g := r.guardReader(f).(mdns.PacketConnReader)
	sent := &sentPackets{}
	var got []net.Addr
	for {
		_, from, err := g.ReadPacketConn(sent, time.Second)
		if err != nil {
			break
		}
		got = append(got, from)
	}
	// Five malformed packets spend alpha's burst; its valid query and the
	// packet from no project are dropped; beta is not affected.
	if len(got) != 6 || got[4] != alphaAddr || got[5] != betaAddr {
		t.Errorf("packets passed: %v; want alpha's first five and beta's", got)
	}
	// The two refused queries get a header-only REFUSED with their ID.
	if len(sent.packets) != 2 || sent.packets[0].from != alphaAddr {
		t.Fatalf("replies to refused packets: %v", sent.packets)
	}
	var m mdns.Msg
	if err := m.Unpack(sent.packets[0].b); err != nil || m.Rcode != mdns.RcodeRefused || !m.Response || len(sent.packets[0].b) > len(valid) {
		t.Errorf("refusal %x: %v %v", sent.packets[0].b, m, err)
	}
	q := new(mdns.Msg)
	q.Unpack(valid)
	if m.Id != q.Id || m.RecursionDesired != q.RecursionDesired || m.Opcode != q.Opcode {
		t.Errorf("refusal %v does not match query %v", m.MsgHdr, q.MsgHdr)
	}
}

// sentPackets records what is written to it.
type sentPackets struct {
	net.PacketConn
	packets []packet
}

func (s *sentPackets) WriteTo(b []byte, a net.Addr) (int, error) {
	s.packets = append(s.packets, packet{append([]byte(nil), b...), a})
	return len(b), nil
}

func TestRefusalOnlyForQueries(t *testing.T) {
	if refusal(malformed[:11]) != nil {
		t.Error("refusal of a short packet")
	}
	resp := append([]byte(nil), malformed...)
	resp[2] |= 0x80
	if refusal(resp) != nil {
		t.Error("refusal of a response")
	}
}

// rewriter is a PacketConn that shows datagrams from the test's two client
// sockets as coming from alpha's and beta's guest addresses.
type rewriter struct {
	net.PacketConn
	mu   sync.Mutex
	real map[string]*net.UDPAddr // guest address -> client socket
	as   map[string]*net.UDPAddr // client socket -> guest address
}

func (w *rewriter) ReadFrom(b []byte) (int, net.Addr, error) {
	n, a, err := w.PacketConn.ReadFrom(b)
	if err != nil {
		return n, a, err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if g, ok := w.as[a.String()]; ok {
		return n, g, nil
	}
	return n, a, nil
}

func (w *rewriter) WriteTo(b []byte, a net.Addr) (int, error) {
	w.mu.Lock()
	real, ok := w.real[a.String()]
	w.mu.Unlock()
	if ok {
		a = real
	}
	return w.PacketConn.WriteTo(b, a)
}

// TestServeChargesMalformedQueries: through the real server, malformed
// packets spend the project's budget before the library parses them.
func TestServeChargesMalformedQueries(t *testing.T) {
	up := &fakeUpstream{rrs: map[string][]string{"github.com. A": {"github.com. 60 IN A 140.82.112.3"}}}
	r := twoProjects(t, up)
	r.Rate, r.Burst = rate.Every(time.Hour), 5
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a, _ := net.DialUDP("udp4", nil, pc.LocalAddr().(*net.UDPAddr))
	b, _ := net.DialUDP("udp4", nil, pc.LocalAddr().(*net.UDPAddr))
	defer a.Close()
	defer b.Close()
	rw := &rewriter{PacketConn: pc,
		real: map[string]*net.UDPAddr{alphaAddr.String(): a.LocalAddr().(*net.UDPAddr), betaAddr.String(): b.LocalAddr().(*net.UDPAddr)},
		as:   map[string]*net.UDPAddr{a.LocalAddr().String(): alphaAddr, b.LocalAddr().String(): betaAddr}}
	stop := r.Serve(rw, ln)
	defer stop()

	for i := 0; i < 5; i++ {
		a.Write(malformed)
	}
	// Beta's answer comes after alpha's packets were read (one reader, in
	// order): by then they were charged.
	valid, _ := query("github.com.", mdns.TypeA).Pack()
	b.Write(valid)
	b.SetReadDeadline(time.Now().Add(10 * time.Second)) // a hang guard, not a measurement
	buf := make([]byte, 512)
	n, err := b.Read(buf)
	var resp mdns.Msg
	if err != nil || resp.Unpack(buf[:n]) != nil || len(resp.Answer) != 1 {
		t.Fatalf("beta's query: %v %v", err, resp.Answer)
	}
	if tok := r.limiter("alpha").Tokens(); tok >= 1 {
		t.Errorf("alpha has %.0f of 5 tokens left after 5 malformed packets; want 0", tok)
	}
}

// fakeConn is an accepted connection from an address.
type fakeConn struct {
	net.Conn
	from   net.Addr
	mu     sync.Mutex
	closed bool
}

func (c *fakeConn) RemoteAddr() net.Addr { return c.from }
func (c *fakeConn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	return nil
}
func (c *fakeConn) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// fakeListener hands out queued connections or errors; empty, it is closed.
type fakeListener struct {
	net.Listener
	queue []any // net.Conn or error
}

func (l *fakeListener) Accept() (net.Conn, error) {
	if len(l.queue) == 0 {
		return nil, net.ErrClosed
	}
	x := l.queue[0]
	l.queue = l.queue[1:]
	if err, ok := x.(error); ok {
		return nil, err
	}
	return x.(net.Conn), nil
}
func (l *fakeListener) Close() error { return nil }

// TestGuardedListenerCapsProjects: a project's connections over the cap are
// closed at once; another project still gets in; a closed slot is reused.
func TestGuardedListenerCapsProjects(t *testing.T) {
	r := twoProjects(t, &fakeUpstream{})
	r.Rate, r.Burst = 1e6, 1e6 // the cap, not the rate, is under test
	fl := &fakeListener{}
	var alphas []*fakeConn
	for i := 0; i < MaxTCPConnsPerProject+4; i++ {
		c := &fakeConn{from: &net.TCPAddr{IP: alphaAddr.IP, Port: 1000 + i}}
		alphas = append(alphas, c)
		fl.queue = append(fl.queue, c)
	}
	beta := &fakeConn{from: &net.TCPAddr{IP: betaAddr.IP, Port: 1}}
	fl.queue = append(fl.queue, beta)
	l := r.guardListener(fl)
	var admitted []net.Conn
	for i := 0; i <= MaxTCPConnsPerProject; i++ {
		c, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		admitted = append(admitted, c)
	}
	if admitted[MaxTCPConnsPerProject].RemoteAddr() != beta.from {
		t.Errorf("after %d of alpha's, accepted %v; want beta's", MaxTCPConnsPerProject, admitted[MaxTCPConnsPerProject].RemoteAddr())
	}
	for i, c := range alphas {
		if over := i >= MaxTCPConnsPerProject; c.isClosed() != over {
			t.Errorf("alpha's connection %d: closed %v", i+1, c.isClosed())
		}
	}
	if n := l.openConns("alpha"); n != MaxTCPConnsPerProject {
		t.Errorf("alpha holds %d", n)
	}
	admitted[0].Close()
	admitted[0].Close() // twice: the slot is given back once
	next := &fakeConn{from: &net.TCPAddr{IP: alphaAddr.IP, Port: 2000}}
	over := &fakeConn{from: &net.TCPAddr{IP: alphaAddr.IP, Port: 2001}}
	fl.queue = append(fl.queue, next, over)
	if c, err := l.Accept(); err != nil || c.RemoteAddr() != next.from {
		t.Fatalf("after a close: %v, %v", c, err)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) || !over.isClosed() {
		t.Errorf("over the cap again: %v, closed %v", err, over.isClosed())
	}
}

// TestGuardedListenerWaitsOutAcceptErrors: EMFILE and other accept errors
// pause and retry (doubling pauses); only a closed listener ends Accept.
func TestGuardedListenerWaitsOutAcceptErrors(t *testing.T) {
	r := twoProjects(t, &fakeUpstream{})
	emfile := &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	c := &fakeConn{from: &net.TCPAddr{IP: alphaAddr.IP, Port: 1}}
	fl := &fakeListener{queue: []any{emfile, emfile, errors.New("something else"), c}}
	l := r.guardListener(fl)
	var waits []time.Duration
	l.backoff.wait = func(d time.Duration, _ <-chan struct{}) { waits = append(waits, d) }
	got, err := l.Accept()
	if err != nil || got.RemoteAddr() != c.from {
		t.Fatalf("Accept after errors: %v, %v", got, err)
	}
	if want := []time.Duration{minBackoff, 2 * minBackoff, 4 * minBackoff}; !slices.Equal(waits, want) {
		t.Errorf("pauses %v, want %v", waits, want)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("closed listener: %v", err)
	}
}
