package proxy

import (
	"errors"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/vmegress/vmegress/internal/policy"
)

// Bounds of the upstream pool of terminated connections.
const (
	// poolMaxKeys caps the (project, destination, name) keys kept, all
	// projects together; beyond it the least recently used key that no
	// guest connection is using is dropped, and when every key is in use
	// a connection gets a transport of its own, closed when it ends.
	poolMaxKeys = 1024
	// poolMaxIdlePerKey caps the idle upstream connections kept per key.
	poolMaxIdlePerKey = 4
	// poolIdleTimeout closes an upstream connection idle this long (and
	// drops a key unused this long once the pool is full).
	poolIdleTimeout = 90 * time.Second
)

// poolKey is what an upstream connection may be reused for: one project,
// one vetted address and port, one server name, TLS or not. A connection
// is never handed to another project or another name, and only goes to the
// address that was vetted for the guest connection reusing it.
type poolKey struct {
	project string
	target  netip.AddrPort
	name    string
	tls     bool
}

// upstream is a transport and the connections it dialled: closing it
// closes them all. http.Transport.CloseIdleConnections alone is not
// enough: an HTTP/2 connection whose last stream the transport has not yet
// forgotten (its stream is cleaned up on another goroutine after the body's
// EOF) is not idle at that moment, and would stay open for the idle
// timeout after its key was retired. close is only called when no guest
// connection uses the transport, so no request is cut.
type upstream struct {
	*http.Transport
	mu     sync.Mutex
	conns  map[*trackedConn]struct{}
	closed bool
}

// trackedConn leaves its upstream's set when it closes.
type trackedConn struct {
	net.Conn
	u    *upstream
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.u.mu.Lock()
		delete(c.u.conns, c)
		c.u.mu.Unlock()
	})
	return c.Conn.Close()
}

// errUpstreamClosed: a dial finished after its upstream was closed.
var errUpstreamClosed = errors.New("the upstream connections of this key were closed")

// track records c (dialled by u's transport).
func (u *upstream) track(c net.Conn) (net.Conn, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		c.Close()
		return nil, errUpstreamClosed
	}
	if u.conns == nil {
		u.conns = map[*trackedConn]struct{}{}
	}
	tc := &trackedConn{Conn: c, u: u}
	u.conns[tc] = struct{}{}
	return tc, nil
}

// close closes the transport's idle connections and every other it
// dialled; later dials fail.
func (u *upstream) close() {
	u.CloseIdleConnections()
	u.mu.Lock()
	u.closed = true
	conns := u.conns
	u.conns = nil
	u.mu.Unlock()
	for c := range conns {
		c.Conn.Close()
	}
}

// poolEntry is the transport of one key and who is using it.
type poolEntry struct {
	tr *upstream
	// pr is the project's compiled policy the entry was made under: a
	// policy change that replaces it (with on_policy_change: drop) or
	// removes the project retires the entry.
	pr      *policy.Project
	users   int
	lastUse time.Time
	// retired: out of the pool; its idle connections are closed when its
	// last user is done.
	retired bool
}

// termPool keeps the upstream connections of terminated connections
// between guest connections. The zero value is an empty pool.
type termPool struct {
	mu sync.Mutex
	m  map[poolKey]*poolEntry
}

// get returns the transport for k under pr (made by mk when the pool has
// none) and the function to call when the guest connection is done with it.
func (tp *termPool) get(k poolKey, pr *policy.Project, now time.Time, mk func() *upstream) (*http.Transport, func(time.Time)) {
	tp.mu.Lock()
	var closing []*upstream
	defer func() {
		tp.mu.Unlock()
		for _, u := range closing {
			u.close()
		}
	}()
	if tp.m == nil {
		tp.m = map[poolKey]*poolEntry{}
	}
	e := tp.m[k]
	if e != nil && e.pr != pr {
		// Made under another version of the project's policy: never
		// reused across a change, whatever on_policy_change says.
		closing = append(closing, tp.retire(k, e)...)
		e = nil
	}
	if e == nil {
		if len(tp.m) >= poolMaxKeys {
			closing = append(closing, tp.evict(now)...)
		}
		e = &poolEntry{tr: mk(), pr: pr}
		if len(tp.m) < poolMaxKeys {
			tp.m[k] = e
		} else {
			e.retired = true // every key in use: this one is not pooled
		}
	}
	e.users++
	e.lastUse = now
	return e.tr.Transport, func(now time.Time) {
		tp.mu.Lock()
		e.users--
		e.lastUse = now
		done := e.retired && e.users == 0
		tp.mu.Unlock()
		if done {
			e.tr.close()
		}
	}
}

// retire takes e out of the pool (under mu) and returns its transport when
// it is to be closed now (nobody is using it).
func (tp *termPool) retire(k poolKey, e *poolEntry) []*upstream {
	delete(tp.m, k)
	e.retired = true
	if e.users == 0 {
		return []*upstream{e.tr}
	}
	return nil
}

// evict makes room (under mu): keys unused for poolIdleTimeout go, and if
// none did, the least recently used key nobody is using.
func (tp *termPool) evict(now time.Time) []*upstream {
	var closing []*upstream
	var lru poolKey
	var lruE *poolEntry
	for k, e := range tp.m {
		if e.users > 0 {
			continue
		}
		if now.Sub(e.lastUse) >= poolIdleTimeout {
			closing = append(closing, tp.retire(k, e)...)
			continue
		}
		if lruE == nil || e.lastUse.Before(lruE.lastUse) {
			lru, lruE = k, e
		}
	}
	if len(closing) == 0 && lruE != nil {
		closing = tp.retire(lru, lruE)
	}
	return closing
}

// policyChanged retires the keys of projects pol removes, and with drop
// those of projects whose policy pol replaces: their idle upstream
// connections close now, the ones in use when their guest connections end.
func (tp *termPool) policyChanged(pol *policy.Policy, drop bool) {
	tp.mu.Lock()
	var closing []*upstream
	for k, e := range tp.m {
		np := pol.Project(k.project)
		if np == nil || (drop && np != e.pr) {
			closing = append(closing, tp.retire(k, e)...)
		}
	}
	tp.mu.Unlock()
	for _, u := range closing {
		u.close()
	}
}

// closeAll retires every key (the proxy is stopping).
func (tp *termPool) closeAll() {
	tp.mu.Lock()
	var closing []*upstream
	for k, e := range tp.m { // deleting while ranging is allowed
		closing = append(closing, tp.retire(k, e)...)
	}
	tp.mu.Unlock()
	for _, u := range closing {
		u.close()
	}
}

// size returns the number of keys pooled.
func (tp *termPool) size() int {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return len(tp.m)
}
