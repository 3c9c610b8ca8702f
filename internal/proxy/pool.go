package proxy

import (
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

// poolEntry is the transport of one key and who is using it.
type poolEntry struct {
	tr *http.Transport
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
func (tp *termPool) get(k poolKey, pr *policy.Project, now time.Time, mk func() *http.Transport) (*http.Transport, func(time.Time)) {
	tp.mu.Lock()
	var closing []*http.Transport
	defer func() {
		tp.mu.Unlock()
		for _, tr := range closing {
			tr.CloseIdleConnections()
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
	return e.tr, func(now time.Time) {
		tp.mu.Lock()
		e.users--
		e.lastUse = now
		done := e.retired && e.users == 0
		tp.mu.Unlock()
		if done {
			e.tr.CloseIdleConnections()
		}
	}
}

// retire takes e out of the pool (under mu) and returns its transport when
// it is to be closed now (nobody is using it).
func (tp *termPool) retire(k poolKey, e *poolEntry) []*http.Transport {
	delete(tp.m, k)
	e.retired = true
	if e.users == 0 {
		return []*http.Transport{e.tr}
	}
	return nil
}

// evict makes room (under mu): keys unused for poolIdleTimeout go, and if
// none did, the least recently used key nobody is using.
func (tp *termPool) evict(now time.Time) []*http.Transport {
	var closing []*http.Transport
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
	var closing []*http.Transport
	for k, e := range tp.m {
		np := pol.Project(k.project)
		if np == nil || (drop && np != e.pr) {
			closing = append(closing, tp.retire(k, e)...)
		}
	}
	tp.mu.Unlock()
	for _, tr := range closing {
		tr.CloseIdleConnections()
	}
}

// closeAll retires every key (the proxy is stopping).
func (tp *termPool) closeAll() {
	tp.mu.Lock()
	var closing []*http.Transport
	for k, e := range tp.m { // deleting while ranging is allowed
		closing = append(closing, tp.retire(k, e)...)
	}
	tp.mu.Unlock()
	for _, tr := range closing {
		tr.CloseIdleConnections()
	}
}

// size returns the number of keys pooled.
func (tp *termPool) size() int {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return len(tp.m)
}
