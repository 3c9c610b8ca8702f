// Package hostnet holds vmegress's host network plumbing done over netlink:
// the policy routing that delivers TPROXY-marked packets to local sockets.
package hostnet

import (
	"errors"
	"fmt"
	"net"

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
type PolicyRouting struct {
	Mark  uint32
	Table uint32
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
	want := r.rule()
	have, err := r.ours(nl)
	if err != nil {
		return err
	}
	found := false
	var errs []error
	for _, x := range have {
		if x.Mark == want.Mark && x.Table == want.Table && x.Priority == want.Priority && x.Mask != nil && *x.Mask == *want.Mask {
			found = true
			continue
		}
		x := x
		if err := nl.RuleDel(&x); err != nil {
			errs = append(errs, fmt.Errorf("removing stale rule %s: %w", x, err))
		}
	}
	if !found {
		if err := nl.RuleAdd(want); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("adding rule fwmark %#x lookup %d: %w", r.Mark, r.Table, err)
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
	ruleOK := false
	for _, x := range have {
		if x.Mark == r.Mark && x.Table == int(r.Table) {
			ruleOK = true
		}
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
