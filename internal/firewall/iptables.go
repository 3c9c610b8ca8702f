package firewall

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmegress/vmegress/internal/policy"
)

// IPTables is the iptables backend: the spec's own rule shape (mangle
// PREROUTING -j TPROXY --tproxy-mark M/M --on-port P) in chains of
// vmegress's own (VMEGRESS-*), each entered by one jump rule at the top of
// a built-in chain, plus ipsets holding the guest addresses of direct-NAT
// projects and the kernel part of each guest's policy (the nftables
// backend's sets, same rule order and meaning), so the rules do not grow
// with the number of projects. The only per-project rules are inbound SSH
// forwards (iptables has no DNAT map): one rule each in chain VMEGRESS-SSH;
// and one rule per distinct max_connections value.
//
// iptables-restore commits table by table, so Apply is atomic per table;
// should a later table fail, Apply puts the earlier tables' vmegress chains
// back as they were, so a failed apply leaves the previous rules in force.
type IPTables struct {
	// Exec runs iptables-restore, iptables-save and their ip6tables twins
	// with stdin (zero: os/exec with LC_ALL=C).
	Exec func(ctx context.Context, stdin []byte, argv ...string) ([]byte, error)
	// Sets manages the ipsets (a *netlink.Handle for the current netns).
	Sets IPSets
	// limits are the max_connections values the installed rules count (set
	// by Apply; nil: unknown, UpdateProjects then needs an Apply for any).
	limits []int

	mu sync.Mutex
	// guestPorts are each guest's ports with rules (forwarded, proxied,
	// tcp), from the last Apply or UpdateProjects: where Admit stores a
	// deny on every port.
	guestPorts map[netip.Addr][]uint16
}

// notePorts records s's guests' ports (guestPorts).
func (b *IPTables) notePorts(old *State, s State) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.guestPorts == nil || old == nil {
		b.guestPorts = map[netip.Addr][]uint16{}
	}
	if old != nil {
		for _, g := range old.Guests {
			delete(b.guestPorts, g.Addr)
		}
	}
	for _, g := range s.Guests {
		e := elemsOf(g)
		ports := slices.Concat(e.proxy, e.tcp)
		for _, f := range e.fwd {
			ports = append(ports, f.Port)
		}
		slices.Sort(ports)
		b.guestPorts[g.Addr] = slices.Compact(ports)
	}
}

// IPSets is the part of the kernel's ipset interface the backend uses
// (*netlink.Handle implements it).
type IPSets interface {
	IpsetCreate(name, typename string, opts netlink.IpsetCreateOptions) error
	IpsetDestroy(name string) error
	IpsetSwap(a, b string) error
	IpsetList(name string) (*netlink.IPSetResult, error)
	IpsetListAll() ([]netlink.IPSetResult, error)
	IpsetAdd(name string, e *netlink.IPSetEntry) error
	IpsetDel(name string, e *netlink.IPSetEntry) error
}

// NATSet is the ipset of guest addresses whose projects have direct NAT
// egress.
const NATSet = "vmegress-nat"

// NewHostIPTables returns the iptables backend for the current network
// namespace. It fails when iptables-restore is missing.
func NewHostIPTables() (*IPTables, error) {
	for _, bin := range []string{"iptables-restore", "iptables-save", "ip6tables-restore", "ip6tables-save"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("setting up iptables (is the iptables package installed?): %w", err)
		}
	}
	h, err := netlink.NewHandle(syscall.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("opening netlink for ipset: %w", err)
	}
	return &IPTables{Sets: h}, nil
}

// Close releases the ipset handle.
func (b *IPTables) Close() {
	if c, ok := b.Sets.(interface{ Close() }); ok {
		c.Close()
	}
}

// Describe names what the backend installs.
func (b *IPTables) Describe() string { return "iptables chains VMEGRESS-* and ipsets vmegress-*" }

