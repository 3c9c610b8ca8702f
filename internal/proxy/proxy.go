// Package proxy is the builtin data plane: a transparent (TPROXY) TCP proxy
// that peeks at the TLS ClientHello, asks the policy, and either splices the
// connection to its destination or refuses it.
//
// The original destination of a TPROXY'd connection is the accepted socket's
// local address. The proxy's upstream sockets carry a mark (SO_MARK) that the
// interception skips, and it never dials the host's own addresses.
package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmegress/vmegress/internal/dest"
	"github.com/vmegress/vmegress/internal/metrics"
	"github.com/vmegress/vmegress/internal/policy"
)

// Defaults for the zero values of Proxy's fields.
const (
	DefaultHelloTimeout = 10 * time.Second
	DefaultDialTimeout  = 10 * time.Second
)

// AddrChecker says whether an address belongs to the host itself (any local,
// broadcast or multicast address, loopback included).
type AddrChecker interface {
	IsHostAddr(netip.Addr) (bool, error)
}

// Resolver resolves a name for the data plane's own dialing, filtered by the
// project's policy (the allowlist resolver's Lookup).
type Resolver interface {
	Lookup(ctx context.Context, pr *policy.Project, name string) ([]netip.Addr, error)
}

// Proxy is the builtin data plane. Set the fields, then call Serve.
type Proxy struct {
	// Policy decides every connection; swap it with SetPolicy.
	policy atomic.Pointer[policy.Policy]

	// GuestRange is never dialled: guests do not reach each other.
	GuestRange netip.Prefix
	// Dial dials upstream; it must mark its sockets with the upstream mark.
	// Zero: a plain net.Dialer (only for tests outside TPROXY).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// HostAddrs tells the host's own addresses apart. Required.
	HostAddrs AddrChecker
	// Answers holds what the resolver gave each project; an original
	// destination found there for the same name is dialled as is.
	Answers *dest.Answers
	// Resolver resolves names whose original destination is not vetted.
	// Required unless OriginalDst.
	Resolver Resolver
	// OriginalDst dials the guest's original destination on the strength of
	// the name alone (the spec's behaviour; open to SNI spoofing).
	OriginalDst bool
	// Log is the daemon's log; AccessLog gets one line per connection.
	Log       *slog.Logger
	AccessLog *slog.Logger
	// Metrics counts verdicts and bytes (may be nil).
	Metrics *metrics.Metrics
	// HelloTimeout bounds the wait for a ClientHello or request head (zero:
	// DefaultHelloTimeout).
	HelloTimeout time.Duration
	// Now is the clock (zero: time.Now).
	Now func() time.Time
	// MaxConns caps the proxied connections open at once, all projects
	// together, so that load can never take the descriptors the listener
	// and the rest of the daemon need (zero: (RLIMIT_NOFILE - 256) / 2).
	MaxConns int
	// OpenSpare opens the descriptor kept spare for when accept runs out
	// of them (zero: opens /dev/null).
	OpenSpare func() (io.Closer, error)
	// Termination terminates TLS for https rules and reads plain-HTTP
	// requests for http rules with methods, paths or inject (terminate.go;
	// nil: such connections are refused).
	Termination *Termination

	// idleAfter: a spliced direction parks after this long without a byte
	// (zero: defaultIdleAfter; tests shorten it). parked is Serve's
	// parking set.
	idleAfter time.Duration
	parked    atomic.Pointer[parking]
	// pool keeps terminated connections' upstream connections (pool.go).
	pool termPool
	// term serves terminated connections (terminate.go).
	term termServers

	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[*net.TCPConn]*entry
	// drop is SetPolicy's last drop (under mu).
	drop bool
	// open counts proxied connections against MaxConns; overBurst the
	// resets since the count was last zero (the daemon's log says the
	// first).
	open, overBurst atomic.Int64
	active          sync.Map // project name → *atomic.Int64
}

// SetPolicy swaps the policy new connections are decided by. With drop,
// established connections that pol refuses are closed (their log line says
// why); the ones it allows are never disturbed. It returns how many closed.
//
// A connection still being inspected is decided by the policy current when
// its ClientHello or request head has come, not by the one of its accept:
// handle loads the policy again then, and compares it under p.mu when the
// connection becomes established, so no change slips between the two.
func (p *Proxy) SetPolicy(pol *policy.Policy, drop bool) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.policy.Store(pol)
	p.drop = drop
	p.pool.policyChanged(pol, drop)
	if !drop {
		return 0
	}
	closed := 0
	for c, e := range p.conns {
		if e == nil || !e.established.Load() {
			continue
		}
		d := redecide(pol, e)
		if d.Verdict == policy.Allow {
			continue
		}
		e.revoked.Store(true)
		closeConn(c, e)
		closed++
	}
	return closed
}

