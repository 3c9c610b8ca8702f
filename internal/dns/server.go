package dns

import (
	"errors"
	"net"
	"sync"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/time/rate"
)

// Limits of the resolver's TCP side. Guests reach it on TCP port 53 (DNS
// over TCP, for the odd truncated answer): a handful of connections is all a
// sandbox needs, and each one holds a descriptor of the daemon, which the
// data plane of every project shares.
const (
	// MaxTCPConnsPerProject caps one project's open TCP connections to the
	// resolver; more are closed as soon as they are accepted.
	MaxTCPConnsPerProject = 16
	// MaxTCPConns caps them over all projects (a few dozen busy projects).
	MaxTCPConns = 512
	// TCPFirstQueryTimeout bounds the wait for a connection's first query
	// and TCPIdleTimeout the wait between queries (RFC 7766 §6.2.3 asks for
	// seconds, not minutes, when a server is under load).
	TCPFirstQueryTimeout = 2 * time.Second
	TCPIdleTimeout       = 2 * time.Second
	// MaxTCPQueries ends a connection after this many queries.
	MaxTCPQueries = 128
)

// Accept and read errors other than a closed socket are retried after a
// pause that doubles from minBackoff to maxBackoff (as net/http's server
// does): running out of descriptors (EMFILE) must slow the resolver down,
// never stop it.
const (
	minBackoff = 5 * time.Millisecond
	maxBackoff = time.Second
)

// warnEvery spaces a project's "over the limit" warnings (one line per
// refused packet would let a guest flood the log too).
const warnEvery = 10 * time.Second

// errOverLimit ends a TCP connection whose query is over its project's rate.
var errOverLimit = errors.New("query over the project's rate limit")

// Serve answers queries on pc (UDP) and ln (TCP) until the returned stop is
// called. Every packet and every connection is charged to its project's rate
// limit before it is parsed, so malformed queries count too; a project's TCP
// connections are capped (MaxTCPConnsPerProject) and closed when idle; and
// errors from accept are waited out, never the end of serving. Errors that do
// end a server are logged.
func (r *Resolver) Serve(pc net.PacketConn, ln net.Listener) (stop func()) {
	gl := r.guardListener(ln)
	udp := &mdns.Server{PacketConn: pc, Handler: r, DecorateReader: r.guardReader}
	tcp := &mdns.Server{Listener: gl, Handler: r, DecorateReader: r.guardReader,
		ReadTimeout: TCPFirstQueryTimeout, IdleTimeout: func() time.Duration { return TCPIdleTimeout },
		MaxTCPQueries: MaxTCPQueries}
	var wg sync.WaitGroup
	stopping := make(chan struct{})
	for _, s := range []*mdns.Server{udp, tcp} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.ActivateAndServe(); err != nil {
				select {
				case <-stopping:
				default:
					r.Log.Error("resolver stopped serving", "err", err)
				}
			}
		}()
	}
	return func() {
		close(stopping)
		udp.Shutdown()
		tcp.Shutdown()
		wg.Wait()
	}
}

// admit charges one packet or connection from src to its project's rate
// limit; it reports the project and whether to go on.
func (r *Resolver) admit(src net.Addr) (string, bool) {
	pr := r.policy.Load().ProjectFor(addrOf(src))
	if pr == nil {
		return "", false // the firewall lets only guests reach the resolver
	}
	if r.limiter(pr.Name).Allow() {
		return pr.Name, true
	}
	r.Metrics.DNSQuery(pr.Name, "rate_limited")
	if r.warnLimiter(pr.Name).Allow() {
		r.Log.Warn("dns packets over the project's rate limit are dropped", "project", pr.Name, "src", addrOf(src).String())
	}
	return pr.Name, false
}

func (r *Resolver) warnLimiter(project string) *rate.Limiter {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.warned == nil {
		r.warned = map[string]*rate.Limiter{}
	}
	l := r.warned[project]
	if l == nil {
		l = rate.NewLimiter(rate.Every(warnEvery), 1)
		r.warned[project] = l
	}
	return l
}

// backoff waits d, doubled for the next call, unless done is closed first.
type backoff struct {
	d time.Duration
	// wait sleeps (zero: a timer); tests replace it.
	wait func(d time.Duration, done <-chan struct{})
}

func (b *backoff) pause(done <-chan struct{}) {
	if b.d == 0 {
		b.d = minBackoff
	} else {
		b.d = min(2*b.d, maxBackoff)
	}
	if b.wait != nil {
		b.wait(b.d, done)
		return
	}
	t := time.NewTimer(b.d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-done:
	}
}

func (b *backoff) reset() { b.d = 0 }

// retryable reports whether a socket error is worth waiting out: not a
// closed socket (shutdown) and not a deadline (the server's own wake-up).
func retryable(err error) bool {
	var ne net.Error
	return !errors.Is(err, net.ErrClosed) && !(errors.As(err, &ne) && ne.Timeout())
}

