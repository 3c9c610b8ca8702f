package firewall

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netns"
	"sigs.k8s.io/knftables"
)

// TableName is vmegress's private nftables table (family inet, so one table
// sees IPv4 and IPv6). Nothing outside it is ever touched.
const TableName = "vmegress"

// NFTables is the nftables backend. It owns one table and replaces it whole in
// a single transaction on every Apply.
type NFTables struct {
	nft knftables.Interface
	// limits are the max_connections values the installed ruleset counts
	// (set by Apply; nil: unknown, UpdateProjects adds no limit elements
	// without a rule for them).
	limits []int
	// Exec runs the nft binary for listings knftables does not offer (zero:
	// os/exec with LC_ALL=C).
	Exec func(ctx context.Context, argv ...string) ([]byte, error)
}

// NewNFTables returns the nftables backend over nft (knftables.New(knftables.InetFamily,
// TableName) for the real host, knftables.NewFake for tests).
func NewNFTables(nft knftables.Interface) *NFTables {
	return &NFTables{nft: nft}
}

func (b *NFTables) run(ctx context.Context, argv ...string) ([]byte, error) {
	if b.Exec != nil {
		return b.Exec(ctx, argv...)
	}
	return execStdin(ctx, nil, argv...)
}

var counterRE = regexp.MustCompile(`counter packets \d+ bytes \d+`)

// Describe names what the backend installs.
func (b *NFTables) Describe() string { return "nftables table inet " + TableName }

// Snapshot returns the kernel's listing of the table with counter values
// blanked, so two snapshots are equal when the rules are; "" when the table
// does not exist.
func (b *NFTables) Snapshot(ctx context.Context) (string, error) {
	if ok, err := b.Installed(ctx); err != nil || !ok {
		return "", err
	}
	out, err := b.run(ctx, "nft", "list", "table", "inet", TableName)
	if err != nil {
		return "", fmt.Errorf("listing nftables table %s: %w", TableName, err)
	}
	return counterRE.ReplaceAllString(withoutVolatile(string(out)), "counter"), nil
}

// withoutVolatile drops the elements of the volatileSets from a listing.
func withoutVolatile(listing string) string {
	var b strings.Builder
	inVolatile, inElems := false, false
	for _, line := range strings.SplitAfter(listing, "\n") {
		t := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(t, "set "):
			name, _, _ := strings.Cut(strings.TrimPrefix(t, "set "), " ")
			inVolatile = volatile(name)
		case inVolatile && strings.HasPrefix(t, "elements = {"):
			inElems = true
		}
		if inElems {
			if strings.HasSuffix(t, "}") {
				inElems = false
			}
			continue
		}
		if t == "}" {
			inVolatile = false
		}
		b.WriteString(line)
	}
	return b.String()
}