// redecide decides an established connection again under pol, in its
// project's mode: an audit project's connections are never refused.
func redecide(pol *policy.Policy, e *entry) policy.Decision {
	if pr := pol.ProjectFor(e.src.Addr()); pr != nil && pr.Audit {
		return policy.Decision{Verdict: policy.Allow, Project: pr.Name}
	}
	d, in := pol.ConnectWith(e.src.Addr(), e.dst, e.resolvedNames)
	if in == policy.InspectNone || d.Verdict == policy.Allow {
		return d
	}
	return pol.Decide(policy.Facts{Src: e.src.Addr(), Dst: e.dst, Kind: e.kind, Name: e.name})
}

// Active returns the number of open connections of a project.
func (p *Proxy) Active(project string) int64 {
	if v, ok := p.active.Load(project); ok {
		return v.(*atomic.Int64).Load()
	}
	return 0
}

func (p *Proxy) counter(project string) *atomic.Int64 {
	v, _ := p.active.LoadOrStore(project, new(atomic.Int64))
	return v.(*atomic.Int64)
}

func (p *Proxy) now() time.Time {
	if p.Now != nil {
		return p.Now()
	}
	return time.Now()
}

func (p *Proxy) helloTimeout() time.Duration {
	if p.HelloTimeout > 0 {
		return p.HelloTimeout
	}
	return DefaultHelloTimeout
}

func (p *Proxy) dial(ctx context.Context, addr string) (net.Conn, error) {
	if p.Dial != nil {
		return p.Dial(ctx, "tcp", addr)
	}
	d := net.Dialer{Timeout: DefaultDialTimeout}
	return d.DialContext(ctx, "tcp", addr)
}

// Serve accepts connections from ln until ctx ends or ln is closed. It
// closes ln when ctx ends and returns once every connection handler has
// finished. Accept errors never end it: out of descriptors (EMFILE, ENFILE)
// it frees its spare descriptor to take the pending connection, and on any
// error it backs off (5 ms doubling to 1 s, as net/http does) and goes on.
// Beyond the proxied-connection cap (MaxConns) new connections are reset.
func (p *Proxy) Serve(ctx context.Context, ln net.Listener) error {
	if p.HostAddrs == nil || p.policy.Load() == nil {
		return errors.New("starting proxy: HostAddrs and a policy are required")
	}
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		p.closeAll()
	})
	defer stop()
	limit := p.maxConns()
	// Idle spliced connections park here (nil: they keep their goroutines).
	idle := p.idleAfter
	if idle <= 0 {
		idle = defaultIdleAfter
	}
	pk, perr := newParking(idle)
	p.parked.Store(pk)
	if perr != nil {
		p.log().Warn("idle connections will each hold two goroutines", "err", perr)
	}
	spare, serr := p.openSpare()
	if serr != nil {
		p.log().Warn("opening the proxy's spare descriptor; running out of descriptors will stall accepting until some close", "err", serr)
	}
	defer func() {
		if spare != nil {
			spare.Close()
		}
	}()
	var err error
	var backoff time.Duration
	failures, shed := 0, false
	for {
		c, aerr := ln.Accept()
		if aerr != nil {
			if ctx.Err() != nil {
				break
			}
			if errors.Is(aerr, net.ErrClosed) {
				err = fmt.Errorf("accepting connections: %w", aerr)
				break
			}
			if failures == 0 {
				p.log().Error("accepting connections failed; retrying with back-off", "err", aerr)
			}
			failures++
			if (errors.Is(aerr, syscall.EMFILE) || errors.Is(aerr, syscall.ENFILE)) && spare != nil {
				// Free a descriptor to take the pending connection at once.
				spare.Close()
				spare, shed = nil, true
				continue
			}
			backoff = min(max(2*backoff, acceptBackoffMin), acceptBackoffMax)
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
			continue
		}
		if failures > 0 {
			p.log().Info("accepting connections again", "failures", failures)
			failures, backoff = 0, 0
		}
		tc, ok := c.(*net.TCPConn)
		if !ok {
			c.Close()
			continue
		}
		if shed {
			var serr error
			if spare, serr = p.openSpare(); serr != nil {
				// The descriptor taken was the spare's: reset the
				// connection to have one again.
				p.resetOver(tc, "no file descriptor left (EMFILE/ENFILE)")
				spare, _ = p.openSpare()
				shed = spare == nil
				continue
			}
			shed = false
		}
		if p.open.Load() >= int64(limit) {
			p.resetOver(tc, fmt.Sprintf("the proxy's connection cap (%d, from the descriptor limit) is reached", limit))
			continue
		}
		p.open.Add(1)
		e := &entry{start: p.now(), src: addrPort(tc.RemoteAddr()), dst: addrPort(tc.LocalAddr())}
		p.track(tc, e)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			if !p.handle(ctx, pk, tc, e) {
				p.track(tc, nil)
			}
		}()
	}
	p.wg.Wait()
	if pk != nil {
		pk.close()
	}
	return err
}