// guardReader is the mdns.DecorateReader of both servers: it charges each
// message to its project before the library parses it.
func (r *Resolver) guardReader(inner mdns.Reader) mdns.Reader {
	pcr, _ := inner.(mdns.PacketConnReader)
	return &guardedReader{r: r, inner: inner, pc: pcr}
}

type guardedReader struct {
	r       *Resolver
	inner   mdns.Reader
	pc      mdns.PacketConnReader
	backoff backoff
}

// ReadTCP returns the connection's next message, or an error that ends the
// connection when it is over the project's rate.
func (g *guardedReader) ReadTCP(conn net.Conn, timeout time.Duration) ([]byte, error) {
	m, err := g.inner.ReadTCP(conn, timeout)
	if err != nil {
		return nil, err
	}
	if _, ok := g.r.admit(conn.RemoteAddr()); !ok {
		return nil, errOverLimit
	}
	return m, nil
}

// refusal is the REFUSED answer to a query over its project's rate, built
// from the header alone (nothing else is parsed): the query's ID, opcode and
// RD flag, no sections, so never larger than the query. Nil for a packet
// that is not a query (too short, or a response: answering those could loop).
func refusal(m []byte) []byte {
	const headerLen, qr, opcodeRD, ra, refused = 12, 0x80, 0x79, 0x80, 5
	if len(m) < headerLen || m[2]&qr != 0 {
		return nil
	}
	return []byte{m[0], m[1], qr | m[2]&opcodeRD, ra | refused, 0, 0, 0, 0, 0, 0, 0, 0}
}

// ReadUDP returns the next datagram within its project's rate; others get a
// header-only REFUSED (no amplification: guests cannot spoof their source).
func (g *guardedReader) ReadUDP(conn *net.UDPConn, timeout time.Duration) ([]byte, *mdns.SessionUDP, error) {
	for {
		m, s, err := g.inner.ReadUDP(conn, timeout)
		if err != nil {
			if retryable(err) {
				g.r.Log.Warn("reading a dns datagram; retrying", "err", err)
				g.backoff.pause(nil)
				continue
			}
			return nil, nil, err
		}
		g.backoff.reset()
		if _, ok := g.r.admit(s.RemoteAddr()); ok {
			return m, s, nil
		}
		if b := refusal(m); b != nil {
			mdns.WriteToSessionUDP(conn, b, s)
		}
	}
}

// ReadPacketConn is ReadUDP for sockets other than *net.UDPConn.
func (g *guardedReader) ReadPacketConn(conn net.PacketConn, timeout time.Duration) ([]byte, net.Addr, error) {
	if g.pc == nil {
		return nil, nil, errors.New("the dns reader cannot read a net.PacketConn")
	}
	for {
		m, a, err := g.pc.ReadPacketConn(conn, timeout)
		if err != nil {
			if retryable(err) {
				g.r.Log.Warn("reading a dns datagram; retrying", "err", err)
				g.backoff.pause(nil)
				continue
			}
			return nil, nil, err
		}
		g.backoff.reset()
		if _, ok := g.r.admit(a); ok {
			return m, a, nil
		}
		if b := refusal(m); b != nil {
			conn.WriteTo(b, a)
		}
	}
}

// guardedListener admits TCP connections within their project's cap and
// rate, and waits out accept errors.
type guardedListener struct {
	net.Listener
	r       *Resolver
	backoff backoff
	done    chan struct{}
	once    sync.Once

	mu    sync.Mutex
	open  map[string]int // project -> open connections
	total int
}

func (r *Resolver) guardListener(ln net.Listener) *guardedListener {
	return &guardedListener{Listener: ln, r: r, done: make(chan struct{}), open: map[string]int{}}
}

// Accept returns the next admitted connection. It returns an error only when
// the listener is closed.
func (l *guardedListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			select {
			case <-l.done:
				return nil, err
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return nil, err
			}
			l.r.Log.Warn("accepting a dns connection; retrying", "err", err)
			l.backoff.pause(l.done)
			continue
		}
		l.backoff.reset()
		if gc := l.admit(c); gc != nil {
			return gc, nil
		}
		c.Close()
	}
}

// admit counts c against its project's cap and rate; nil: refused.
func (l *guardedListener) admit(c net.Conn) net.Conn {
	project, ok := l.r.admit(c.RemoteAddr())
	if !ok {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[project] >= MaxTCPConnsPerProject || l.total >= MaxTCPConns {
		l.r.Metrics.DNSQuery(project, "conn_limited")
		if l.r.warnLimiter(project).Allow() {
			l.r.Log.Warn("dns tcp connections over the cap are closed", "project", project,
				"project_open", l.open[project], "cap", MaxTCPConnsPerProject, "total_open", l.total)
		}
		return nil
	}
	l.open[project]++
	l.total++
	return &countedConn{Conn: c, release: func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.open[project]--
		l.total--
	}}
}

// Close closes the listener and ends a pending backoff.
func (l *guardedListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// openConns returns project's open connections (for tests).
func (l *guardedListener) openConns(project string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open[project]
}

// countedConn gives its slot back once, on the first Close.
type countedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *countedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}
