// Package proxy is the builtin data plane: a transparent (TPROXY) TCP proxy
// that peeks at the TLS ClientHello, asks the policy, and either splices the
// connection to its destination or refuses it.
//
// The original destination of a TPROXY'd connection is the accepted socket's
// local address. The proxy's upstream sockets carry a mark (SO_MARK) that the
// interception skips, and it never dials the host's own addresses.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

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
	// Log is the daemon's log; AccessLog gets one line per connection.
	Log       *slog.Logger
	AccessLog *slog.Logger
	// HelloTimeout bounds the wait for a ClientHello (zero: DefaultHelloTimeout).
	HelloTimeout time.Duration
	// Now is the clock (zero: time.Now).
	Now func() time.Time

	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[*net.TCPConn]struct{}
}

// SetPolicy swaps the policy new connections are decided by.
func (p *Proxy) SetPolicy(pol *policy.Policy) { p.policy.Store(pol) }

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

// Serve accepts connections from ln until ctx ends or ln fails. It closes ln
// when ctx ends and returns once every connection handler has finished.
func (p *Proxy) Serve(ctx context.Context, ln net.Listener) error {
	if p.HostAddrs == nil || p.policy.Load() == nil {
		return errors.New("starting proxy: HostAddrs and a policy are required")
	}
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		p.closeAll()
	})
	defer stop()
	var err error
	for {
		c, aerr := ln.Accept()
		if aerr != nil {
			if ctx.Err() == nil {
				err = fmt.Errorf("accepting connections: %w", aerr)
			}
			break
		}
		tc, ok := c.(*net.TCPConn)
		if !ok {
			c.Close()
			continue
		}
		p.track(tc, true)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer p.track(tc, false)
			p.handle(ctx, tc)
		}()
	}
	p.wg.Wait()
	return err
}

func (p *Proxy) track(c *net.TCPConn, add bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns == nil {
		p.conns = map[*net.TCPConn]struct{}{}
	}
	if add {
		p.conns[c] = struct{}{}
	} else {
		delete(p.conns, c)
	}
}

func (p *Proxy) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
}

// entry is one access-log line being built.
type entry struct {
	start     time.Time
	src, dst  netip.AddrPort
	sni       string
	d         policy.Decision
	up, down  int64
	upstreamA string
}

func (p *Proxy) logEntry(e *entry) {
	if p.AccessLog == nil {
		return
	}
	attrs := []slog.Attr{
		slog.String("project", e.d.Project),
		slog.String("src", e.src.String()),
		slog.String("dst", e.dst.String()),
		slog.String("sni", e.sni),
		slog.String("verdict", string(e.d.Verdict)),
		slog.String("rule", e.d.Rule),
		slog.String("reason", e.d.Reason),
		slog.Int64("bytes_up", e.up),
		slog.Int64("bytes_down", e.down),
		slog.Float64("duration_ms", float64(p.now().Sub(e.start).Microseconds())/1000),
	}
	if e.upstreamA != "" {
		attrs = append(attrs, slog.String("upstream", e.upstreamA))
	}
	p.AccessLog.LogAttrs(context.Background(), slog.LevelInfo, "connection", attrs...)
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// handle decides one connection and proxies or refuses it.
func (p *Proxy) handle(ctx context.Context, c *net.TCPConn) {
	e := &entry{start: p.now(), src: addrPort(c.RemoteAddr()), dst: addrPort(c.LocalAddr())}
	pol := p.policy.Load()

	// A source in no project is refused before reading a byte.
	if pol.ProjectFor(e.src.Addr()) == nil {
		e.d = pol.Decide(policy.Facts{Src: e.src.Addr(), Dst: e.dst})
		p.refuse(c, e)
		return
	}

	c.SetReadDeadline(p.now().Add(p.helloTimeout()))
	hello, prefix, herr := ReadClientHello(ctx, c)
	c.SetReadDeadline(time.Time{})
	facts := policy.Facts{Src: e.src.Addr(), Dst: e.dst}
	if hello != nil {
		facts.TLS, facts.SNI = true, hello.ServerName
		e.sni = hello.ServerName
	}
	e.d = pol.Decide(facts)
	if herr != nil && !errors.Is(herr, ErrNotTLS) {
		e.d.Reason = herr.Error()
	}
	if e.d.Verdict != policy.Allow {
		p.refuse(c, e)
		return
	}
	if reason := p.checkDst(e.dst.Addr()); reason != "" {
		e.d = policy.Decision{Verdict: policy.Deny, Project: e.d.Project, Reason: reason}
		p.refuse(c, e)
		return
	}

	dctx, cancel := context.WithTimeout(ctx, DefaultDialTimeout)
	up, err := p.dial(dctx, e.dst.String())
	cancel()
	if err != nil {
		e.d.Verdict = "error"
		e.d.Reason = fmt.Sprintf("dialing upstream: %v", err)
		p.refuse(c, e)
		return
	}
	defer up.Close()
	e.upstreamA = up.LocalAddr().String()
	if _, err := up.Write(prefix); err != nil {
		e.d.Verdict, e.d.Reason = "error", fmt.Sprintf("sending ClientHello upstream: %v", err)
		p.refuse(c, e)
		return
	}
	e.up = int64(len(prefix))
	n1, n2 := splice(c, up)
	e.up += n1
	e.down = n2
	c.Close()
	p.logEntry(e)
}

// checkDst refuses destinations that would loop back into the host or
// reach another guest; it returns "" when the address may be dialled.
func (p *Proxy) checkDst(a netip.Addr) string {
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
	return ""
}

// refuse resets the connection (RST, not FIN: the client sees the refusal at
// once) and logs it.
func (p *Proxy) refuse(c *net.TCPConn, e *entry) {
	c.SetLinger(0)
	c.Close()
	p.logEntry(e)
}

// splice copies both ways until both directions are done, half-closing each
// side as its source ends. Copies between *net.TCPConn use splice(2).
func splice(down net.Conn, up net.Conn) (upBytes, downBytes int64) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); upBytes = copyHalf(up, down) }()
	go func() { defer wg.Done(); downBytes = copyHalf(down, up) }()
	wg.Wait()
	return upBytes, downBytes
}

// copyHalf copies src to dst, then closes dst for writing and src for reading.
// If the copy fails, both are closed so the other direction ends too.
func copyHalf(dst, src net.Conn) int64 {
	n, err := io.Copy(dst, src)
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