// Accept back-off bounds (net/http's) and the descriptors kept for all but
// proxied connections (resolver, API, logs, Envoy's xDS, the spare).
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
	fdReserve        = 256
)

// connCapFor is the proxied-connection cap for a descriptor limit: each
// connection costs two descriptors (guest side and upstream).
func connCapFor(nofile uint64) int {
	if nofile <= 2*fdReserve {
		return max(int(nofile)/4, 1)
	}
	return int((nofile - fdReserve) / 2)
}

func (p *Proxy) maxConns() int {
	if p.MaxConns > 0 {
		return p.MaxConns
	}
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return 1 << 20 // unknown: EMFILE handling still holds
	}
	return connCapFor(lim.Cur)
}

// openSpare opens the spare descriptor (nil with the error).
func (p *Proxy) openSpare() (io.Closer, error) {
	if p.OpenSpare != nil {
		c, err := p.OpenSpare()
		if err != nil {
			return nil, err
		}
		return c, nil
	}
	f, err := os.Open(os.DevNull)
	if err != nil {
		return nil, fmt.Errorf("opening %s as a spare descriptor: %w", os.DevNull, err)
	}
	return f, nil
}

// resetOver resets a connection refused before it is handled, and logs it
// (its access-log line, and the daemon's log once per burst).
func (p *Proxy) resetOver(c *net.TCPConn, reason string) {
	e := &entry{start: p.now(), src: addrPort(c.RemoteAddr()), dst: addrPort(c.LocalAddr()),
		d: policy.Decision{Verdict: policy.Deny, Reason: "connection reset: " + reason}}
	if pr := p.policy.Load().ProjectFor(e.src.Addr()); pr != nil {
		e.d.Project = pr.Name
	}
	if p.overBurst.Add(1) == 1 {
		p.log().Warn("resetting new connections", "reason", reason)
	}
	p.refuse(c, e, refuseReset)
}

func (p *Proxy) log() *slog.Logger {
	if p.Log != nil {
		return p.Log
	}
	return slog.New(slog.DiscardHandler)
}

// track registers c's entry (nil: forget c).
func (p *Proxy) track(c *net.TCPConn, e *entry) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns == nil {
		p.conns = map[*net.TCPConn]*entry{}
	}
	if e != nil {
		p.conns[c] = e
		return
	}
	if _, ok := p.conns[c]; ok {
		delete(p.conns, c)
		if p.open.Add(-1) == 0 {
			p.overBurst.Store(0) // the next reset starts a new burst
		}
	}
}

func (p *Proxy) closeAll() {
	p.pool.closeAll()
	p.mu.Lock()
	defer p.mu.Unlock()
	for c, e := range p.conns {
		closeConn(c, e)
	}
}

// entry is one access-log line being built.
type entry struct {
	start    time.Time
	src, dst netip.AddrPort
	name     string // TLS server name or HTTP host
	kind     policy.Kind
	d        policy.Decision
	up, down int64
	upstream string
	// resolved are the names the resolver had handed the destination's
	// address to the project for when the connection was decided (tcp
	// rules); a policy change decides it again with these, not with what
	// has expired since.
	resolved []string
	// established is set once splicing starts; revoked when a policy
	// change closed the connection.
	established, revoked atomic.Bool
	// kill closes a relayed connection (its halves may be parked, with no
	// goroutine to see the close); nil: closing the guest's socket ends it.
	// Set under Proxy.mu.
	kill func()
}

// closeConn closes a tracked connection (under p.mu).
func closeConn(c *net.TCPConn, e *entry) {
	if e != nil && e.kill != nil {
		e.kill()
		return
	}
	c.Close()
}

// resolvedNames is a policy.Resolved giving the names recorded in e.
func (e *entry) resolvedNames(string, netip.Addr) []string { return e.resolved }