// Counters returns the packet count of every counted rule, keyed by
// "chain: comment".
func (b *NFTables) Counters(ctx context.Context) (map[string]uint64, error) {
	out, err := b.run(ctx, "nft", "-j", "list", "table", "inet", TableName)
	if err != nil {
		return nil, fmt.Errorf("listing nftables counters: %w", err)
	}
	var doc struct {
		Nftables []struct {
			Rule *struct {
				Chain   string            `json:"chain"`
				Comment string            `json:"comment"`
				Expr    []json.RawMessage `json:"expr"`
			} `json:"rule"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return nil, fmt.Errorf("parsing nft -j output: %w", err)
	}
	counts := map[string]uint64{}
	for _, o := range doc.Nftables {
		if o.Rule == nil {
			continue
		}
		for _, e := range o.Rule.Expr {
			var c struct {
				Counter *struct {
					Packets uint64 `json:"packets"`
				} `json:"counter"`
			}
			if json.Unmarshal(e, &c) == nil && c.Counter != nil {
				counts[o.Rule.Chain+": "+o.Rule.Comment] += c.Counter.Packets
			}
		}
	}
	return counts, nil
}

// NewHostNFTables returns the nftables backend for the current network namespace.
// It fails when the nft binary is missing or the kernel lacks nf_tables.
func NewHostNFTables() (*NFTables, error) {
	nft, err := knftables.New(knftables.InetFamily, TableName)
	if err != nil {
		return nil, fmt.Errorf("setting up nftables (is the nft command installed and are you root?): %w", err)
	}
	return NewNFTables(nft), nil
}

// Apply replaces the vmegress table with the one rendered from s, atomically.
func (b *NFTables) Apply(ctx context.Context, s State) error {
	tx := b.nft.NewTransaction()
	// "add" then "delete" then add again: the table exists whatever the host
	// had before, and the whole replacement is one transaction.
	tx.Add(&knftables.Table{})
	tx.Delete(&knftables.Table{})
	Render(tx, s)
	if err := b.nft.Run(ctx, tx); err != nil {
		return fmt.Errorf("applying nftables table %s: %w", TableName, err)
	}
	b.limits = s.Limits()
	return nil
}

// UpdateProjects changes only the per-project elements (NAT interfaces,
// SSH forwards, the guests' kernel sets) from old to s, in one transaction,
// without touching rules. Elements that go are deleted before those that
// come are added: an interval that grows over another is accepted.
func (b *NFTables) UpdateProjects(ctx context.Context, old, s State) error {
	for _, n := range s.Limits() {
		if !slices.Contains(b.limits, n) {
			return ErrNewLimit
		}
	}
	tx := b.nft.NewTransaction()
	type key struct{ set, key, value string }
	index := func(st State) (map[key]*knftables.Element, []key) {
		m := map[key]*knftables.Element{}
		var order []key
		for _, e := range projectElements(st) {
			k := key{e.Set + e.Map, strings.Join(e.Key, " . "), strings.Join(e.Value, " . ")}
			if _, dup := m[k]; !dup {
				order = append(order, k)
			}
			m[k] = e
		}
		return m, order
	}
	from, fromOrder := index(old)
	to, toOrder := index(s)
	for _, k := range fromOrder {
		if _, keep := to[k]; !keep {
			e := *from[k]
			e.Value = nil // a map element is deleted by its key
			tx.Delete(&e)
		}
	}
	for _, k := range toOrder {
		if _, had := from[k]; !had {
			tx.Add(to[k])
		}
	}
	if tx.NumOperations() == 0 {
		return nil
	}
	if err := b.nft.Run(ctx, tx); err != nil {
		return fmt.Errorf("updating project elements of table %s: %w", TableName, err)
	}
	return nil
}

// projectElements are the per-project elements of s, in a stable order.
func projectElements(s State) []*knftables.Element {
	var out []*knftables.Element
	for _, ifc := range s.NATIfaces {
		out = append(out, &knftables.Element{Set: setNATIfaces, Key: []string{fmt.Sprintf("%q", ifc)}})
	}
	for _, f := range s.SSH {
		out = append(out, &knftables.Element{Map: mapSSH, Key: []string{fmt.Sprint(f.HostPort)}, Value: []string{f.GuestIP.String(), "22"}})
	}
	for _, g := range s.Guests {
		e, a := elemsOf(g), g.Addr.String()
		if e.audit {
			out = append(out, &knftables.Element{Set: setKAudit, Key: []string{a}})
			continue
		}
		for _, p := range e.denyAll {
			out = append(out, &knftables.Element{Set: setKDenyAll, Key: []string{a, p.String()}})
		}
		for _, f := range e.deny {
			out = append(out, &knftables.Element{Set: setKDeny, Key: []string{a, f.Prefix.String(), fmt.Sprint(f.Port)}})
		}
		for _, f := range e.fwd {
			out = append(out, &knftables.Element{Set: setKFwd, Key: []string{a, f.Prefix.String(), fmt.Sprint(f.Port)}})
		}
		for _, p := range e.proxy {
			out = append(out, &knftables.Element{Set: setKProxy, Key: []string{a, fmt.Sprint(p)}})
		}
		if n := g.Kernel.MaxConnections; n > 0 {
			out = append(out, &knftables.Element{Set: limitSet(n), Key: []string{a}})
		}
	}
	return out
}

// limitSet holds the guests capped at n connections; countSet counts them.
func limitSet(n int) string { return fmt.Sprintf("k_limit_%d", n) }
func countSet(n int) string { return fmt.Sprintf("k_count_%d", n) }

// admittedElement is e as an element of its set; with ttl, the timeout
// rides in the last key part (knftables has no element timeout; "… . 22
// timeout 30s" is what nft reads).
func admittedElement(e Admitted, ttl bool) *knftables.Element {
	set, key := setKTCP, []string{e.Guest.String(), e.Addr.String(), fmt.Sprint(e.Port)}
	switch {
	case e.Deny && e.AllPorts:
		set, key = setKTCPDenyAll, key[:2]
	case e.Deny:
		set = setKTCPDeny
	}
	if ttl {
		key[len(key)-1] += fmt.Sprintf(" timeout %ds", int(max(e.TTL, time.Second).Round(time.Second).Seconds()))
	}
	return &knftables.Element{Set: set, Key: key}
}

// Admit adds timed elements (k_tcp, k_tcp_deny, k_tcp_deny_all), in one
// transaction.
func (b *NFTables) Admit(ctx context.Context, es []Admitted) error {
	if len(es) == 0 {
		return nil
	}
	tx := b.nft.NewTransaction()
	for _, e := range es {
		tx.Add(admittedElement(e, true))
	}
	if err := b.nft.Run(ctx, tx); err != nil {
		return fmt.Errorf("admitting resolved addresses: %w", err)
	}
	return nil
}

// Unadmit deletes such elements, absent ones included.
func (b *NFTables) Unadmit(ctx context.Context, es []Admitted) error {
	if len(es) == 0 {
		return nil
	}
	tx := b.nft.NewTransaction()
	for _, e := range es {
		el := admittedElement(e, false)
		// add then delete: deleting one that timed out is no error.
		tx.Add(el)
		tx.Delete(el)
	}
	if err := b.nft.Run(ctx, tx); err != nil {
		return fmt.Errorf("withdrawing resolved addresses: %w", err)
	}
	return nil
}

// UnadmitGuests deletes the guests' elements of k_tcp, k_tcp_deny and
// k_tcp_deny_all, in one transaction.
func (b *NFTables) UnadmitGuests(ctx context.Context, guests []netip.Addr) error {
	if len(guests) == 0 {
		return nil
	}
	of := make(map[string]bool, len(guests))
	for _, g := range guests {
		of[g.String()] = true
	}
	tx := b.nft.NewTransaction()
	for _, set := range []string{setKTCP, setKTCPDeny, setKTCPDenyAll} {
		els, err := b.nft.ListElements(ctx, "set", set)
		if knftables.IsNotFound(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("listing the elements of set %s: %w", set, err)
		}
		for _, el := range els {
			if len(el.Key) == 0 || !of[el.Key[0]] {
				continue
			}
			// add then delete: one that timed out since the listing is
			// no error.
			e := &knftables.Element{Set: set, Key: el.Key}
			tx.Add(e)
			tx.Delete(e)
		}
	}
	if tx.NumOperations() == 0 {
		return nil
	}
	if err := b.nft.Run(ctx, tx); err != nil {
		return fmt.Errorf("withdrawing the guests' resolved addresses: %w", err)
	}
	return nil
}

// Cleanup deletes the vmegress table if it exists.
func (b *NFTables) Cleanup(ctx context.Context) error {
	tx := b.nft.NewTransaction()
	tx.Add(&knftables.Table{})
	tx.Delete(&knftables.Table{})
	if err := b.nft.Run(ctx, tx); err != nil {
		return fmt.Errorf("deleting nftables table %s: %w", TableName, err)
	}
	return nil
}

// Installed reports whether the vmegress table exists.
func (b *NFTables) Installed(ctx context.Context) (bool, error) {
	_, err := b.nft.List(ctx, "chain")
	if knftables.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("listing nftables table %s: %w", TableName, err)
	}
	return true, nil
}

// Chain and set names inside the table.
const (
	setGuestIfaces = "guest_ifaces"
	chainRaw       = "raw_prerouting"
	chainPre       = "prerouting"
	chainNATPre    = "nat_prerouting"
	chainNATPost   = "nat_postrouting"
	setNATIfaces   = "nat_ifaces"
	mapSSH         = "ssh_dnat"
	chainInput     = "input"
	chainForward   = "forward"
	chainOutput    = "output"
	// The kernel part of each guest's policy (policy.Kernel), elements keyed
	// by the guest's address.
	setKAudit   = "k_audit"    // audit guests: everything to the data plane
	setKDenyAll = "k_deny_all" // guest . range: cidr deny on every port
	setKDeny    = "k_deny"     // guest . range . port: cidr deny
	setKFwd     = "k_forward"  // guest . range . port: cidr allow, forwarded by the kernel
	setKProxy   = "k_proxied"  // guest . port: the data plane decides
	// setSYNRefused counts, per guest, the connections refused at the SYN
	// (no rule for the port); elements come and go with traffic.
	setSYNRefused = "syn_refused"
	// setKTCP holds guest . address . port with a timeout: the resolver
	// handed the address to the guest's project for a name a tcp rule
	// allows on the port (Admit), until the answer's TTL plus grace.
	setKTCP = "k_tcp"
	// setKTCPDeny and setKTCPDenyAll: the same for names a tcp deny rule
	// matches (on its ports, or on every port), refused before any allow.
	setKTCPDeny    = "k_tcp_deny"
	setKTCPDenyAll = "k_tcp_deny_all"
)

// volatileSets change with traffic, not with the desired state: Snapshot
// leaves their elements out.
var volatileSets = []string{setSYNRefused, setKTCP, setKTCPDeny, setKTCPDenyAll}

// volatile reports whether a set's elements change with traffic.
func volatile(name string) bool {
	return slices.Contains(volatileSets, name) || strings.HasPrefix(name, "k_count_")
}

func ptr[T any](v T) *T { return &v }

// Render adds the whole desired table for s to tx. The ruleset does not grow
// with the number of guests: interfaces are elements of one set.
func Render(tx *knftables.Transaction, s State) {
	tx.Add(&knftables.Table{Comment: ptr("vmegress: microVM egress control; managed by vmegress, do not edit")})

	tx.Add(&knftables.Set{
		Name:    setGuestIfaces,
		Type:    "ifname",
		Flags:   []knftables.SetFlag{knftables.IntervalFlag}, // interval: allows "tap-*" patterns
		Comment: ptr("interfaces that carry guests"),
	})
	for _, ifc := range s.GuestInterfaces {
		tx.Add(&knftables.Element{Set: setGuestIfaces, Key: []string{fmt.Sprintf("%q", ifc)}})
	}
	// Per-project membership lives in a set and a map, changed element by
	// element: the rules do not grow with the number of projects.
	tx.Add(&knftables.Set{Name: setNATIfaces, Type: "ifname", Comment: ptr("guest interfaces with direct NAT egress (unfiltered)")})
	tx.Add(&knftables.Map{Name: mapSSH, Type: "inet_service : ipv4_addr . inet_service", Comment: ptr("inbound SSH: host port to guest address and port 22")})
	interval := []knftables.SetFlag{knftables.IntervalFlag}
	tx.Add(&knftables.Set{Name: setKAudit, Type: "ipv4_addr", Comment: ptr("audit guests: all TCP to the data plane")})
	tx.Add(&knftables.Set{Name: setKDenyAll, Type: "ipv4_addr . ipv4_addr", Flags: interval, Comment: ptr("guest . range refused on every port (cidr deny)")})
	tx.Add(&knftables.Set{Name: setKDeny, Type: "ipv4_addr . ipv4_addr . inet_service", Flags: interval, Comment: ptr("guest . range . port refused (cidr deny)")})
	tx.Add(&knftables.Set{Name: setKFwd, Type: "ipv4_addr . ipv4_addr . inet_service", Flags: interval, Comment: ptr("guest . range . port forwarded by the kernel (cidr allow)")})
	tx.Add(&knftables.Set{Name: setKProxy, Type: "ipv4_addr . inet_service", Comment: ptr("guest . port the data plane decides (name rules)")})
	tx.Add(&knftables.Set{Name: setKTCPDeny, Type: "ipv4_addr . ipv4_addr . inet_service", Flags: []knftables.SetFlag{knftables.TimeoutFlag},
		Comment: ptr("guest . address . port the resolver handed out for a name a tcp deny rule matches")})
	tx.Add(&knftables.Set{Name: setKTCPDenyAll, Type: "ipv4_addr . ipv4_addr", Flags: []knftables.SetFlag{knftables.TimeoutFlag},
		Comment: ptr("guest . address handed out for a name a tcp deny rule (every port) matches")})
	tx.Add(&knftables.Set{Name: setKTCP, Type: "ipv4_addr . ipv4_addr . inet_service", Flags: []knftables.SetFlag{knftables.TimeoutFlag},
		Comment: ptr("guest . address . port the resolver handed out for a tcp rule's name, until the answer expires")})
	tx.Add(&knftables.Set{Name: setSYNRefused, Type: "ipv4_addr", Flags: []knftables.SetFlag{knftables.DynamicFlag},
		// Counter per element: how many connections of each guest were refused at the SYN.
		Comment: ptr("guests with connections refused at the SYN (no rule for the port), counted")})
	for _, n := range s.Limits() {
		tx.Add(&knftables.Set{Name: limitSet(n), Type: "ipv4_addr", Comment: ptr(fmt.Sprintf("guests whose projects have max_connections %d", n))})
		tx.Add(&knftables.Set{Name: countSet(n), Type: "ipv4_addr", Flags: []knftables.SetFlag{knftables.DynamicFlag},
			Comment: ptr(fmt.Sprintf("open connections of the guests of %s", limitSet(n)))})
	}
	for _, e := range projectElements(s) {
		tx.Add(e)
	}

	rule := func(chain, r, comment string) {
		tx.Add(&knftables.Rule{Chain: chain, Rule: r, Comment: ptr(comment)})
	}
	fromGuest := "iifname @" + setGuestIfaces

	// raw_prerouting at raw priority (-300): before conntrack (-200) sees
	// the packet, so a packet a guest spoofed never touches a conntrack
	// entry (an in-window reset with another guest's flow's addresses
	// would otherwise close that flow before any later check dropped it).
	tx.Add(&knftables.Chain{
		Name: chainRaw, Type: ptr(knftables.FilterType), Hook: ptr(knftables.PreroutingHook),
		Priority: ptr(knftables.RawPriority), Policy: ptr(knftables.AcceptPolicy),
	})
	rule(chainRaw, "iifname != @"+setGuestIfaces+" return", "only traffic from guests is handled here")
	rule(chainRaw, fmt.Sprintf("ip saddr != %s counter drop", s.VMCIDR), "source outside the guest range: spoofed")
	// Reverse-path check in the ruleset, whatever rp_filter says: a guest's
	// source must route back through the interface it came in on, so one
	// guest cannot take another's (or the host's) address and policy.
	// (IPv4: everything else is dropped by prerouting.)
	rule(chainRaw, "meta nfproto ipv4 fib saddr . iif oif missing counter drop", "anti-spoofing: source address does not belong behind this interface")

	// prerouting at mangle priority (-150): after conntrack (-200), before
	// NAT (-100) and the routing decision, which is where TPROXY must sit.
	// Every guest packet here passed raw_prerouting's checks.
	tx.Add(&knftables.Chain{
		Name: chainPre, Type: ptr(knftables.FilterType), Hook: ptr(knftables.PreroutingHook),
		Priority: ptr(knftables.ManglePriority), Policy: ptr(knftables.AcceptPolicy),
	})
	rule(chainPre, "iifname != @"+setGuestIfaces+" return", "only traffic from guests is handled here")
	rule(chainPre, "meta nfproto != ipv4 counter drop", "guest IPv6 (and anything not IPv4) never leaves")
	lockMark := fmt.Sprintf("meta mark set meta mark or %#x", KernelMark)
	ctK := fmt.Sprintf("ct mark and %#x == %#x", KernelCTMark, KernelCTMark)
	// The bulk of a kernel-forwarded flow leaves here, after the one
	// check its packets need (raw_prerouting's): the flow's source
	// (conntrack matched the header, not the interface) belongs behind the
	// interface it came in on, so no other guest can write into it. Its SYN passed every check
	// below, the host-address one included (the source is the flow's
	// guest's); a packet with IP options falls through to their drop.
	// Only its original direction: conntrack matches a reply too by the
	// header alone, and a guest holding the peer's address (an address
	// of the guest range the flow was forwarded to before its /30 was
	// placed) would otherwise write the flow's replies into another guest.
	rule(chainPre, ctK+" ct direction original ip hdrlength 5 "+lockMark+" accept", "a flow the kernel forwards (cidr or tcp rule): no data plane")
	rule(chainPre, ctK+" ct direction reply counter drop", "a kernel-forwarded flow's reply never comes from a guest")
	rule(chainPre, "fib saddr type local counter drop", "anti-spoofing: source is one of the host's own addresses")
	rule(chainPre, "ct direction reply ct status dnat "+lockMark+" accept", "replies of inbound SSH to the guest (marked: the routing lock routes them)")
	rule(chainPre, "iifname @"+setNATIfaces+" "+lockMark+" accept", "direct NAT egress: not intercepted (marked: the routing lock routes it)")
	// The ruleset decides by the header's destination; a source route
	// (LSRR/SSRR) through one of the host's addresses would have the
	// kernel route the packet on to the route's next hop instead, so a
	// cidr rule covering a host address would open its ports to every
	// address. Guests need no IP options.
	rule(chainPre, "ip hdrlength != 5 counter drop", "IP options (source routes): never routed from a guest")
	rule(chainPre, "tcp dport 853 counter drop", "no DNS over TLS: guests use the allowlist resolver")
	rule(chainPre, "meta l4proto { tcp, udp } th dport 53 accept", "guest DNS, to any address: redirected to the resolver by chain dns")
	tproxy := fmt.Sprintf("tproxy ip to :%d meta mark set %#x accept", s.TProxyPort, s.Mark)
	rule(chainPre, "meta l4proto tcp ip saddr @"+setKAudit+" "+tproxy, "audit project: all TCP to the data plane, which logs what enforcement would refuse")
	// A connection's first packet is decided here, by the guest's elements;
	// the packets after it follow their flow (kernel forwarded, or a data
	// plane socket), so a change of elements leaves open flows to
	// on_policy_change (conntrack entries are deleted to cut them).
	newTCP := "ct state new meta l4proto tcp "
	rule(chainPre, newTCP+"ip saddr . ip daddr @"+setKDenyAll+" counter reject with tcp reset", "cidr deny rule (every port): refused")
	rule(chainPre, newTCP+"ip saddr . ip daddr . tcp dport @"+setKDeny+" counter reject with tcp reset", "cidr deny rule: refused")
	rule(chainPre, newTCP+"ip saddr . ip daddr @"+setKTCPDenyAll+" counter reject with tcp reset", "tcp deny rule (every port): the address was handed out for a denied name")
	rule(chainPre, newTCP+"ip saddr . ip daddr . tcp dport @"+setKTCPDeny+" counter reject with tcp reset", "tcp deny rule: the address was handed out for a denied name")
	for _, n := range s.Limits() {
		rule(chainPre, fmt.Sprintf("%sip saddr @%s update @%s { ip saddr ct count over %d } counter reject with tcp reset", newTCP, limitSet(n), countSet(n), n),
			"max_connections: over the project's cap, refused")
	}
	// Conntrack builds an event for every state change of every flow for
	// any listener, and the daemon's socket filter drops all but a kernel
	// flow's end: a kernel flow's entry reports only its TCP state changes
	// (protoinfo: the daemon deletes it at TIME_WAIT) and its destroy (its
	// byte counts, the access-log line); a proxied flow's none (the data
	// plane logs it). conntrack -E on the host shows as much.
	kEvents, noEvents := " ct event set destroy,protoinfo", " ct event set 0x0"
	rule(chainPre, newTCP+"ip saddr . ip daddr . tcp dport @"+setKFwd+kEvents+fmt.Sprintf(" ct mark set ct mark or %#x %s counter accept", KernelCTMark, lockMark),
		"cidr allow rule: forwarded by the kernel, no data plane")
	rule(chainPre, newTCP+"ip saddr . ip daddr . tcp dport @"+setKTCP+kEvents+fmt.Sprintf(" ct mark set ct mark or %#x %s counter accept", KernelCTMark, lockMark),
		"tcp rule: the resolver handed this address out for an allowed name: forwarded by the kernel")
	rule(chainPre, newTCP+"ip saddr . tcp dport @"+setKProxy+noEvents+" "+tproxy, "a port with name rules: to the data plane, marked for local delivery")
	// Two rules, not one: should the set be full, the reset still comes.
	rule(chainPre, newTCP+"update @"+setSYNRefused+" { ip saddr counter }", "count the refusal per guest")
	rule(chainPre, newTCP+"counter reject with tcp reset", "no rule of the guest's project for this port: refused at the SYN")
	rule(chainPre, "meta l4proto tcp "+tproxy, "the rest of a proxied flow: to the data plane's socket")
	// nft's tproxy falls through to the next rule when no socket listens on
	// the port; without this drop a dead proxy would mean open egress.
	rule(chainPre, "counter drop", "fail closed: no listener, or not TCP (UDP, QUIC, ICMP, other protocols)")

	// nat_prerouting: guest DNS is redirected (conntrack makes replies come
	// from the address the guest asked; should it not happen, forward drops
	// the query); inbound SSH is DNATed to guests.
	tx.Add(&knftables.Chain{
		Name: chainNATPre, Type: ptr(knftables.NATType), Hook: ptr(knftables.PreroutingHook),
		Priority: ptr(knftables.DNATPriority), Policy: ptr(knftables.AcceptPolicy),
	})
	rule(chainNATPre, "iifname @"+setNATIfaces+" return", "direct NAT egress: DNS not intercepted")
	rule(chainNATPre, fmt.Sprintf("%s meta l4proto { tcp, udp } th dport 53 counter redirect to :%d", fromGuest, s.DNSPort), "guest DNS goes to the allowlist resolver")
	// Only connections to the host's own addresses are forwarded, not
	// traffic the host routes for others that happens to use the port.
	rule(chainNATPre, "iifname != @"+setGuestIfaces+" meta nfproto ipv4 fib daddr type local dnat ip to tcp dport map @"+mapSSH, "inbound SSH to guests")

	tx.Add(&knftables.Chain{
		Name: chainNATPost, Type: ptr(knftables.NATType), Hook: ptr(knftables.PostroutingHook),
		Priority: ptr(knftables.SNATPriority), Policy: ptr(knftables.AcceptPolicy),
	})
	// Direct NAT egress leaves by the uplink if one is named, else by any
	// interface that is not a guest's.
	out := "oifname != @" + setGuestIfaces
	if s.Uplink != "" {
		out = fmt.Sprintf("oifname %q", s.Uplink)
	}
	rule(chainNATPost, "iifname @"+setNATIfaces+" "+out+" masquerade", "direct NAT egress (spec: MASQUERADE)")
	rule(chainNATPost, fmt.Sprintf("iifname @%s ct mark and %#x == %#x %s masquerade", setGuestIfaces, KernelCTMark, KernelCTMark, out), "flows the kernel forwards leave with the host's address")

	// input: guests reach host sockets only through the TPROXY mark or the
	// DNS redirect.
	tx.Add(&knftables.Chain{
		Name: chainInput, Type: ptr(knftables.FilterType), Hook: ptr(knftables.InputHook),
		Priority: ptr(knftables.FilterPriority), Policy: ptr(knftables.AcceptPolicy),
	})
	rule(chainInput, fmt.Sprintf("tcp dport %d meta mark != %#x counter drop", s.TProxyPort, s.Mark), "the data plane's port is reachable only through TPROXY")
	rule(chainInput, fmt.Sprintf("%s meta l4proto { tcp, udp } th dport %d ct status dnat accept", fromGuest, s.DNSPort), "redirected guest DNS to the resolver")
	rule(chainInput, fmt.Sprintf("meta l4proto { tcp, udp } th dport %d counter drop", s.DNSPort), "the resolver is reachable only through the redirect")
	rule(chainInput, fmt.Sprintf("%s meta mark %#x meta l4proto tcp accept", fromGuest, s.Mark), "intercepted guest TCP to the data plane")
	rule(chainInput, fromGuest+" counter drop", "guests reach no host service directly")

	// forward: nothing from or to a guest is routed past the host.
	tx.Add(&knftables.Chain{
		Name: chainForward, Type: ptr(knftables.FilterType), Hook: ptr(knftables.ForwardHook),
		Priority: ptr(knftables.FilterPriority), Policy: ptr(knftables.AcceptPolicy),
	})
	replyIn := ""
	if s.Uplink != "" {
		replyIn = fmt.Sprintf("iifname %q ", s.Uplink)
	}
	// Kernel-forwarded flows first (the bulk of what this chain sees),
	// their conntrack mark tested before any interface set. Every rule
	// above the drops accepts, so their order decides nothing else.
	rule(chainForward, fmt.Sprintf("ct mark and %#x == %#x ct direction original %s %s accept", KernelCTMark, KernelCTMark, fromGuest, out), "a flow the kernel forwards (cidr rule)")
	rule(chainForward, fmt.Sprintf("ct mark and %#x == %#x ct direction reply %s%soifname @%s accept", KernelCTMark, KernelCTMark, replyIn, notFromGuest(replyIn), setGuestIfaces), "replies of flows the kernel forwards")
	rule(chainForward, "oifname @"+setGuestIfaces+" ct status dnat ct direction original tcp dport 22 accept", "inbound SSH to a guest")
	rule(chainForward, fromGuest+" ct status dnat ct direction reply accept", "replies of inbound SSH")
	rule(chainForward, "iifname @"+setNATIfaces+" "+out+" accept", "direct NAT egress (spec: FORWARD -i TAP -o LAN_IF)")
	rule(chainForward, replyIn+"oifname @"+setNATIfaces+" ct state established,related accept", "replies to direct NAT egress")
	rule(chainForward, fromGuest+" counter drop", "no forwarding from guests: egress only via the proxy or a cidr rule's flows")
	rule(chainForward, "oifname @"+setGuestIfaces+" counter drop", "no forwarding to guests")
	rule(chainForward, fmt.Sprintf("ip saddr %s counter drop", s.VMCIDR), "guest-range source on another interface")

	// output: the data plane's upstream sockets never reach the host itself
	// (a backstop for the proxy's own check: no loops through local services).
	tx.Add(&knftables.Chain{
		Name: chainOutput, Type: ptr(knftables.RouteType), Hook: ptr(knftables.OutputHook),
		Priority: ptr(knftables.ManglePriority), Policy: ptr(knftables.AcceptPolicy),
	})
	rule(chainOutput, fmt.Sprintf("meta mark %#x fib daddr type { local, broadcast, multicast } counter drop", s.UpstreamMark),
		"the proxy never dials the host's own addresses")
}

// notFromGuest is the forward chain's guard for replies when no uplink
// names where they come from: never from a guest interface.
func notFromGuest(replyIn string) string {
	if replyIn != "" {
		return ""
	}
	return "iifname != @" + setGuestIfaces + " "
}

// Expected renders s with a backend of kind in a throwaway network
// namespace and returns the kernel's listing of it, in Snapshot's form: what
// an installed ruleset must equal. Needs root; nothing touches the caller's
// namespace.
func Expected(ctx context.Context, kind string, s State) (string, error) {
	var snap string
	err := inScratchNetns(func() error {
		b, err := NewHost(kind)
		if err != nil {
			return err
		}
		if c, ok := b.(interface{ Close() }); ok {
			defer c.Close()
		}
		if err := b.Apply(ctx, s); err != nil {
			return err
		}
		snap, err = b.Snapshot(ctx)
		return err
	})
	return snap, err
}

// inScratchNetns runs f on a locked thread moved into a new, empty network
// namespace; commands f starts inherit it. The namespace goes when the
// thread leaves it.
func inScratchNetns(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked on failure: the thread dies with the goroutine
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("getting current netns: %w", err)
			return
		}
		defer orig.Close()
		scratch, err := netns.New()
		if err != nil {
			errc <- fmt.Errorf("creating a scratch netns: %w", err)
			return
		}
		defer scratch.Close()
		ferr := f()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("leaving the scratch netns: %w", err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
