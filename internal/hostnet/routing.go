// Package hostnet holds vmegress's host network plumbing done over netlink:
// the policy routing that delivers TPROXY-marked packets to local sockets.
package hostnet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteProtocol tags every rule and route vmegress adds (the "proto" column of
// `ip rule`/`ip route`), so cleanup removes exactly its own entries. 118 ('v')
// is not assigned in iproute2's rt_protos.
const RouteProtocol = 118

// RulePriority is the preference of the fwmark rule: before the main table
// (32766), after the local table (0).
const RulePriority = 9000

// Netlink is the part of a netlink handle that routing uses (a *netlink.Handle).
type Netlink interface {
	RuleListFiltered(family int, filter *netlink.Rule, filterMask uint64) ([]netlink.Rule, error)
	RuleAdd(rule *netlink.Rule) error
	RuleDel(rule *netlink.Rule) error
	RouteListFiltered(family int, filter *netlink.Route, filterMask uint64) ([]netlink.Route, error)
	RouteReplace(route *netlink.Route) error
	RouteDel(route *netlink.Route) error
	LinkByName(name string) (netlink.Link, error)
}

// PolicyRouting is `ip rule add fwmark MARK lookup TABLE` plus
// `ip route add local 0.0.0.0/0 dev lo table TABLE` (spec 6.3, 6.4).
//
// With Lock set it adds the routing lock, a layer under the ruleset: a
// packet from a guest address (Lock) that the kernel would forward is
// routed only if the ruleset marked it LockMark (a flow it forwards: cidr
// rules, direct NAT egress, inbound SSH replies); any other is blackholed.
// Should the ruleset vanish, nothing from a guest is routed on:
//
//	9001: from all fwmark LockMark/LockMark lookup main
//	9002: from Lock iif lo lookup main   (the host's own packets)
//	9003: from Lock blackhole
//
// Local destinations are settled by rule 0 (table local) before any of
// these, so the data plane and the resolver are unaffected.
type PolicyRouting struct {
	Mark     uint32
	Table    uint32
	Lock     netip.Prefix
	LockMark uint32
}

// rules are the rules r wants, the fwmark rule first.
func (r PolicyRouting) rules() []*netlink.Rule {
	out := []*netlink.Rule{r.rule()}
	if !r.Lock.IsValid() {
		return out
	}
	src := &net.IPNet{IP: r.Lock.Masked().Addr().AsSlice(), Mask: net.CIDRMask(r.Lock.Bits(), 32)}
	marked := netlink.NewRule()
	marked.Family, marked.Mark, marked.Table, marked.Priority, marked.Protocol = unix.AF_INET, r.LockMark, unix.RT_TABLE_MAIN, RulePriority+1, RouteProtocol
	mask := r.LockMark
	marked.Mask = &mask
	host := netlink.NewRule()
	host.Family, host.Src, host.IifName, host.Table, host.Priority, host.Protocol = unix.AF_INET, src, "lo", unix.RT_TABLE_MAIN, RulePriority+2, RouteProtocol
	hole := netlink.NewRule()
	hole.Family, hole.Src, hole.Priority, hole.Protocol, hole.Type = unix.AF_INET, src, RulePriority+3, RouteProtocol, unix.FR_ACT_BLACKHOLE
	hole.Table = -1
	return append(out, marked, host, hole)
}

// sameRule compares the fields vmegress sets.
func sameRule(a, b *netlink.Rule) bool {
	mask := func(m *uint32) uint32 {
		if m == nil {
			return 0xffffffff
		}
		return *m
	}
	src := func(n *net.IPNet) string {
		if n == nil {
			return ""
		}
		return n.String()
	}
	// What the rule does: a lookup in its table, or blackhole (netlink's
	// listing does not report the action; a rule with no table is ours
	// only as the blackhole).
	action := func(x *netlink.Rule) string {
		if x.Type == unix.FR_ACT_BLACKHOLE || (x.Type == 0 && x.Table == 0) {
			return "blackhole"
		}
		return fmt.Sprint("lookup ", x.Table)
	}
	return a.Priority == b.Priority && a.Mark == b.Mark && (a.Mark == 0 || mask(a.Mask) == mask(b.Mask)) &&
		src(a.Src) == src(b.Src) && a.IifName == b.IifName && action(a) == action(b)
}

func (r PolicyRouting) rule() *netlink.Rule {
	rule := netlink.NewRule()
	rule.Family = unix.AF_INET
	rule.Mark = r.Mark
	mask := uint32(0xffffffff)
	rule.Mask = &mask
	rule.Table = int(r.Table)
	rule.Priority = RulePriority
	rule.Protocol = RouteProtocol
	return rule
}

func (r PolicyRouting) route(nl Netlink) (*netlink.Route, error) {
	lo, err := nl.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("finding the loopback interface: %w", err)
	}
	_, all, _ := net.ParseCIDR("0.0.0.0/0")
	return &netlink.Route{
		LinkIndex: lo.Attrs().Index,
		Dst:       all,
		Table:     int(r.Table),
		Type:      unix.RTN_LOCAL,
		Scope:     unix.RT_SCOPE_HOST,
		Protocol:  RouteProtocol,
		Family:    unix.AF_INET,
	}, nil
}