// resolvedFor is a policy.Resolved reading the resolver's record (what it
// handed the project, unexpired) and keeping the names in e.
func (p *Proxy) resolvedFor(e *entry) policy.Resolved {
	return func(project string, a netip.Addr) []string {
		if p.Answers == nil {
			return nil
		}
		e.resolved = p.Answers.Names(project, a)
		return e.resolved
	}
}

func (p *Proxy) logEntry(e *entry) {
	if e.revoked.Load() {
		e.d.Reason = "closed: the new policy no longer allows it"
		e.d.Verdict = "revoked"
	}
	p.Metrics.Connection(e.d.Project, string(e.d.Verdict))
	p.Metrics.Denied(e.d.Project, string(e.d.Verdict), e.name, e.dst.Port())
	if e.up > 0 || e.down > 0 {
		p.Metrics.Bytes(e.d.Project, e.up, e.down)
	}
	if p.AccessLog == nil {
		return
	}
	attrs := []slog.Attr{
		slog.String("project", e.d.Project),
		slog.String("src", e.src.String()),
		slog.String("dst", e.dst.String()),
		slog.String("sni", nameIf(e, policy.KindTLS)),
		slog.String("host", nameIf(e, policy.KindHTTP)),
		slog.String("verdict", string(e.d.Verdict)),
		slog.String("rule", e.d.Rule),
		slog.String("reason", e.d.Reason),
		slog.Int64("bytes_up", e.up),
		slog.Int64("bytes_down", e.down),
		slog.Float64("duration_ms", float64(p.now().Sub(e.start).Microseconds())/1000),
	}
	if e.upstream != "" {
		attrs = append(attrs, slog.String("upstream", e.upstream))
	}
	if len(e.resolved) > 0 {
		// The names the resolver handed the destination out for (tcp rules).
		attrs = append(attrs, slog.String("resolved", strings.Join(e.resolved, ",")))
	}
	// Handed to the handler directly: Logger.LogAttrs would look up the
	// caller's program counter for every line, and no line logs it.
	r := slog.NewRecord(time.Now(), slog.LevelInfo, "connection", 0) // as Logger's
	r.AddAttrs(attrs...)
	if h := p.AccessLog.Handler(); h.Enabled(context.Background(), slog.LevelInfo) {
		h.Handle(context.Background(), r)
	}
}

