package proxy

import (
	"net/netip"
	"testing"
)

// countingChecker says a is the host's when it is in local, and counts the
// lookups; during, if set, runs inside a lookup.
type countingChecker struct {
	local  map[netip.Addr]bool
	calls  int
	during func()
}

func (c *countingChecker) IsHostAddr(a netip.Addr) (bool, error) {
	c.calls++
	if c.during != nil {
		c.during()
	}
	return c.local[a], nil
}

// TestHostAddrCache: answers are kept only while changes are told, a
// change forgets them, and an answer looked up while a change was told is
// not kept.
func TestHostAddrCache(t *testing.T) {
	host, other := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("203.0.113.9")
	k := &countingChecker{local: map[netip.Addr]bool{host: true}}
	c := &HostAddrCache{Checker: k}
	ask := func(a netip.Addr, want bool, calls int) {
		t.Helper()
		got, err := c.IsHostAddr(a)
		if err != nil || got != want {
			t.Fatalf("IsHostAddr(%s) = %v, %v; want %v", a, got, err, want)
		}
		if k.calls != calls {
			t.Fatalf("after IsHostAddr(%s): %d kernel lookups; want %d", a, k.calls, calls)
		}
	}
	// Not watching: every question goes to the kernel.
	ask(other, false, 1)
	ask(other, false, 2)
	c.SetWatching(true)
	ask(other, false, 3)
	ask(other, false, 3) // kept
	ask(host, true, 4)
	ask(host, true, 4)
	// The host takes other as its own: told, forgotten.
	k.local[other] = true
	c.Changed()
	ask(other, true, 5)
	ask(other, true, 5)
	// A change told during a lookup: its answer is not kept.
	c.Changed()
	k.during = func() { c.Changed() }
	ask(host, true, 6)
	k.during = nil
	ask(host, true, 7)
	ask(host, true, 7)
	// Watching lost: nothing kept any more.
	c.SetWatching(false)
	ask(host, true, 8)
	ask(host, true, 9)
}
