package policy

import (
	"net/netip"
	"slices"

	"github.com/vmegress/vmegress/internal/config"
)

// Kernel is the part of one project's decision that the host's ruleset
// carries out at a connection's first packet, with no data plane: what
// needs no inspection. It is derived from the compiled project, so the
// kernel and ConnectWith cannot disagree:
//
//   - Deny: a cidr deny rule refuses the destination (ConnectWith's first
//     step): the kernel answers with a reset.
//   - tcp deny rules: the resolver's answers for names they match become
//     timed elements (TCPDenies) refused right after the cidr denies.
//   - Forward: a cidr allow rule allows it: the kernel forwards it itself.
//   - TCP: a tcp allow rule's port: forwarded when the resolver handed the
//     address out for a name the rule allows (a timed element, TCPAllows).
//   - Proxied: the ports some sni or http rule may allow on: the data
//     plane decides.
//   - anything else: no rule of any kind can allow it, and the kernel
//     answers the SYN with a reset.
//
// An audit project (Audit) sends everything to the data plane, which logs
// what enforcement would refuse; its other fields are empty. A project with
// max_connections (MaxConnections) has its new connections counted by the
// ruleset too (conntrack count per guest), so the flows the kernel
// forwards are capped like the proxied ones.
type Kernel struct {
	Audit          bool
	MaxConnections int
	Deny           []KernelFlow
	Forward        []KernelFlow
	Proxied        []uint16
	// TCP are the ports of tcp allow rules: the kernel forwards a connection there when the resolver
	// handed the project its destination for a name such a rule allows
	// (a timed set element, added before the answer leaves: TCPAllows);
	// else the port is Proxied too when a name rule of another kind needs
	// the data plane, or refused at the SYN.
	TCP []uint16
}

// KernelFlow is a destination range on some ports.
type KernelFlow struct {
	Prefix netip.Prefix
	// Ports; nil: every port (deny rules only).
	Ports []uint16
	// Rule is the rule as written (deny rules prefixed DenyPrefix).
	Rule string
}

// Kernel returns what the ruleset does for the project's guest, computed
// once when the project was compiled (its slices are shared: read only).
func (pr *Project) Kernel() Kernel { return pr.kernel }

// buildKernel derives Kernel from the compiled rules. IPv6 ranges are left
// out: guests' IPv6 never leaves the host.
func (pr *Project) buildKernel() Kernel {
	if pr.Audit {
		return Kernel{Audit: true}
	}
	k := Kernel{MaxConnections: pr.MaxConnections}
	for _, c := range pr.denyCIDRs {
		if c.prefix.Addr().Is4() {
			k.Deny = append(k.Deny, KernelFlow{c.prefix, c.ports, c.rule})
		}
	}
	proxied := map[uint16]bool{}
	for p := range pr.sniPorts {
		proxied[p] = true
	}
	for p := range pr.httpPorts {
		proxied[p] = true
	}
	// tcp deny rules are timed elements too (TCPDenies), checked before
	// the cidr allows: the kernel weighs them as ConnectWith does.
	for _, c := range pr.cidrs {
		if c.prefix.Addr().Is4() {
			k.Forward = append(k.Forward, KernelFlow{c.prefix, c.ports, c.rule})
		}
	}
	for p := range pr.tcpPorts {
		if p != config.SMTPPort {
			k.TCP = append(k.TCP, p)
		}
	}
	slices.Sort(k.TCP)
	delete(proxied, 0)
	k.Proxied = make([]uint16, 0, len(proxied))
	for p := range proxied {
		k.Proxied = append(k.Proxied, p)
	}
	slices.Sort(k.Proxied)
	return k
}

// TCPDenies returns the tcp deny rule that matches name on port (every
// port when the rule names none: ports nil), if any: a resolver answer for
// name then bars its addresses there (a timed element checked before any
// allow), as ConnectWith's tcp deny does. Audit projects: none.
func (pr *Project) TCPDenies(name string) (rule string, ports []uint16, ok bool) {
	if pr.Audit {
		return "", nil, false
	}
	found := false
	pr.denyTCP.candidates(name, func(rs []portRule) bool {
		for _, r := range rs {
			if !found {
				rule, found = r.rule, true
			}
			if r.ports == nil {
				ports = nil
				return true
			}
			ports = append(ports, r.ports...)
		}
		return false
	})
	if !found {
		return "", nil, false
	}
	if ports != nil {
		slices.Sort(ports)
		ports = slices.Compact(ports)
	}
	return rule, ports, true
}

// Decide decides dst for the project's guest the way the ruleset built from Kernel does:
// Deny, Allow (forwarded by the kernel), or "" with proxied true (the data
// plane decides) or false (refused at the SYN). For tests and explain.
func (k Kernel) Decide(dst netip.AddrPort) (v Verdict, rule string, proxied bool) {
	if k.Audit {
		return "", "", true
	}
	a, port := dst.Addr().Unmap(), dst.Port()
	in := func(f KernelFlow) bool {
		return f.Prefix.Contains(a) && (f.Ports == nil || slices.Contains(f.Ports, port))
	}
	for _, f := range k.Deny {
		if in(f) {
			return Deny, f.Rule, false
		}
	}
	for _, f := range k.Forward {
		if in(f) {
			return Allow, f.Rule, false
		}
	}
	return "", "", slices.Contains(k.Proxied, port)
}

// TCPAllows returns the tcp allow rule that allows name on port when the
// kernel decides that port (Kernel.TCP): a resolver answer for name then
// admits its addresses on port.
func (pr *Project) TCPAllows(name string, port uint16) (string, bool) {
	if pr.Audit || port == config.SMTPPort || !pr.tcpPorts[port] {
		return "", false
	}
	return pr.tcp.match(name, port)
}