func nameIf(e *entry, k policy.Kind) string {
	if e.kind == k {
		return e.name
	}
	return ""
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// Verdicts beyond policy's.
const (
	// verdictError: the policy allowed it but it could not be done.
	verdictError policy.Verdict = "error"
	// WouldDeny: a project in audit mode let through what enforce would refuse.
	WouldDeny policy.Verdict = "would_deny"
)

// refusal is how a denial is shown to the client.
type refusal int

const (
	refuseReset refusal = iota // TCP RST
	refuseTLS                  // TLS alert access_denied, then close
	refuseHTTP                 // HTTP 403 with the reason, then close
)

// handle decides one connection and refuses it, or connects it and hands it
// to two copying goroutines (it returns true then: they finish the entry).
// The handler's stack grew deep in parsing and dialling; letting it end
// while fresh, small goroutines carry the long idle life of the connection
// is what keeps memory per connection low.
func (p *Proxy) handle(ctx context.Context, pk *parking, c *net.TCPConn, e *entry) (detached bool) {
	pol := p.policy.Load()
	d, inspect := pol.ConnectWith(e.src.Addr(), e.dst, p.resolvedFor(e))
	e.d = d
	pr := pol.ProjectFor(e.src.Addr())
	if pr == nil {
		p.refuse(c, e, refuseReset)
		return
	}
	n := p.counter(pr.Name)
	if n.Add(1) > int64(pr.MaxConnections) {
		n.Add(-1)
		e.d = policy.Decision{Verdict: policy.Deny, Project: pr.Name, Reason: fmt.Sprintf("project connection limit (%d) reached", pr.MaxConnections)}
		p.refuse(c, e, refuseReset)
		return
	}
	counted := pr.Name // pr may change below; the count stays with it
	p.Metrics.Active(counted, 1)
	release := func() { n.Add(-1); p.Metrics.Active(counted, -1) }
	defer func() {
		if !detached {
			release()
		}
	}()

	var prefix []byte
	how := refuseReset
	if inspect != policy.InspectNone {
		var facts policy.Facts
		facts, prefix, how = p.inspect(ctx, c, inspect, e)
		e.name, e.kind = facts.Name, facts.Kind
		// The hello may have taken seconds: decide by the policy of now.
		reason := e.d.Reason
		pol = p.policy.Load()
		e.d, inspect = pol.ConnectWith(e.src.Addr(), e.dst, p.resolvedFor(e))
		if facts.Kind == policy.KindNone && inspect != policy.InspectNone && reason != "" {
			e.d.Reason = reason // what inspection found wrong
		}
		if pr = pol.ProjectFor(e.src.Addr()); pr == nil {
			p.refuse(c, e, how)
			return
		}
		if inspect != policy.InspectNone && facts.Kind != policy.KindNone {
			e.d = pol.Decide(facts)
		}
	}
	if e.d.Verdict != policy.Allow && pr.Audit {
		// Audit: let it through, log what enforcement would have done.
		e.d.Verdict = WouldDeny
	}
	if e.d.Verdict != policy.Allow && e.d.Verdict != WouldDeny {
		p.refuse(c, e, how)
		return
	}
	byAddress := inspect == policy.InspectNone || e.name == ""
	target, reason := p.target(ctx, pr, e.name, e.dst, byAddress)
	if reason != "" && e.d.Verdict == WouldDeny && !byAddress {
		// In audit, a name that cannot be vetted still goes where the
		// guest asked, within the always-denied rules.
		target, reason = e.dst, p.checkDst(pr, e.dst.Addr(), e.dst.Port())
	}
	if reason != "" {
		e.d = policy.Decision{Verdict: policy.Deny, Project: pr.Name, Rule: e.d.Rule, Reason: reason}
		p.refuse(c, e, how)
		return
	}
	if p.terminates(pr, e, inspect) {
		// Each request is decided and forwarded on its own (terminate.go).
		return p.serveTerminated(ctx, c, e, prefix, target, release)
	}
	dctx, cancel := context.WithTimeout(ctx, DefaultDialTimeout)
	up, err := p.dial(dctx, target.String())
	cancel()
	if err != nil {
		e.d.Verdict, e.d.Reason = verdictError, fmt.Sprintf("dialing upstream %s: %v", target, err)
		p.refuse(c, e, how)
		return
	}
	e.upstream = target.String()
	// Plain HTTP is forwarded request by request (every request head must
	// name the allowed host); anything else is spliced after its prefix.
	http := e.kind == policy.KindHTTP && e.name != ""
	if !http {
		if _, err := up.Write(prefix); err != nil {
			up.Close()
			e.d.Verdict, e.d.Reason = verdictError, fmt.Sprintf("sending the request upstream: %v", err)
			p.refuse(c, e, refuseReset)
			return
		}
		e.up = int64(len(prefix))
	}
	// finish ends the connection once both directions have: called with
	// the bytes each moved.
	finish := func(upBytes, downBytes int64) {
		up.Close()
		c.Close()
		e.up += upBytes
		e.down = downBytes
		release()
		p.track(c, nil)
		p.logEntry(e)
	}
	// Anything but plain HTTP is relayed by splicing (copy.go); its halves
	// park while idle, so closing it goes through the relay.
	var r *relay
	if tup, ok := up.(*net.TCPConn); ok && !http {
		r, err = newRelay(pk, c, tup, func(upBytes, downBytes int64) {
			defer p.wg.Add(-2)
			finish(upBytes, downBytes)
		})
		if err != nil {
			r = nil // copied by copyHalf below
		}
	}
	// A policy change since pol was loaded did not see this connection
	// established: decide it again here, as SetPolicy would have.
	p.mu.Lock()
	e.established.Store(true)
	if r != nil {
		e.kill = r.close
	}
	cur, drop := p.policy.Load(), p.drop
	p.mu.Unlock()
	if cur != pol && drop && redecide(cur, e).Verdict != policy.Allow {
		e.revoked.Store(true)
		closeConn(c, e)
		up.Close()
	}
	p.wg.Add(2)
	if r != nil {
		r.start()
		return true
	}
	// Two goroutines, one a direction; the second to end finishes.
	var left atomic.Int32
	left.Store(2)
	var upBytes, downBytes int64
	one := func() {
		if left.Add(-1) == 0 {
			finish(upBytes, downBytes)
		}
	}
	if http {
		requests, responses := p.forwardHTTP(up, c, prefix, e, pr.Audit)
		go func() { defer p.wg.Done(); upBytes = requests(); one() }()
		go func() { defer p.wg.Done(); downBytes = responses(); one() }()
	} else {
		go func() { defer p.wg.Done(); upBytes = copyHalf(up, c); one() }()
		go func() { defer p.wg.Done(); downBytes = copyHalf(c, up); one() }()
	}
	return true
}

// answerWait bounds how long a request that needs the server's answer first
// (an upgrade, or the one before a refusal) waits for it.
const answerWait = 30 * time.Second

// forwardHTTP returns the two directions of an allowed plain-HTTP
// connection. requests carries the client's requests upstream, each parsed,
// checked and re-serialized (see requestStream): a request for another host
// than the connection's, or one vmegress refuses whatever its host, is not
// sent; the client gets the answers to the requests before it, then a 403,
// and the access log has a deny line for it. In audit mode a request for
// another host goes on and its line says would_deny. responses passes the
// server's bytes back unchanged, following the responses so that what the
// client sends after an upgrade request goes raw only if the server
// answered 101.
func (p *Proxy) forwardHTTP(up net.Conn, c *net.TCPConn, prefix []byte, e *entry, audit bool) (requests, responses func() int64) {
	rs := newResponseStream()
	rs.readable = readableConn(up)
	client := &guardedWriter{w: c}
	same := sameHost(e.name)
	check := func(name string) error {
		err := same(name)
		var hs *HostSwitchError
		if !errors.As(err, &hs) {
			return err
		}
		denied := &entry{src: e.src, dst: e.dst, start: p.now(), name: hs.Host, kind: policy.KindHTTP,
			d: policy.Decision{Verdict: policy.Deny, Project: e.d.Project, Reason: hs.Error()}}
		if audit {
			denied.d.Verdict = WouldDeny
			p.logEntry(denied)
			return nil
		}
		p.logEntry(denied)
		return err
	}
	pre := bytes.NewReader(prefix)
	waitClient := readableConn(c)
	var last *exchange
	s := &requestStream{
		port:  e.dst.Port(),
		check: check,
		sent:  func(x *exchange) { last = x; rs.sent(x) },
		switched: func(x *exchange) bool {
			t := time.NewTimer(answerWait)
			defer t.Stop()
			return rs.answered(x, t.C) == http.StatusSwitchingProtocols
		},
		readable: func() (bool, error) {
			if pre.Len() > 0 {
				return false, nil
			}
			return waitClient()
		},
	}
	requests = func() int64 {
		n, tail, switched, err := s.forward(up, io.MultiReader(pre, c))
		if switched {
			// The server speaks the new protocol: the rest goes as is.
			m, werr := up.Write(tail)
			n += int64(m)
			if werr == nil && pre.Len() > 0 {
				var k int64
				k, werr = io.Copy(up, pre)
				n += k
			}
			if werr != nil {
				up.Close()
				c.Close()
				return n
			}
			return n + copyHalf(up, c)
		}
		if err == nil {
			// The client is done: nothing more goes upstream; the
			// answers already asked for still come back.
			if cw, ok := up.(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			} else {
				up.Close()
			}
			c.CloseRead()
			return n
		}
		var hs *HostSwitchError
		refused := errors.As(err, &hs) || refusedRequest(err)
		if !errors.As(err, &hs) && (refused || errors.Is(err, ErrNotHTTP) || errors.Is(err, errHeadTooLarge)) {
			p.logEntry(&entry{src: e.src, dst: e.dst, start: p.now(), name: e.name, kind: policy.KindHTTP,
				d: policy.Decision{Verdict: policy.Deny, Project: e.d.Project, Reason: "a later request on this connection: " + err.Error()}})
		}
		if refused {
			// The 403 comes after the answers to the requests before it.
			if last != nil {
				t := time.NewTimer(answerWait)
				rs.answered(last, t.C)
				t.Stop()
			}
			body := fmt.Sprintf("vmegress: egress policy of project %s refused a request on this connection: %v\n", e.d.Project, err)
			if client.last(forbidden(e.d.Project, body)) == nil {
				up.Close()
				c.SetWriteDeadline(p.now().Add(2 * time.Second))
				closeGently(c)
				return n
			}
		}
		up.Close()
		c.Close()
		return n
	}
	responses = func() int64 {
		n, raw, err := rs.forward(client, up)
		switch {
		case errors.Is(err, errClientClosed):
			up.Close() // the refusal closes the client's side
		case err != nil:
			up.Close()
			c.Close()
		case raw:
			n += copyHalf(c, up)
		default:
			c.CloseWrite()
			if cr, ok := up.(interface{ CloseRead() error }); ok {
				cr.CloseRead()
			}
		}
		return n
	}
	return requests, responses
}

// forbidden is the 403 response that carries body.
func forbidden(project, body string) []byte {
	return fmt.Appendf(nil, "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\nX-Vmegress-Project: %s\r\n\r\n%s",
		len(body), project, body)
}

// readableConn returns a wait for c to have bytes or its end, holding no
// buffer meanwhile (nil when c is not a TCP socket: reads just block).
func readableConn(c net.Conn) func() (bool, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	return func() (bool, error) {
		_, eof, err := waitAvailable(rc)
		return eof, err
	}
}

// inspect reads what the policy needs (ClientHello or request head) without
// consuming it; it returns the facts, the bytes read and how to refuse.
func (p *Proxy) inspect(ctx context.Context, c *net.TCPConn, what policy.Inspect, e *entry) (policy.Facts, []byte, refusal) {
	facts := policy.Facts{Src: e.src.Addr(), Dst: e.dst}
	c.SetReadDeadline(p.now().Add(p.helloTimeout()))
	defer c.SetReadDeadline(time.Time{})
	var r io.Reader = c
	var first []byte
	if what == policy.InspectEither {
		// A TLS record starts with 0x16 (handshake); anything else is
		// taken as HTTP.
		first = make([]byte, 1)
		if _, err := io.ReadFull(c, first); err != nil {
			return facts, nil, refuseReset
		}
		r = io.MultiReader(bytes.NewReader(first), c)
		what = policy.InspectHTTP
		if first[0] == 0x16 {
			what = policy.InspectTLS
		}
	}
	switch what {
	case policy.InspectTLS:
		// Not cancelled with ctx: crypto/tls would start a goroutine per
		// hello to watch it; the read deadline bounds the wait, and
		// stopping the proxy closes the connection.
		hello, prefix, err := ReadClientHello(context.WithoutCancel(ctx), r)
		if err != nil {
			if !errors.Is(err, ErrNotTLS) {
				e.d.Reason = err.Error()
			}
			return facts, prefix, refuseReset
		}
		facts.Kind, facts.Name = policy.KindTLS, hello.ServerName
		return facts, prefix, refuseTLS
	default:
		host, prefix, err := ReadHTTPHost(r, e.dst.Port())
		if err != nil {
			e.d.Reason = err.Error()
			if refusedRequest(err) {
				return facts, prefix, refuseHTTP
			}
			return facts, prefix, refuseReset
		}
		facts.Kind, facts.Name = policy.KindHTTP, host
		return facts, prefix, refuseHTTP
	}
}

// target picks the address to dial for an allowed connection, or says why
// there is none. Without a name (cidr rules) it is the original destination.
// With a name it is the original destination only if the resolver gave it
// to this project for this name; else an address the proxy resolves itself.
func (p *Proxy) target(ctx context.Context, pr *policy.Project, name string, dst netip.AddrPort, byAddress bool) (netip.AddrPort, string) {
	if byAddress || p.OriginalDst {
		return dst, p.checkDst(pr, dst.Addr(), dst.Port())
	}
	name = dnsName(name)
	if p.Answers != nil && p.Answers.Vetted(pr.Name, name, dst.Addr()) {
		if reason := p.checkDst(pr, dst.Addr(), dst.Port()); reason == "" {
			return dst, ""
		}
	}
	if p.Resolver == nil {
		return dst, "no resolver to vet the destination"
	}
	addrs, err := p.Resolver.Lookup(ctx, pr, name)
	if err != nil {
		return dst, fmt.Sprintf("cannot vet the destination: %v", err)
	}
	var reasons []string
	for _, a := range addrs {
		reason := p.checkDst(pr, a, dst.Port())
		if reason == "" {
			return netip.AddrPortFrom(a, dst.Port()), ""
		}
		reasons = append(reasons, a.String()+": "+reason)
	}
	return dst, fmt.Sprintf("no address of %s may be dialled (%s)", name, strings.Join(reasons, "; "))
}

func dnsName(s string) string { return strings.ToLower(strings.TrimSuffix(s, ".")) }

// checkDst refuses destinations that would loop back into the host, reach
// another guest, or land in the always-denied set (unless a cidr rule of
// the project names the address) or in a deny cidr rule of the project
// for port; it returns "" when a may be dialled.
func (p *Proxy) checkDst(pr *policy.Project, a netip.Addr, port uint16) string {
	a = a.Unmap()
	if !a.IsValid() || a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() {
		return "destination is not a routable unicast address"
	}
	if p.GuestRange.IsValid() && p.GuestRange.Contains(a) {
		return "destination is in the guest range"
	}
	local, err := p.HostAddrs.IsHostAddr(a)
	if err != nil {
		return fmt.Sprintf("cannot tell whether the destination is the host itself: %v", err)
	}
	if local {
		return "destination is an address of the host itself"
	}
	if rule, denied := pr.CIDRDenies(a, port); denied {
		return fmt.Sprintf("destination %s is denied by rule %s", a, strings.TrimPrefix(rule, policy.DenyPrefix))
	}
	if why := dest.AlwaysDenied(a); why != "" && !pr.CIDRNames(a) {
		return fmt.Sprintf("destination %s is always denied (%s)", a, why)
	}
	return ""
}

// tlsAccessDenied is a TLS alert record: fatal (2), access_denied (49).
var tlsAccessDenied = []byte{0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31}

// refuse shows the client the denial (RST, TLS alert or HTTP 403: fast and
// readable, never a hang) and logs it.
func (p *Proxy) refuse(c *net.TCPConn, e *entry, how refusal) {
	switch how {
	case refuseTLS:
		c.SetWriteDeadline(p.now().Add(2 * time.Second))
		c.Write(tlsAccessDenied)
		closeGently(c)
	case refuseHTTP:
		body := fmt.Sprintf("vmegress: egress policy of project %s refused this request to %s: %s\n", e.d.Project, e.name, e.d.Reason)
		c.SetWriteDeadline(p.now().Add(2 * time.Second))
		c.Write(forbidden(e.d.Project, body))
		closeGently(c)
	default:
		c.SetLinger(0) // RST, not FIN: the client sees the refusal at once
		c.Close()
	}
	p.logEntry(e)
}

// closeGently sends FIN and drains briefly before closing, so unread input
// does not turn the close into a RST that discards what was just written.
func closeGently(c *net.TCPConn) {
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(time.Second))
	io.Copy(io.Discard, io.LimitReader(c, 64<<10))
	c.Close()
}

