package firewall

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The ipsets of the kernel path (each guest's policy.Kernel), the
// nftables backend's k_* sets, keyed by the guest's address. A hash:*,net
// set matches an element whose range holds the address, trying its most
// specific ranges first; the elements are normalized (elemsOf) and no rule
// depends on which element matched, so overlaps change nothing, and deny
// wins because its sets are tested first.
const (
	ipsAudit = "vmegress-k-audit" // hash:ip: audit guests, all TCP to the data plane
	// ipsDeny holds guest . tcp:port . range of cidr deny rules. A deny on
	// every port (the nftables backend's k_deny_all) is stored for each
	// port the guest forwards or proxies: on any other port no rule allows
	// anything and the SYN is refused anyway (counted as a refusal for no
	// rule, not as a deny). Not hash:net,net: kernels often lack it.
	ipsDeny    = "vmegress-k-deny"
	ipsFwd     = "vmegress-k-forward" // hash:ip,port,net: guest . tcp:port . range, cidr allow
	ipsProxied = "vmegress-k-proxied" // hash:ip,port: guest . tcp:port, the data plane decides
	// ipsTCP and ipsTCPDeny hold guest . tcp:port . address with a timeout:
	// the resolver handed the address to the guest's project for a name a
	// tcp rule allows (or a tcp deny rule matches) on the port (Admit);
	// members come and go with DNS answers (Snapshot leaves them out).
	ipsTCP     = "vmegress-k-tcp"
	ipsTCPDeny = "vmegress-k-tcp-deny"
	// ipsRefused counts, per guest, the connections refused at the SYN (no
	// rule for the port): the ruleset adds the guest, its counters count;
	// members come and go with traffic (Snapshot leaves them out).
	ipsRefused = "vmegress-syn-refused"
	// ipsLimitPrefix + N holds the guests capped at N connections.
	ipsLimitPrefix = "vmegress-k-limit-"
	// ipsPrefix names every set of vmegress's (Cleanup removes them all).
	ipsPrefix = "vmegress-"
)

func ipsLimit(n int) string { return ipsLimitPrefix + strconv.Itoa(n) }

// ipsType is the type of each set vmegress creates.
func ipsType(name string) string {
	switch name {
	case ipsDeny, ipsFwd:
		return "hash:ip,port,net"
	case ipsProxied:
		return "hash:ip,port"
	case ipsTCP, ipsTCPDeny:
		return "hash:ip,port,ip"
	}
	return "hash:ip" // NATSet, ipsAudit, ipsRefused, limits
}

// permissive reports whether a member of the set lets more through (the
// others refuse more): element changes remove permissive members and add
// the others first, so no moment lets through what neither the old nor the
// new state would.
func permissive(name string) bool {
	return name == NATSet || name == ipsAudit || name == ipsFwd || name == ipsProxied
}

// ipsSets are the sets s's rules name, in a fixed order (limits last).
func ipsSets(s State) []string {
	out := []string{NATSet, ipsAudit, ipsDeny, ipsFwd, ipsProxied, ipsRefused, ipsTCP, ipsTCPDeny}
	for _, n := range s.Limits() {
		out = append(out, ipsLimit(n))
	}
	return out
}

// ipsMember is one element: its text (ipset's own notation, the key of
// comparisons) and its netlink form.
type ipsMember struct {
	key   string
	entry netlink.IPSetEntry
}

func u8(v uint8) *uint8    { return &v }
func u16(v uint16) *uint16 { return &v }

// halves are the ranges stored for p: a hash:*,net set cannot hold a /0,
// which is stored as its two /1 halves.
func halves(p netip.Prefix) []netip.Prefix {
	if p.Bits() != 0 {
		return []netip.Prefix{p}
	}
	return []netip.Prefix{netip.MustParsePrefix("0.0.0.0/1"), netip.MustParsePrefix("128.0.0.0/1")}
}

func ipOf(a netip.Addr) net.IP { return net.IP(a.AsSlice()) }

func hostMember(a netip.Addr) ipsMember {
	return ipsMember{a.String(), netlink.IPSetEntry{IP: ipOf(a)}}
}

func flowMember(g netip.Addr, p netip.Prefix, port uint16) ipsMember {
	return ipsMember{fmt.Sprintf("%s,tcp:%d,%s", g, port, p), netlink.IPSetEntry{
		IP: ipOf(g), Protocol: u8(unix.IPPROTO_TCP), Port: u16(port), IP2: ipOf(p.Addr()), CIDR2: uint8(p.Bits())}}
}

// ipsMembers are the members of every set of s but the volatile one, by set.
func ipsMembers(s State) map[string][]ipsMember {
	out := map[string][]ipsMember{}
	for _, a := range s.NATGuests {
		out[NATSet] = append(out[NATSet], hostMember(a))
	}
	for _, g := range s.Guests {
		e, a := elemsOf(g), g.Addr
		if e.audit {
			out[ipsAudit] = append(out[ipsAudit], hostMember(a))
			continue
		}
		for _, f := range denyFlows(e) {
			for _, h := range halves(f.Prefix) {
				out[ipsDeny] = append(out[ipsDeny], flowMember(a, h, f.Port))
			}
		}
		for _, f := range e.fwd {
			for _, h := range halves(f.Prefix) {
				out[ipsFwd] = append(out[ipsFwd], flowMember(a, h, f.Port))
			}
		}
		for _, p := range e.proxy {
			out[ipsProxied] = append(out[ipsProxied], ipsMember{fmt.Sprintf("%s,tcp:%d", a, p), netlink.IPSetEntry{
				IP: ipOf(a), Protocol: u8(unix.IPPROTO_TCP), Port: u16(p)}})
		}
		if n := g.Kernel.MaxConnections; n > 0 {
			out[ipsLimit(n)] = append(out[ipsLimit(n)], hostMember(a))
		}
	}
	return out
}

// denyFlows are the guest's deny elements with those on every port stored
// for each port it forwards or proxies, normalized.
func denyFlows(e guestElems) []flowElem {
	ports := slices.Concat(e.proxy, e.tcp)
	for _, f := range e.fwd {
		ports = append(ports, f.Port)
	}
	slices.Sort(ports)
	ports = slices.Compact(ports)
	deny := slices.Clone(e.deny)
	for _, p := range e.denyAll {
		for _, port := range ports {
			deny = append(deny, flowElem{p, port})
		}
	}
	return outermostFlows(deny)
}

// memberKey is the text of a listed element of a set of type typ, as
// ipsMembers writes it.
func memberKey(typ string, e netlink.IPSetEntry) string {
	ip := func(a net.IP) string {
		if a4 := a.To4(); a4 != nil {
			a = a4
		}
		return a.String()
	}
	cidr := func(a net.IP, bits uint8) string {
		if bits == 0 {
			bits = 32 // a hash:*,net set holds no /0
		}
		return fmt.Sprintf("%s/%d", ip(a), bits)
	}
	port := func() string {
		proto, p := "tcp", uint16(0)
		if e.Protocol != nil && *e.Protocol != unix.IPPROTO_TCP {
			proto = strconv.Itoa(int(*e.Protocol))
		}
		if e.Port != nil {
			p = *e.Port
		}
		return fmt.Sprintf("%s:%d", proto, p)
	}
	switch typ {
	case "hash:ip,port,net":
		return ip(e.IP) + "," + port() + "," + cidr(e.IP2, e.CIDR2)
	case "hash:ip,port":
		return ip(e.IP) + "," + port()
	}
	return ip(e.IP)
}

// listSet returns the set's type and member keys, sorted; ok false when
// it does not exist.
func (b *IPTables) listSet(name string) (typ string, keys []string, ok bool, err error) {
	res, err := b.Sets.IpsetList(name)
	if errors.Is(err, syscall.ENOENT) {
		return "", nil, false, nil
	}
	if err != nil {
		return "", nil, false, fmt.Errorf("listing ipset %s: %w", name, err)
	}
	for _, e := range res.Entries {
		keys = append(keys, memberKey(res.TypeName, e))
	}
	slices.Sort(keys)
	return res.TypeName, keys, true, nil
}

// ensureSets creates the sets s's rules name that do not exist yet
// (rules can only name a set that exists); a set of the wrong type is an
// error (a set the rules name cannot be destroyed).
func (b *IPTables) ensureSets(s State) error {
	for _, name := range ipsSets(s) {
		typ, _, ok, err := b.listSet(name)
		if err != nil {
			return err
		}
		if ok && typ != ipsType(name) {
			return fmt.Errorf("ipset %s has type %s, want %s (run vmegress cleanup to remove it)", name, typ, ipsType(name))
		}
		if ok {
			continue
		}
		opts := netlink.IpsetCreateOptions{Replace: true, Counters: name == ipsRefused}
		if name == ipsTCP || name == ipsTCPDeny {
			opts.Timeout = u32(0) // per-member timeouts (0: no default)
		}
		if err := b.Sets.IpsetCreate(name, ipsType(name), opts); err != nil {
			return fmt.Errorf("creating ipset %s: %w", name, err)
		}
	}
	return nil
}

// setOp is one element change.
type setOp struct {
	set string
	del bool
	m   ipsMember
}

// phased orders element changes: first those that let less through
// (permissive members removed, refusing ones added), then the others.
func phased(ops []setOp) []setOp {
	first := func(o setOp) bool { return permissive(o.set) == o.del }
	var a, b []setOp
	for _, o := range ops {
		if first(o) {
			a = append(a, o)
		} else {
			b = append(b, o)
		}
	}
	return append(a, b...)
}

// diffOps are the changes that make sets holding have hold want (both by
// set; keys only are compared).
func diffOps(have map[string][]string, want map[string][]ipsMember, sets []string) []setOp {
	var ops []setOp
	for _, set := range sets {
		wantKeys := map[string]bool{}
		for _, m := range want[set] {
			wantKeys[m.key] = true
		}
		haveKeys := map[string]bool{}
		for _, k := range have[set] {
			haveKeys[k] = true
			if !wantKeys[k] {
				ops = append(ops, setOp{set: set, del: true, m: ipsMember{key: k}})
			}
		}
		for _, m := range want[set] {
			if !haveKeys[m.key] {
				ops = append(ops, setOp{set: set, m: m})
				haveKeys[m.key] = true
			}
		}
	}
	return phased(ops)
}

// runOps applies ops in order; an element to delete is found by its key
// among the members it was listed or computed with (byKey).
func (b *IPTables) runOps(ops []setOp, byKey map[string]map[string]netlink.IPSetEntry) error {
	var errs []error
	for _, o := range ops {
		if o.del {
			e, ok := byKey[o.set][o.m.key]
			if !ok {
				errs = append(errs, fmt.Errorf("removing %s from ipset %s: no such member listed", o.m.key, o.set))
				continue
			}
			e.Replace = true // a member already gone is not an error
			if err := b.Sets.IpsetDel(o.set, &e); err != nil {
				errs = append(errs, fmt.Errorf("removing %s from ipset %s: %w", o.m.key, o.set, err))
			}
			continue
		}
		e := o.m.entry
		e.Replace = true // a member already there is not an error
		if err := b.Sets.IpsetAdd(o.set, &e); err != nil {
			errs = append(errs, fmt.Errorf("adding %s to ipset %s: %w", o.m.key, o.set, err))
		}
	}
	return errors.Join(errs...)
}

// fillSets makes every set of s hold exactly s's members, element by
// element in phased order, from what the kernel lists (whatever a previous
// run left).
func (b *IPTables) fillSets(s State) error {
	want := ipsMembers(s)
	have := map[string][]string{}
	byKey := map[string]map[string]netlink.IPSetEntry{}
	var sets []string
	for _, name := range ipsSets(s) {
		if name == ipsRefused || name == ipsTCP || name == ipsTCPDeny {
			continue // filled by traffic and DNS answers, not by the state
		}
		sets = append(sets, name)
		res, err := b.Sets.IpsetList(name)
		if err != nil {
			return fmt.Errorf("listing ipset %s: %w", name, err)
		}
		byKey[name] = map[string]netlink.IPSetEntry{}
		for _, e := range res.Entries {
			k := memberKey(res.TypeName, e)
			have[name] = append(have[name], k)
			byKey[name][k] = netlink.IPSetEntry{IP: e.IP, CIDR: e.CIDR, IP2: e.IP2, CIDR2: e.CIDR2, Port: e.Port, Protocol: e.Protocol}
		}
	}
	return b.runOps(diffOps(have, want, sets), byKey)
}

// updateSets moves the sets' members from old's to s's, element by
// element in phased order.
func (b *IPTables) updateSets(old, s State) error {
	from, to := ipsMembers(old), ipsMembers(s)
	have := map[string][]string{}
	byKey := map[string]map[string]netlink.IPSetEntry{}
	for set, ms := range from {
		byKey[set] = map[string]netlink.IPSetEntry{}
		for _, m := range ms {
			have[set] = append(have[set], m.key)
			byKey[set][m.key] = m.entry
		}
	}
	sets := slices.Sorted(func(yield func(string) bool) {
		seen := map[string]bool{}
		for _, m := range []map[string][]ipsMember{from, to} {
			for set := range m {
				if !seen[set] {
					seen[set] = true
					if !yield(set) {
						return
					}
				}
			}
		}
	})
	return b.runOps(diffOps(have, to, sets), byKey)
}

// destroySets destroys vmegress's sets but those in keep: Apply's stale
// ones (limit values no guest has now, the scratch set of older versions),
// Cleanup's all.
func (b *IPTables) destroySets(keep []string) error {
	all, err := b.Sets.IpsetListAll()
	if err != nil {
		return fmt.Errorf("listing ipsets: %w", err)
	}
	var errs []error
	for _, set := range all {
		if !strings.HasPrefix(set.SetName, ipsPrefix) || slices.Contains(keep, set.SetName) {
			continue
		}
		if err := b.Sets.IpsetDestroy(set.SetName); err != nil && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("destroying ipset %s: %w", set.SetName, err))
		}
	}
	return errors.Join(errs...)
}
