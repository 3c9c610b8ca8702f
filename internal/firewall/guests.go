package firewall

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/policy"
)

// KernelCTMark is the conntrack mark bit of a flow the kernel forwards
// itself (a cidr rule allowed it; no data plane is involved). Only this
// bit is set or tested, so other users of the conntrack mark keep theirs.
// Conntrack events with it are how such flows are logged and revoked.
const KernelCTMark = config.KernelMarkBit

// KernelMark is the packet mark bit the ruleset sets on every guest packet
// it lets the kernel forward (the flows of KernelCTMark, direct NAT egress,
// inbound SSH replies): the routing lock routes nothing else from a guest
// address (hostnet.PolicyRouting), so should the ruleset vanish, guests get
// nothing past the host even where forwarding is on. Only this bit is set
// or tested. It must not overlap the config's mark and upstream_mark.
const KernelMark = config.KernelMarkBit

// Guest is one placed project's guest and the part of its policy the
// ruleset carries out (policy.Kernel).
type Guest struct {
	Addr netip.Addr
	// TAP is the guest's interface when vmegress placed it ("" when the
	// config names the subnet of an interface made by someone else).
	TAP    string
	Kernel policy.Kernel
}

// flowElem is one (destination range, port) of a guest.
type flowElem struct {
	Prefix netip.Prefix
	Port   uint16
}

// guestElems are a guest's set elements, normalized: no element of a set
// lies inside another of the same set (nftables refuses overlapping
// intervals; ipset would count the inner one twice).
type guestElems struct {
	audit   bool
	deny    []flowElem     // deny rules on some ports
	denyAll []netip.Prefix // deny rules on every port
	fwd     []flowElem
	proxy   []uint16
	tcp     []uint16 // tcp rules' ports (timed elements decide)
}

func elemsOf(g Guest) guestElems {
	k := g.Kernel
	e := guestElems{audit: k.Audit, proxy: k.Proxied, tcp: k.TCP}
	var deny, fwd []flowElem
	for _, f := range k.Deny {
		if f.Ports == nil {
			e.denyAll = append(e.denyAll, f.Prefix.Masked())
			continue
		}
		for _, p := range f.Ports {
			deny = append(deny, flowElem{f.Prefix.Masked(), p})
		}
	}
	for _, f := range k.Forward {
		for _, p := range f.Ports {
			fwd = append(fwd, flowElem{f.Prefix.Masked(), p})
		}
	}
	e.denyAll = outermost(e.denyAll)
	e.deny = outermostFlows(deny)
	e.fwd = outermostFlows(fwd)
	return e
}

// outermost drops the prefixes inside another of the list (two CIDR
// ranges either nest or are disjoint), sorted.
func outermost(ps []netip.Prefix) []netip.Prefix {
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		return cmp.Or(cmp.Compare(a.Bits(), b.Bits()), a.Addr().Compare(b.Addr()))
	})
	var out []netip.Prefix
	for _, p := range ps {
		if !slices.ContainsFunc(out, func(o netip.Prefix) bool { return o.Contains(p.Addr()) }) {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}

func outermostFlows(fs []flowElem) []flowElem {
	byPort := map[uint16][]netip.Prefix{}
	for _, f := range fs {
		byPort[f.Port] = append(byPort[f.Port], f.Prefix)
	}
	var out []flowElem
	for _, port := range slices.Sorted(maps.Keys(byPort)) {
		for _, p := range outermost(byPort[port]) {
			out = append(out, flowElem{p, port})
		}
	}
	return out
}

// String renders the guest for comparisons and logs.
func (g Guest) String() string {
	e := elemsOf(g)
	var b strings.Builder
	fmt.Fprintf(&b, "%s(%s)", g.Addr, g.TAP)
	if e.audit {
		b.WriteString(" audit")
	}
	for _, p := range e.denyAll {
		fmt.Fprintf(&b, " deny:%s", p)
	}
	for _, f := range e.deny {
		fmt.Fprintf(&b, " deny:%s:%d", f.Prefix, f.Port)
	}
	for _, f := range e.fwd {
		fmt.Fprintf(&b, " fwd:%s:%d", f.Prefix, f.Port)
	}
	for _, p := range e.proxy {
		fmt.Fprintf(&b, " proxy:%d", p)
	}
	return b.String()
}

// Forwards reports whether the kernel forwards some of the guest's flows
// itself: its interface then needs IPv4 forwarding on.
func (g Guest) Forwards() bool { return !g.Kernel.Audit && len(g.Kernel.Forward) > 0 }

// Limits are the distinct max_connections of the guests the ruleset caps
// (not audit), sorted: one rule and two sets each, so a value no guest had
// before changes the rules (ErrNewLimit), not only elements.
func (s State) Limits() []int {
	var out []int
	for _, g := range s.Guests {
		if n := g.Kernel.MaxConnections; n > 0 && !g.Kernel.Audit && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// ErrNewLimit: UpdateProjects was asked for a max_connections no rule of
// the installed ruleset counts; the whole ruleset must be applied.
var ErrNewLimit = errors.New("a max_connections value the installed ruleset has no rule for")
