// Package dest decides which upstream addresses the data plane may dial: the
// always-denied address set (loopback, private, link-local, metadata, CGNAT,
// IPv6 forms that embed IPv4, ...) and the record of which addresses the
// allowlist resolver gave to which project for which name.
package dest

import (
	"net/netip"
	"slices"
	"sync"
	"time"
)

// denied lists the always-denied ranges and why. A project's cidr rule can
// open them; nothing can open the guest range or the host's own addresses.
var denied = []struct {
	prefix netip.Prefix
	why    string
}{
	{netip.MustParsePrefix("0.0.0.0/8"), "unspecified/this network"},
	{netip.MustParsePrefix("10.0.0.0/8"), "private (RFC 1918)"},
	{netip.MustParsePrefix("100.64.0.0/10"), "shared CGNAT space"},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local (cloud metadata)"},
	{netip.MustParsePrefix("172.16.0.0/12"), "private (RFC 1918)"},
	{netip.MustParsePrefix("192.0.0.0/24"), "IETF protocol assignments"},
	{netip.MustParsePrefix("192.168.0.0/16"), "private (RFC 1918)"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast"},
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved and broadcast"},
	{netip.MustParsePrefix("::/96"), "IPv4-compatible IPv6 / unspecified"},
	{netip.MustParsePrefix("::1/128"), "loopback"},
	{netip.MustParsePrefix("::ffff:0:0/96"), "IPv4-mapped IPv6"},
	{netip.MustParsePrefix("64:ff9b::/96"), "NAT64 (embeds IPv4)"},
	{netip.MustParsePrefix("64:ff9b:1::/48"), "local NAT64 (embeds IPv4)"},
	{netip.MustParsePrefix("100::/64"), "discard"},
	{netip.MustParsePrefix("2001::/32"), "Teredo (embeds IPv4)"},
	{netip.MustParsePrefix("2002::/16"), "6to4 (embeds IPv4)"},
	{netip.MustParsePrefix("fc00::/7"), "unique local (private)"},
	{netip.MustParsePrefix("fe80::/10"), "link-local"},
	{netip.MustParsePrefix("ff00::/8"), "multicast"},
}

// AlwaysDenied returns why a is in the always-denied set, or "".
func AlwaysDenied(a netip.Addr) string {
	if !a.IsValid() {
		return "invalid address"
	}
	for _, d := range denied {
		if d.prefix.Contains(a) {
			return d.why
		}
	}
	return ""
}

// Grace is how long past its TTL a resolver answer still vets an address:
// clients cache a little longer than they should.
const Grace = 30 * time.Second

// MaxPerProject bounds the answers remembered for one project.
const MaxPerProject = 4096

// Answers remembers, per project, the addresses the resolver returned for
// each name until their TTL (plus Grace) runs out. Safe for concurrent use.
type Answers struct {
	// Now is the clock (zero: time.Now).
	Now func() time.Time

	mu sync.Mutex
	m  map[string]*projectAnswers
}

// projectAnswers is one project's record: address → name → expiry, and
// how many (address, name) pairs it holds.
type projectAnswers struct {
	byAddr map[netip.Addr]map[string]time.Time
	n      int
}

func (pa *projectAnswers) del(addr netip.Addr, name string) {
	names := pa.byAddr[addr]
	if _, ok := names[name]; !ok {
		return
	}
	delete(names, name)
	pa.n--
	if len(names) == 0 {
		delete(pa.byAddr, addr)
	}
}

func (a *Answers) now() time.Time {
	if a.Now != nil {
		return a.Now()
	}
	return time.Now()
}

// Record notes that the resolver told project that name has addr for ttl.
func (a *Answers) Record(project, name string, addr netip.Addr, ttl time.Duration) {
	now := a.now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.m == nil {
		a.m = map[string]*projectAnswers{}
	}
	pm := a.m[project]
	if pm == nil {
		pm = &projectAnswers{byAddr: map[netip.Addr]map[string]time.Time{}}
		a.m[project] = pm
	}
	addr = addr.Unmap()
	if _, ok := pm.byAddr[addr][name]; !ok && pm.n >= MaxPerProject {
		for ad, names := range pm.byAddr {
			for nm, exp := range names {
				if now.After(exp) {
					pm.del(ad, nm)
				}
			}
		}
		for ad, names := range pm.byAddr { // still full: drop arbitrary entries
			for nm := range names {
				if pm.n < MaxPerProject {
					break
				}
				pm.del(ad, nm)
			}
		}
	}
	names := pm.byAddr[addr]
	if names == nil {
		names = map[string]time.Time{}
		pm.byAddr[addr] = names
	}
	if _, ok := names[name]; !ok {
		pm.n++
	}
	names[name] = now.Add(ttl + Grace)
}

// Vetted reports whether the resolver gave addr to project for name and the
// answer has not expired.
func (a *Answers) Vetted(project, name string, addr netip.Addr) bool {
	now := a.now()
	a.mu.Lock()
	defer a.mu.Unlock()
	pm := a.m[project]
	if pm == nil {
		return false
	}
	exp, ok := pm.byAddr[addr.Unmap()][name]
	return ok && !now.After(exp)
}

// Names returns, sorted, the names the resolver gave addr to project for
// whose answers have not expired (TTL plus Grace): what tcp rules are
// decided by (a policy.Resolved).
func (a *Answers) Names(project string, addr netip.Addr) []string {
	now := a.now()
	a.mu.Lock()
	defer a.mu.Unlock()
	pm := a.m[project]
	if pm == nil {
		return nil
	}
	var out []string
	for name, exp := range pm.byAddr[addr.Unmap()] {
		if !now.After(exp) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// Forget drops everything remembered for project.
func (a *Answers) Forget(project string) {
	a.mu.Lock()
	delete(a.m, project)
	a.mu.Unlock()
}

// Ranges returns the always-denied ranges.
func Ranges() []netip.Prefix {
	out := make([]netip.Prefix, len(denied))
	for i, d := range denied {
		out[i] = d.prefix
	}
	return out
}

// Each calls f for every answer remembered for project that has not
// expired: the address, the name it was handed out for and when that ends.
// f must not call back into a.
func (a *Answers) Each(project string, f func(addr netip.Addr, name string, expires time.Time)) {
	now := a.now()
	a.mu.Lock()
	defer a.mu.Unlock()
	pm := a.m[project]
	if pm == nil {
		return
	}
	for addr, names := range pm.byAddr {
		for name, exp := range names {
			if !now.After(exp) {
				f(addr, name, exp)
			}
		}
	}
}