// copyHalf copies src to dst, then closes dst for writing and src for reading.
// If the copy fails, both are closed so the other direction ends too.
func copyHalf(dst, src net.Conn) int64 {
	var n int64
	var err error
	dt, ok1 := dst.(*net.TCPConn)
	st, ok2 := src.(*net.TCPConn)
	if ok1 && ok2 {
		n, err = spliceAvailable(dt, st)
	} else {
		n, err = io.Copy(dst, src)
	}
	if err != nil {
		dst.Close()
		src.Close()
		return n
	}
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	} else {
		dst.Close()
	}
	if cr, ok := src.(interface{ CloseRead() error }); ok {
		cr.CloseRead()
	}
	return n
}

// spliceAvailable copies src to dst with splice(2), but only ever what src
// has already received: between bursts it waits on the poller holding
// nothing. (io.Copy's splice keeps a pipe, two descriptors and their
// buffers, for as long as a connection is idle.)
func spliceAvailable(dst, src *net.TCPConn) (int64, error) {
	rc, err := src.SyscallConn()
	if err != nil {
		return io.Copy(dst, src)
	}
	var total int64
	for {
		avail, eof, err := waitAvailable(rc)
		if err != nil {
			return total, err
		}
		if eof {
			return total, nil
		}
		n, err := copyBurst(dst, src, avail)
		total += n
		if err != nil {
			return total, err
		}
		if n == 0 {
			return total, nil
		}
	}
}

// smallCopy is the largest burst copied through a pooled buffer rather
// than spliced (a TLS record is at most 16 KiB plus its header).
const smallCopy = 32 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, smallCopy); return &b }}

// waitAvailable waits until the socket has data or its end, and returns how
// many bytes are queued (SIOCINQ) or that the peer has finished.
func waitAvailable(rc syscall.RawConn) (avail int, eof bool, err error) {
	cerr := rc.Read(func(fd uintptr) bool {
		n, ierr := unix.IoctlGetInt(int(fd), unix.SIOCINQ)
		if ierr != nil {
			err = ierr
			return true
		}
		if n > 0 {
			avail = n
			return true
		}
		var b [1]byte
		m, _, perr := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch {
		case perr == unix.EAGAIN || perr == unix.EWOULDBLOCK:
			return false // nothing yet: wait for the poller
		case perr != nil:
			err = perr
		case m == 0:
			eof = true
		default:
			avail = m // data arrived between the two calls
		}
		return true
	})
	if err == nil {
		err = cerr
	}
	return avail, eof, err
}