// ours lists vmegress's fwmark rules for this table (any mark, so a changed
// mark is cleaned up too).
func (r PolicyRouting) ours(nl Netlink) ([]netlink.Rule, error) {
	rules, err := nl.RuleListFiltered(unix.AF_INET, nil, 0)
	if err != nil {
		return nil, fmt.Errorf("listing policy routing rules: %w", err)
	}
	var out []netlink.Rule
	for _, x := range rules {
		if x.Protocol == RouteProtocol {
			out = append(out, x)
		}
	}
	return out, nil
}

// Ensure installs the rule and route if missing and removes stale vmegress
// rules (another mark or table). Running it twice changes nothing.
func (r PolicyRouting) Ensure(nl Netlink) error {
	wants := r.rules()
	have, err := r.ours(nl)
	if err != nil {
		return err
	}
	found := make([]bool, len(wants))
	var errs []error
	for _, x := range have {
		x := x
		keep := false
		for i, w := range wants {
			if !found[i] && sameRule(&x, w) {
				found[i], keep = true, true
				break
			}
		}
		if keep {
			continue
		}
		if err := nl.RuleDel(&x); err != nil {
			errs = append(errs, fmt.Errorf("removing stale rule %s: %w", x, err))
		}
	}
	// The blackhole goes in last: the rules that route marked and host
	// packets are in place before it.
	for i, w := range wants {
		if found[i] {
			continue
		}
		if err := nl.RuleAdd(w); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("adding policy routing rule %s: %w", w, err)
		}
	}
	rt, err := r.route(nl)
	if err != nil {
		return err
	}
	if err := nl.RouteReplace(rt); err != nil {
		return fmt.Errorf("adding route local 0.0.0.0/0 dev lo table %d: %w", r.Table, err)
	}
	return errors.Join(errs...)
}

// Remove deletes every rule and route vmegress added, whatever their mark
// and table (so it works without the config that added them).
// It is not an error if they are already gone.
func (r PolicyRouting) Remove(nl Netlink) error {
	have, err := r.ours(nl)
	if err != nil {
		return err
	}
	var errs []error
	for _, x := range have {
		x := x
		if err := nl.RuleDel(&x); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("removing rule %s: %w", x, err))
		}
	}
	// Every table: the route stays findable if route_table changed since up.
	routes, err := nl.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: unix.RT_TABLE_UNSPEC, Protocol: RouteProtocol},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("listing routes: %w", err))...)
	}
	for _, rt := range routes {
		if rt.Protocol != RouteProtocol {
			continue
		}
		rt := rt
		if err := nl.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("removing route %s from table %d: %w", rt, rt.Table, err))
		}
	}
	return errors.Join(errs...)
}

// Installed reports whether the rule and the route are both present.
func (r PolicyRouting) Installed(nl Netlink) (bool, error) {
	have, err := r.ours(nl)
	if err != nil {
		return false, err
	}
	ruleOK := true
	for _, w := range r.rules() {
		present := false
		for _, x := range have {
			x := x
			if sameRule(&x, w) {
				present = true
			}
		}
		ruleOK = ruleOK && present
	}
	routes, err := nl.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: int(r.Table)}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return false, fmt.Errorf("listing routes of table %d: %w", r.Table, err)
	}
	routeOK := false
	for _, rt := range routes {
		if rt.Protocol == RouteProtocol && rt.Type == unix.RTN_LOCAL {
			routeOK = true
		}
	}
	return ruleOK && routeOK, nil
}
