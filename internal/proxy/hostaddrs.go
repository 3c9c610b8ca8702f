package proxy

import (
	"net/netip"
	"sync"
)

// hostAddrCacheMax bounds the answers kept (one per destination address
// asked about); a full cache starts again empty.
const hostAddrCacheMax = 4096

// HostAddrCache answers IsHostAddr from memory while the host's addresses
// and routes stay as they were: the kernel's route lookup behind Checker
// is a netlink round trip per new connection (about a twelfth of the
// builtin plane's CPU per new terminated connection). It caches only while
// something tells it of every change (SetWatching(true), then Changed at
// each change: hostnet.WatchAddrsAndRoutes); an answer looked up while a
// change was told is not kept. For the instant between a change and its
// telling, the ruleset's output rule (the proxy's marked packets to the
// host's own addresses are dropped) still holds.
type HostAddrCache struct {
	Checker AddrChecker

	mu       sync.Mutex
	watching bool
	gen      uint64 // counts changes told
	m        map[netip.Addr]bool
}

// IsHostAddr implements AddrChecker.
func (c *HostAddrCache) IsHostAddr(a netip.Addr) (bool, error) {
	c.mu.Lock()
	if v, ok := c.m[a]; ok {
		c.mu.Unlock()
		return v, nil
	}
	gen, watching := c.gen, c.watching
	c.mu.Unlock()
	v, err := c.Checker.IsHostAddr(a)
	if err != nil || !watching {
		return v, err
	}
	c.mu.Lock()
	if c.watching && c.gen == gen {
		if c.m == nil || len(c.m) >= hostAddrCacheMax {
			c.m = make(map[netip.Addr]bool)
		}
		c.m[a] = v
	}
	c.mu.Unlock()
	return v, nil
}

// Changed forgets every answer: the host's addresses or routes changed.
func (c *HostAddrCache) Changed() {
	c.mu.Lock()
	c.gen++
	c.m = nil
	c.mu.Unlock()
}

// SetWatching says whether every change will be told (Changed); while not,
// nothing is cached.
func (c *HostAddrCache) SetWatching(on bool) {
	c.mu.Lock()
	c.watching = on
	c.gen++
	c.m = nil
	c.mu.Unlock()
}