// execStdin runs argv with stdin (nil: none) in the C locale; a failure
// carries the command's stderr.
func execStdin(ctx context.Context, stdin []byte, argv ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("running %s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

func (b *IPTables) run(ctx context.Context, stdin []byte, argv ...string) ([]byte, error) {
	if b.Exec != nil {
		return b.Exec(ctx, stdin, argv...)
	}
	return execStdin(ctx, stdin, argv...)
}

// ipTable is one (family, table) vmegress has chains in.
type ipTable struct {
	v6    bool
	name  string
	jumps []jump // into vmegress's chains from built-in ones
}

type jump struct{ from, to string }

// String is the jump as iptables-save prints it.
func (j jump) String() string { return "-A " + j.from + " -j " + j.to }

// ipTables lists every table vmegress touches, in apply order: IPv6 first
// (its only job is to drop), then raw (the source checks, which mangle
// relies on), then mangle (interception) before the tables that accept.
var ipTables = []ipTable{
	{v6: true, name: "mangle", jumps: []jump{{"PREROUTING", "VMEGRESS-PREROUTING"}}},
	{name: "raw", jumps: []jump{{"PREROUTING", "VMEGRESS-RAW"}}},
	{name: "mangle", jumps: []jump{{"PREROUTING", "VMEGRESS-PREROUTING"}, {"OUTPUT", "VMEGRESS-OUTPUT"}}},
	{name: "nat", jumps: []jump{{"PREROUTING", "VMEGRESS-NAT-PRE"}, {"POSTROUTING", "VMEGRESS-NAT-POST"}}},
	{name: "filter", jumps: []jump{{"INPUT", "VMEGRESS-INPUT"}, {"FORWARD", "VMEGRESS-FORWARD"}}},
}

// tableNamed is the IPv4 table name of ipTables.
func tableNamed(name string) ipTable {
	for _, t := range ipTables {
		if !t.v6 && t.name == name {
			return t
		}
	}
	panic("no iptables table " + name)
}

func (t ipTable) String() string {
	if t.v6 {
		return "ip6 " + t.name
	}
	return "ip " + t.name
}

func (t ipTable) save() []string {
	if t.v6 {
		return []string{"ip6tables-save", "-t", t.name}
	}
	return []string{"iptables-save", "-t", t.name}
}

func (t ipTable) restore() []string {
	if t.v6 {
		return []string{"ip6tables-restore", "--noflush"}
	}
	return []string{"iptables-restore", "--noflush"}
}

// logicalChain maps vmegress's iptables chains to the nftables backend's
// chain names, so counters (metrics) are named alike on both backends.
var logicalChain = map[string]string{
	"VMEGRESS-RAW":           "raw_prerouting",
	"VMEGRESS-GUEST":         "prerouting",
	"VMEGRESS-PREROUTING":    "prerouting",
	"VMEGRESS-OUTPUT":        "output",
	"VMEGRESS-NAT-PRE":       "nat_prerouting",
	"VMEGRESS-NAT-GUEST":     "nat_prerouting",
	"VMEGRESS-SSH":           "nat_prerouting",
	"VMEGRESS-NAT-POST":      "nat_postrouting",
	"VMEGRESS-INPUT":         "input",
	"VMEGRESS-FORWARD":       "forward",
	"VMEGRESS-NAT-EGRESS":    "forward",
	"VMEGRESS-NEW":           "prerouting",
	"VMEGRESS-REFUSE":        "prerouting",
	"VMEGRESS-KFWD":          "prerouting",
	"VMEGRESS-PASS":          "prerouting",
	"VMEGRESS-KERNEL-EGRESS": "forward",
}

// refusedCTMark is the conntrack mark bit of a connection whose first
// packet the mangle chains refused: VMEGRESS-INPUT answers it with a reset
// (iptables' REJECT works only in the filter table). The connection is
// normally never confirmed, so no other packet carries it (should a SYN
// sent again on a confirmed one be refused, after a policy change, its
// later packets are reset too: the refusal stands). Only this bit is set
// or tested.
const refusedCTMark uint32 = 0x00800000

// ifaceRE is what an interface name (or pattern) may hold here: nothing
// that could break out of an iptables-restore line.
var ifaceRE = regexp.MustCompile(`^[A-Za-z0-9_.:@-]{1,15}\*?$`)

// iptIface turns a guest_interfaces entry into iptables' form ("tap-*" is
// "tap-+").
func iptIface(name string) (string, error) {
	if !ifaceRE.MatchString(name) {
		return "", fmt.Errorf("guest interface %q is not a valid interface name or pattern", name)
	}
	return strings.Replace(name, "*", "+", 1), nil
}

// iptRules is the desired content of vmegress's chains: per table, chain
// declarations and rules in iptables-restore form.
type iptRules map[string][]string

// RenderIPTables returns vmegress's chains for s, keyed by table ("ip
// mangle", "ip6 mangle", ...), in iptables-restore form (chain
// declarations, then -A lines). Jumps from built-in chains are not included.
func RenderIPTables(s State) (map[string][]string, error) {
	var ifaces []string
	for _, g := range s.GuestInterfaces {
		i, err := iptIface(g)
		if err != nil {
			return nil, err
		}
		ifaces = append(ifaces, i)
	}
	if !s.VMCIDR.Addr().Is4() {
		return nil, fmt.Errorf("vm_cidr %s is not IPv4", s.VMCIDR)
	}
	out := iptRules{}
	add := func(table, chain, rule, comment string) {
		if comment != "" {
			rule += " -m comment --comment " + strconv.Quote(comment)
		}
		out[table] = append(out[table], "-A "+chain+" "+rule)
	}
	// Verdict placement: the mangle and nat chains only drop, or RETURN
	// to let the built-in chain go on (the nftables backend's "accept" in a
	// table of its own); the filter chains ACCEPT the flows vmegress exists
	// to let through (the spec's FORWARD ... -j ACCEPT), so a host whose
	// INPUT or FORWARD policy is DROP still works.
	guestIn := func(table, chain, rule, comment string) {
		for _, i := range ifaces {
			add(table, chain, "-i "+i+" "+rule, comment)
		}
	}
	guestOut := func(table, chain, rule, comment string) {
		for _, i := range ifaces {
			add(table, chain, "-o "+i+" "+rule, comment)
		}
	}
	natSrc := "-m set --match-set " + NATSet + " src"
	cidr := s.VMCIDR.Masked().String()
	mark := fmt.Sprintf("%#x", s.Mark)
	kMark := fmt.Sprintf("%#x", KernelMark)
	ctK := fmt.Sprintf("-m connmark --mark %#x/%#x", KernelCTMark, KernelCTMark)
	ctRefused := fmt.Sprintf("-m connmark --mark %#x/%#x", refusedCTMark, refusedCTMark)
	tproxy := fmt.Sprintf("-j TPROXY --on-port %d --on-ip 0.0.0.0 --tproxy-mark %s/%s", s.TProxyPort, mark, mark)

	const m6 = "ip6 mangle"
	guestIn(m6, "VMEGRESS-PREROUTING", "-j DROP", "guest IPv6 (and anything not IPv4) never leaves")

	const m = "ip mangle"
	// Only traffic from guests is handled: goto, so a RETURN in
	// VMEGRESS-GUEST goes back to PREROUTING itself.
	guestIn(m, "VMEGRESS-PREROUTING", "-g VMEGRESS-GUEST", "")
	// The source checks in the raw table, before conntrack sees the packet
	// (as nftables' raw_prerouting): a spoofed packet never touches another
	// guest's conntrack entry.
	const r = "ip raw"
	guestIn(r, "VMEGRESS-RAW", "! -s "+cidr+" -j DROP", "source outside the guest range: spoofed")
	// Reverse-path check in the ruleset, whatever rp_filter says.
	guestIn(r, "VMEGRESS-RAW", "-m rpfilter --invert -j DROP", "anti-spoofing: source address does not belong behind this interface")
	// A kernel-forwarded flow's packets leave after the reverse-path
	// check alone, as on nftables (its SYN passed the rest; a packet with
	// IP options falls through to their drop).
	// Only its original direction: conntrack matches a reply by the header
	// alone, whatever interface it came in on.
	add(m, "VMEGRESS-GUEST", ctK+` -m conntrack --ctdir ORIGINAL -m u32 --u32 "0>>24&0xF=5" -g VMEGRESS-PASS`, "a flow the kernel forwards (cidr or tcp rule): no data plane")
	add(m, "VMEGRESS-GUEST", ctK+" -m conntrack --ctdir REPLY -j DROP", "a kernel-forwarded flow's reply never comes from a guest")
	add(m, "VMEGRESS-GUEST", "-m addrtype --src-type LOCAL -j DROP", "anti-spoofing: source is one of the host's own addresses")
	// The nftables backend's "mark ... accept": goto VMEGRESS-PASS, which
	// marks the packet for the routing lock and ends vmegress's chains.
	add(m, "VMEGRESS-GUEST", "-m conntrack --ctstate DNAT --ctdir REPLY -g VMEGRESS-PASS", "replies of inbound SSH to the guest (marked: the routing lock routes them)")
	add(m, "VMEGRESS-GUEST", natSrc+" -g VMEGRESS-PASS", "direct NAT egress: not intercepted (marked: the routing lock routes it)")
	// IP options (a source route through a host address would be routed
	// on past the rules' destination check): guests never need them. The
	// header length is the low nibble of the first byte: 5 words, no options.
	add(m, "VMEGRESS-GUEST", `-m u32 ! --u32 "0>>24&0xF=5" -j DROP`, "IP options (source routing): dropped")
	add(m, "VMEGRESS-GUEST", "-p tcp --dport 853 -j DROP", "no DNS over TLS: guests use the allowlist resolver")
	add(m, "VMEGRESS-GUEST", "-p udp --dport 53 -j RETURN", "guest DNS, to any address: redirected to the resolver by chain nat_prerouting")
	add(m, "VMEGRESS-GUEST", "-p tcp --dport 53 -j RETURN", "guest DNS, to any address: redirected to the resolver by chain nat_prerouting")
	// xt_TPROXY drops the packet itself when no socket listens on the port.
	add(m, "VMEGRESS-GUEST", "-p tcp -m set --match-set "+ipsAudit+" src "+tproxy, "audit project: all TCP to the data plane, which logs what enforcement would refuse")
	// A connection's first packet is decided in VMEGRESS-NEW by the
	// guest's set members; the packets after it follow their flow (kernel
	// forwarded, or a data plane socket).
	add(m, "VMEGRESS-GUEST", "-p tcp -m conntrack --ctstate NEW -g VMEGRESS-NEW", "")
	add(m, "VMEGRESS-GUEST", "-p tcp "+tproxy, "the rest of a proxied flow: to the data plane's socket")
	add(m, "VMEGRESS-GUEST", "-j DROP", "fail closed: no listener, or not TCP (UDP, QUIC, ICMP, other protocols)")

	add(m, "VMEGRESS-NEW", "-m set --match-set "+ipsDeny+" src,dst,dst -g VMEGRESS-REFUSE", "cidr deny rule: refused")
	add(m, "VMEGRESS-NEW", "-m set --match-set "+ipsTCPDeny+" src,dst,dst -g VMEGRESS-REFUSE", "tcp deny rule: the address was handed out for a denied name")
	for _, n := range s.Limits() {
		add(m, "VMEGRESS-NEW", fmt.Sprintf("-m set --match-set %s src -m connlimit --connlimit-above %d --connlimit-mask 32 --connlimit-saddr -g VMEGRESS-REFUSE", ipsLimit(n), n),
			"max_connections: over the project's cap, refused")
	}
	add(m, "VMEGRESS-NEW", "-m set --match-set "+ipsFwd+" src,dst,dst -g VMEGRESS-KFWD", "cidr allow rule: forwarded by the kernel, no data plane")
	add(m, "VMEGRESS-NEW", "-m set --match-set "+ipsTCP+" src,dst,dst -g VMEGRESS-KFWD", "tcp rule: the resolver handed this address out for an allowed name: forwarded by the kernel")
	add(m, "VMEGRESS-NEW", "-p tcp -m set --match-set "+ipsProxied+" src,dst "+tproxy, "a port with name rules: to the data plane, marked for local delivery")
	// The guest is added (a member already there keeps its counters), then
	// the match counts; a full set still leaves the refusal below.
	add(m, "VMEGRESS-NEW", "-j SET --add-set "+ipsRefused+" src", "count the refusal per guest")
	add(m, "VMEGRESS-NEW", "-m set --match-set "+ipsRefused+" src", "count the refusal per guest")
	add(m, "VMEGRESS-NEW", "-g VMEGRESS-REFUSE", "no rule of the guest's project for this port: refused at the SYN")

	// iptables rejects only in the filter table: a refused first packet is
	// marked for local delivery (the TPROXY mark: the policy routing's
	// local table, whatever the interface's forwarding) and its
	// connection for VMEGRESS-INPUT, which answers it with a reset. The
	// connection is never confirmed, so the conntrack mark goes with it.
	add(m, "VMEGRESS-REFUSE", fmt.Sprintf("-j CONNMARK --or-mark %#x", refusedCTMark), "")
	add(m, "VMEGRESS-REFUSE", "-j MARK --set-mark "+mark, "")
	add(m, "VMEGRESS-KFWD", fmt.Sprintf("-j CONNMARK --or-mark %#x", KernelCTMark), "")
	add(m, "VMEGRESS-KFWD", "-j MARK --or-mark "+kMark, "")
	add(m, "VMEGRESS-PASS", "-j MARK --or-mark "+kMark, "")
	add(m, "VMEGRESS-OUTPUT", fmt.Sprintf("-m mark --mark %#x -m addrtype --dst-type LOCAL,BROADCAST,MULTICAST -j DROP", s.UpstreamMark),
		"the proxy never dials the host's own addresses")

	const n = "ip nat"
	guestIn(n, "VMEGRESS-NAT-PRE", "-g VMEGRESS-NAT-GUEST", "")
	// Only connections to the host's own addresses are forwarded.
	add(n, "VMEGRESS-NAT-PRE", "-m addrtype --dst-type LOCAL -j VMEGRESS-SSH", "")
	add(n, "VMEGRESS-NAT-GUEST", natSrc+" -j RETURN", "direct NAT egress: DNS not intercepted")
	for _, p := range []string{"udp", "tcp"} {
		add(n, "VMEGRESS-NAT-GUEST", fmt.Sprintf("-p %s --dport 53 -j REDIRECT --to-ports %d", p, s.DNSPort), "guest DNS goes to the allowlist resolver")
	}
	for _, f := range s.SSH {
		add(n, "VMEGRESS-SSH", sshRule(f), "inbound SSH to guests")
	}
	// Direct NAT egress leaves by the uplink if one is named, else by any
	// interface that is not a guest's.
	uplinkOut, uplinkIn := "", ""
	if s.Uplink != "" {
		up, err := iptIface(s.Uplink)
		if err != nil || strings.HasSuffix(up, "+") {
			return nil, fmt.Errorf("uplink %q is not an interface name", s.Uplink)
		}
		uplinkOut, uplinkIn = "-o "+up+" ", "-i "+up+" "
	}
	guestOut(n, "VMEGRESS-NAT-POST", "-j RETURN", "")
	add(n, "VMEGRESS-NAT-POST", uplinkOut+natSrc+" -j MASQUERADE", "direct NAT egress (spec: MASQUERADE)")
	add(n, "VMEGRESS-NAT-POST", uplinkOut+"-s "+cidr+" "+ctK+" -j MASQUERADE", "flows the kernel forwards leave with the host's address")

	const f = "ip filter"
	guestIn(f, "VMEGRESS-INPUT", "-p tcp "+ctRefused+" -j REJECT --reject-with tcp-reset", "refused in prerouting: answered with a reset")
	add(f, "VMEGRESS-INPUT", fmt.Sprintf("-p tcp --dport %d -m mark ! --mark %s -j DROP", s.TProxyPort, mark), "the data plane's port is reachable only through TPROXY")
	for _, p := range []string{"udp", "tcp"} {
		guestIn(f, "VMEGRESS-INPUT", fmt.Sprintf("-p %s --dport %d -m conntrack --ctstate DNAT -j ACCEPT", p, s.DNSPort), "redirected guest DNS to the resolver")
	}
	for _, p := range []string{"udp", "tcp"} {
		add(f, "VMEGRESS-INPUT", fmt.Sprintf("-p %s --dport %d -j DROP", p, s.DNSPort), "the resolver is reachable only through the redirect")
	}
	// A refused packet carries the TPROXY mark with no socket assigned:
	// accepted, it would reach any host listener on its port. The reset
	// above answers it; should that rule go, it is still not accepted here.
	guestIn(f, "VMEGRESS-INPUT", "-p tcp -m mark --mark "+mark+" -m connmark ! --mark "+fmt.Sprintf("%#x/%#x", refusedCTMark, refusedCTMark)+" -j ACCEPT", "intercepted guest TCP to the data plane")
	guestIn(f, "VMEGRESS-INPUT", "-j DROP", "guests reach no host service directly")

	guestOut(f, "VMEGRESS-FORWARD", "-p tcp --dport 22 -m conntrack --ctstate DNAT --ctdir ORIGINAL -j ACCEPT", "inbound SSH to a guest")
	guestIn(f, "VMEGRESS-FORWARD", "-m conntrack --ctstate DNAT --ctdir REPLY -j ACCEPT", "replies of inbound SSH")
	guestIn(f, "VMEGRESS-FORWARD", natSrc+" -j VMEGRESS-NAT-EGRESS", "")
	guestOut(f, "VMEGRESS-NAT-EGRESS", "-j RETURN", "")
	add(f, "VMEGRESS-NAT-EGRESS", uplinkOut+"-j ACCEPT", "direct NAT egress (spec: FORWARD -i TAP -o LAN_IF)")
	add(f, "VMEGRESS-FORWARD", uplinkIn+"-m set --match-set "+NATSet+" dst -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT", "replies to direct NAT egress")
	guestIn(f, "VMEGRESS-FORWARD", ctK+" -m conntrack --ctdir ORIGINAL -j VMEGRESS-KERNEL-EGRESS", "")
	guestOut(f, "VMEGRESS-KERNEL-EGRESS", "-j RETURN", "")
	add(f, "VMEGRESS-KERNEL-EGRESS", uplinkOut+"-j ACCEPT", "a flow the kernel forwards (cidr rule)")
	guestIn(f, "VMEGRESS-FORWARD", ctK+" -m conntrack --ctdir REPLY -j DROP", "a kernel-forwarded flow's reply never comes from a guest")
	guestOut(f, "VMEGRESS-FORWARD", uplinkIn+ctK+" -m conntrack --ctdir REPLY -j ACCEPT", "replies of flows the kernel forwards")
	guestIn(f, "VMEGRESS-FORWARD", "-j DROP", "no forwarding from guests: egress only via the proxy or a cidr rule's flows")
	guestOut(f, "VMEGRESS-FORWARD", "-j DROP", "no forwarding to guests")
	add(f, "VMEGRESS-FORWARD", "-s "+cidr+" -j DROP", "guest-range source on another interface")

	// Every chain is declared (an empty one too), first, in a fixed order.
	decl := map[string][]string{
		m6: {"VMEGRESS-PREROUTING"},
		r:  {"VMEGRESS-RAW"},
		m:  {"VMEGRESS-PREROUTING", "VMEGRESS-GUEST", "VMEGRESS-NEW", "VMEGRESS-REFUSE", "VMEGRESS-KFWD", "VMEGRESS-PASS", "VMEGRESS-OUTPUT"},
		n:  {"VMEGRESS-NAT-PRE", "VMEGRESS-NAT-GUEST", "VMEGRESS-SSH", "VMEGRESS-NAT-POST"},
		f:  {"VMEGRESS-INPUT", "VMEGRESS-FORWARD", "VMEGRESS-NAT-EGRESS", "VMEGRESS-KERNEL-EGRESS"},
	}
	res := map[string][]string{}
	for t, chains := range decl {
		var lines []string
		for _, c := range chains {
			lines = append(lines, ":"+c+" - [0:0]")
		}
		res[t] = append(lines, out[t]...)
	}
	return res, nil
}

func sshRule(f SSHForward) string {
	return fmt.Sprintf("-p tcp --dport %d -j DNAT --to-destination %s:22", f.HostPort, f.GuestIP)
}

// ours reports whether an iptables-save line belongs to vmegress: one of
// its chains, a rule in one, or a jump into one.
func ours(line string) bool {
	return strings.HasPrefix(line, ":VMEGRESS-") || strings.HasPrefix(line, "-A VMEGRESS-") || jumpRE.MatchString(line)
}

var jumpRE = regexp.MustCompile(`^-A [A-Z]+ -j VMEGRESS-[A-Z-]+$`)

// saved is iptables-save's listing of one table, vmegress's lines only.
func (b *IPTables) saved(ctx context.Context, t ipTable, counters bool) ([]string, error) {
	argv := t.save()
	if counters {
		argv = append(argv, "-c")
	}
	out, err := b.run(ctx, nil, argv...)
	if err != nil {
		return nil, fmt.Errorf("listing table %s: %w", t, err)
	}
	return oursOf(string(out), counters)["*"+t.name], nil
}

// savedAll is saved for every table vmegress uses, from one iptables-save
// and one ip6tables-save (the drift check runs every second).
func (b *IPTables) savedAll(ctx context.Context, counters bool) (map[string][]string, error) {
	res := map[string][]string{}
	for _, v6 := range []bool{false, true} {
		argv := []string{"iptables-save"}
		family := "ip "
		if v6 {
			argv, family = []string{"ip6tables-save", "-t", "mangle"}, "ip6 "
		}
		if counters {
			argv = append(argv, "-c")
		}
		out, err := b.run(ctx, nil, argv...)
		if err != nil {
			return nil, fmt.Errorf("listing %stables: %w", family, err)
		}
		for table, lines := range oursOf(string(out), counters) {
			res[family+strings.TrimPrefix(table, "*")] = lines
		}
	}
	return res, nil
}

// oursOf returns vmegress's lines of an iptables-save listing by table
// ("*mangle").
func oursOf(listing string, counters bool) map[string][]string {
	res := map[string][]string{}
	table := ""
	var seen map[string]bool // built-in chains with a rule listed already
	for _, l := range strings.Split(listing, "\n") {
		if strings.HasPrefix(l, "*") {
			table, seen = strings.TrimSpace(l), map[string]bool{}
			continue
		}
		bare := l
		if counters && strings.HasPrefix(l, "[") {
			if i := strings.Index(l, "] "); i > 0 {
				bare = l[i+2:]
			}
		}
		var chain string
		if f := strings.Fields(bare); len(f) > 1 && f[0] == "-A" {
			chain = f[1]
		}
		if ours(bare) {
			// A jump that is not its chain's first rule can be bypassed by
			// the rules above it (an ACCEPT): it is marked, so Snapshot
			// differs (drift) and Apply moves it back to the top.
			if jumpRE.MatchString(bare) && seen[chain] {
				l += notFirst
			}
			res[table] = append(res[table], l)
		}
		if chain != "" && seen != nil {
			seen[chain] = true
		}
	}
	return res
}

// notFirst marks a jump that has rules above it.
const notFirst = "  # not first in its chain"

// Installed reports whether vmegress's interception chain exists.
func (b *IPTables) Installed(ctx context.Context) (bool, error) {
	lines, err := b.saved(ctx, tableNamed("mangle"), false)
	if err != nil {
		return false, err
	}
	for _, l := range lines {
		if strings.HasPrefix(l, ":VMEGRESS-GUEST ") {
			return true, nil
		}
	}
	return false, nil
}

// Apply makes vmegress's chains and set equal to s.
func (b *IPTables) Apply(ctx context.Context, s State) error {
	want, err := RenderIPTables(s)
	if err != nil {
		return fmt.Errorf("rendering iptables rules: %w", err)
	}
	// The sets must exist before rules name them; their content changes last.
	if err := b.ensureSets(s); err != nil {
		return err
	}
	var done []ipTable
	prev := map[string][]string{}
	for _, t := range ipTables {
		have, err := b.saved(ctx, t, false)
		if err != nil {
			return b.rollback(ctx, done, prev, err)
		}
		prev[t.String()] = have
		if err := b.restore(ctx, t, want[t.String()], have); err != nil {
			return b.rollback(ctx, done, prev, fmt.Errorf("applying vmegress chains in table %s: %w", t, err))
		}
		done = append(done, t)
	}
	if err := b.fillSets(s); err != nil {
		return b.rollback(ctx, done, prev, err)
	}
	b.limits = s.Limits()
	b.notePorts(nil, s)
	// Only now is no rule left naming a set s does not use.
	return b.destroySets(ipsSets(s))
}

// restore replaces vmegress's chains in t with rules (declarations first)
// and adds the jumps that have lines missing, at the top of their chains.
func (b *IPTables) restore(ctx context.Context, t ipTable, rules, have []string) error {
	present := map[string]bool{}
	for _, l := range have {
		present[l] = true
	}
	var in strings.Builder
	fmt.Fprintf(&in, "*%s\n", t.name)
	for _, r := range rules {
		in.WriteString(r + "\n")
	}
	for _, j := range t.jumps {
		if present[j.String()+notFirst] {
			fmt.Fprintf(&in, "-D %s -j %s\n", j.from, j.to)
		}
		if !present[j.String()] {
			fmt.Fprintf(&in, "-I %s 1 -j %s\n", j.from, j.to)
		}
	}
	// Chains a previous version had and this one does not.
	declared := map[string]bool{}
	for _, r := range rules {
		if strings.HasPrefix(r, ":") {
			declared[strings.Fields(r)[0][1:]] = true
		}
	}
	for _, l := range have {
		if strings.HasPrefix(l, ":") {
			if c := strings.Fields(l)[0][1:]; !declared[c] {
				fmt.Fprintf(&in, "-F %s\n-X %s\n", c, c)
			}
		}
	}
	in.WriteString("COMMIT\n")
	_, err := b.run(ctx, []byte(in.String()), t.restore()...)
	return err
}

// rollback puts the tables already changed back as they were and returns
// cause.
func (b *IPTables) rollback(ctx context.Context, done []ipTable, prev map[string][]string, cause error) error {
	for _, t := range done {
		old := prev[t.String()]
		var rules []string
		hadChains := false
		for _, l := range old {
			if strings.HasPrefix(l, ":") {
				hadChains = true
			}
			if strings.HasPrefix(l, ":VMEGRESS-") || strings.HasPrefix(l, "-A VMEGRESS-") {
				rules = append(rules, l)
			}
		}
		var err error
		if hadChains {
			cur, serr := b.saved(ctx, t, false)
			if serr == nil {
				err = b.restore(ctx, t, rules, cur)
			} else {
				err = serr
			}
		} else {
			err = b.cleanTable(ctx, t)
		}
		if err != nil {
			return fmt.Errorf("%w (and putting table %s back failed: %v)", cause, t, err)
		}
	}
	return cause
}

// cleanTable removes vmegress's jumps and chains from t.
func (b *IPTables) cleanTable(ctx context.Context, t ipTable) error {
	have, err := b.saved(ctx, t, false)
	if err != nil {
		return err
	}
	if len(have) == 0 {
		return nil
	}
	var in strings.Builder
	fmt.Fprintf(&in, "*%s\n", t.name)
	var chains []string
	for _, l := range have {
		switch {
		case strings.HasPrefix(l, ":"):
			chains = append(chains, strings.Fields(l)[0][1:])
		case !strings.HasPrefix(l, "-A VMEGRESS-"):
			in.WriteString("-D" + strings.TrimSuffix(l, notFirst)[2:] + "\n") // a jump from a built-in chain
		}
	}
	for _, c := range chains {
		fmt.Fprintf(&in, "-F %s\n", c)
	}
	for _, c := range chains {
		fmt.Fprintf(&in, "-X %s\n", c)
	}
	in.WriteString("COMMIT\n")
	if _, err := b.run(ctx, []byte(in.String()), t.restore()...); err != nil {
		return fmt.Errorf("removing vmegress chains from table %s: %w", t, err)
	}
	return nil
}

// Cleanup removes vmegress's jumps, chains and set; nothing there is fine.
func (b *IPTables) Cleanup(ctx context.Context) error {
	for i := len(ipTables) - 1; i >= 0; i-- {
		if err := b.cleanTable(ctx, ipTables[i]); err != nil {
			return err
		}
	}
	b.limits = nil
	return b.destroySets(nil)
}

// Snapshot is vmegress's lines of every table (iptables-save form, no
// counters) and the members of the sets the rules name, but those that
// change with traffic; "" when not installed.
func (b *IPTables) Snapshot(ctx context.Context) (string, error) {
	all, err := b.savedAll(ctx, false)
	if err != nil {
		return "", err
	}
	if !slices.Contains(all["ip mangle"], ":VMEGRESS-GUEST - [0:0]") {
		return "", nil
	}
	var out strings.Builder
	for _, t := range ipTables {
		fmt.Fprintf(&out, "*%s\n%s\n", t, strings.Join(all[t.String()], "\n"))
	}
	for _, name := range namedSets(all["ip mangle"]) {
		typ, members, ok, err := b.listSet(name)
		switch {
		case err != nil:
			return "", err
		case !ok:
			fmt.Fprintf(&out, "ipset %s: (missing)\n", name)
		case typ != ipsType(name):
			fmt.Fprintf(&out, "ipset %s: (type %s)\n", name, typ)
		case name == ipsRefused:
			fmt.Fprintf(&out, "ipset %s: (counted with traffic)\n", name)
		case name == ipsTCP || name == ipsTCPDeny:
			fmt.Fprintf(&out, "ipset %s: (filled from DNS answers)\n", name)
		default:
			fmt.Fprintf(&out, "ipset %s: %s\n", name, strings.Join(members, " "))
		}
	}
	return out.String(), nil
}

var limitSetRE = regexp.MustCompile(`--match-set (` + ipsLimitPrefix + `\d+) `)

// namedSets are the sets vmegress's mangle rules name: the fixed ones and
// a limit set per max_connections rule, in ipsSets' order.
func namedSets(mangle []string) []string {
	var limits State
	for _, l := range mangle {
		if m := limitSetRE.FindStringSubmatch(l); m != nil {
			n, _ := strconv.Atoi(strings.TrimPrefix(m[1], ipsLimitPrefix))
			limits.Guests = append(limits.Guests, Guest{Kernel: policy.Kernel{MaxConnections: n}})
		}
	}
	return ipsSets(limits)
}

var (
	countedRE  = regexp.MustCompile(`^\[(\d+):\d+\] -A (VMEGRESS-[A-Z-]+) .*-[jg] (DROP|REDIRECT|DNAT|VMEGRESS-REFUSE|VMEGRESS-KFWD)\b`)
	commentRE  = regexp.MustCompile(`--comment ("(?:[^"\\]|\\.)*"|\S+)`)
	unescapeRE = regexp.MustCompile(`\\(.)`)
)

// Counters returns the packet count of every dropping, redirecting,
// refusing or kernel-forwarding rule,
// keyed "chain: comment" with the nftables backend's chain names.
func (b *IPTables) Counters(ctx context.Context) (map[string]uint64, error) {
	all, err := b.savedAll(ctx, true)
	if err != nil {
		return nil, err
	}
	var lines []string
	for _, t := range ipTables {
		lines = append(lines, all[t.String()]...)
	}
	return parseCounters(lines), nil
}

// parseCounters reads `iptables-save -c` lines of vmegress's chains.
func parseCounters(lines []string) map[string]uint64 {
	counts := map[string]uint64{}
	for _, l := range lines {
		m := countedRE.FindStringSubmatch(l)
		c := commentRE.FindStringSubmatch(l)
		if m == nil || c == nil {
			continue
		}
		comment := c[1]
		if len(comment) >= 2 && strings.HasPrefix(comment, `"`) {
			// iptables-save escapes with a backslash (\' \" \\).
			comment = unescapeRE.ReplaceAllString(comment[1:len(comment)-1], "$1")
		}
		n, _ := strconv.ParseUint(m[1], 10, 64)
		counts[logicalChain[m[2]]+": "+comment] += n
	}
	return counts
}

// UpdateProjects changes only the per-project parts from old to s: set
// members one by one (those that let less through first), and SSH forward
// rules one by one. A max_connections value the installed rules do not
// count is ErrNewLimit: the whole ruleset must be applied.
func (b *IPTables) UpdateProjects(ctx context.Context, old, s State) error {
	for _, n := range s.Limits() {
		if !slices.Contains(b.limits, n) {
			return ErrNewLimit
		}
	}
	if err := b.updateSets(old, s); err != nil {
		return err
	}
	b.notePorts(&old, s)
	oldSSH, newSSH := map[SSHForward]bool{}, map[SSHForward]bool{}
	for _, f := range old.SSH {
		oldSSH[f] = true
	}
	var in strings.Builder
	for _, f := range s.SSH {
		newSSH[f] = true
		if !oldSSH[f] {
			fmt.Fprintf(&in, "-A VMEGRESS-SSH %s -m comment --comment %q\n", sshRule(f), "inbound SSH to guests")
		}
	}
	for f := range oldSSH {
		if !newSSH[f] {
			fmt.Fprintf(&in, "-D VMEGRESS-SSH %s -m comment --comment %q\n", sshRule(f), "inbound SSH to guests")
		}
	}
	if in.Len() == 0 {
		return nil
	}
	if _, err := b.run(ctx, []byte("*nat\n"+in.String()+"COMMIT\n"), tableNamed("nat").restore()...); err != nil {
		return fmt.Errorf("updating SSH forwards: %w", err)
	}
	return nil
}

// Admit adds timed members to vmegress-k-tcp / vmegress-k-tcp-deny. A
// deny on every port is stored for each port the guest forwards, proxies
// or has tcp rules on (ipset has no guest . address type here): on any
// other port the SYN is refused anyway.
func (b *IPTables) Admit(ctx context.Context, es []Admitted) error {
	var errs []error
	for _, e := range es {
		for _, m := range b.admittedMembers(e) {
			m.entry.Timeout = u32(uint32(max(e.TTL, time.Second).Round(time.Second).Seconds()))
			m.entry.Replace = true
			if err := b.Sets.IpsetAdd(admittedSet(e), &m.entry); err != nil {
				errs = append(errs, fmt.Errorf("adding %s to ipset %s: %w", m.key, admittedSet(e), err))
			}
		}
	}
	return errors.Join(errs...)
}

// Unadmit deletes such members (absent ones are not an error).
func (b *IPTables) Unadmit(ctx context.Context, es []Admitted) error {
	var errs []error
	for _, e := range es {
		for _, m := range b.admittedMembers(e) {
			if err := b.Sets.IpsetDel(admittedSet(e), &m.entry); err != nil && !errors.Is(err, syscall.ENOENT) && !isIPSetMissing(err) {
				errs = append(errs, fmt.Errorf("deleting %s from ipset %s: %w", m.key, admittedSet(e), err))
			}
		}
	}
	return errors.Join(errs...)
}

// UnadmitGuests deletes the guests' members of vmegress-k-tcp and
// vmegress-k-tcp-deny.
func (b *IPTables) UnadmitGuests(ctx context.Context, guests []netip.Addr) error {
	if len(guests) == 0 {
		return nil
	}
	var errs []error
	for _, set := range []string{ipsTCP, ipsTCPDeny} {
		res, err := b.Sets.IpsetList(set)
		if errors.Is(err, syscall.ENOENT) {
			continue
		}
		if err != nil {
			return fmt.Errorf("listing ipset %s: %w", set, err)
		}
		for _, e := range res.Entries {
			a, ok := netip.AddrFromSlice(e.IP)
			if !ok || !slices.Contains(guests, a.Unmap()) {
				continue
			}
			if err := b.Sets.IpsetDel(set, &e); err != nil && !errors.Is(err, syscall.ENOENT) && !isIPSetMissing(err) {
				errs = append(errs, fmt.Errorf("deleting %s from ipset %s: %w", memberKey(res.TypeName, e), set, err))
			}
		}
	}
	return errors.Join(errs...)
}

func admittedSet(e Admitted) string {
	if e.Deny {
		return ipsTCPDeny
	}
	return ipsTCP
}

func (b *IPTables) admittedMembers(e Admitted) []ipsMember {
	ports := []uint16{e.Port}
	if e.AllPorts {
		b.mu.Lock()
		ports = b.guestPorts[e.Guest]
		b.mu.Unlock()
	}
	out := make([]ipsMember, 0, len(ports))
	for _, p := range ports {
		out = append(out, ipsMember{fmt.Sprintf("%s,tcp:%d,%s", e.Guest, p, e.Addr), netlink.IPSetEntry{
			IP: ipOf(e.Guest), Protocol: u8(unix.IPPROTO_TCP), Port: u16(p), IP2: ipOf(e.Addr)}})
	}
	return out
}

func u32(v uint32) *uint32 { return &v }

// isIPSetMissing: deleting a member that timed out.
func isIPSetMissing(err error) bool {
	return errors.Is(err, syscall.Errno(4097)) || strings.Contains(err.Error(), "not added") // IPSET_ERR_EXIST
}
