package firewall

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"runtime"

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
	return counterRE.ReplaceAllString(string(out), "counter"), nil
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
	return nil
}

// UpdateProjects changes only the per-project elements (NAT interfaces,
// SSH forwards) from old to s, in one transaction, without touching rules.
func (b *NFTables) UpdateProjects(ctx context.Context, old, s State) error {
	tx := b.nft.NewTransaction()
	oldNAT, newNAT := map[string]bool{}, map[string]bool{}
	for _, i := range old.NATIfaces {
		oldNAT[i] = true
	}
	for _, i := range s.NATIfaces {
		newNAT[i] = true
		if !oldNAT[i] {
			tx.Add(&knftables.Element{Set: setNATIfaces, Key: []string{fmt.Sprintf("%q", i)}})
		}
	}
	for i := range oldNAT {
		if !newNAT[i] {
			tx.Delete(&knftables.Element{Set: setNATIfaces, Key: []string{fmt.Sprintf("%q", i)}})
		}
	}
	oldSSH, newSSH := map[SSHForward]bool{}, map[SSHForward]bool{}
	for _, f := range old.SSH {
		oldSSH[f] = true
	}
	for _, f := range s.SSH {
		newSSH[f] = true
		if !oldSSH[f] {
			tx.Add(&knftables.Element{Map: mapSSH, Key: []string{fmt.Sprint(f.HostPort)}, Value: []string{f.GuestIP.String(), "22"}})
		}
	}
	for f := range oldSSH {
		if !newSSH[f] {
			tx.Delete(&knftables.Element{Map: mapSSH, Key: []string{fmt.Sprint(f.HostPort)}})
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
	chainPre       = "prerouting"
	chainNATPre    = "nat_prerouting"
	chainNATPost   = "nat_postrouting"
	setNATIfaces   = "nat_ifaces"
	mapSSH         = "ssh_dnat"
	chainInput     = "input"
	chainForward   = "forward"
	chainOutput    = "output"
)

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
	for _, ifc := range s.NATIfaces {
		tx.Add(&knftables.Element{Set: setNATIfaces, Key: []string{fmt.Sprintf("%q", ifc)}})
	}
	tx.Add(&knftables.Map{Name: mapSSH, Type: "inet_service : ipv4_addr . inet_service", Comment: ptr("inbound SSH: host port to guest address and port 22")})
	for _, f := range s.SSH {
		tx.Add(&knftables.Element{Map: mapSSH, Key: []string{fmt.Sprint(f.HostPort)}, Value: []string{f.GuestIP.String(), "22"}})
	}

	rule := func(chain, r, comment string) {
		tx.Add(&knftables.Rule{Chain: chain, Rule: r, Comment: ptr(comment)})
	}
	fromGuest := "iifname @" + setGuestIfaces

	// prerouting at mangle priority (-150): after conntrack (-200), before
	// NAT (-100) and the routing decision, which is where TPROXY must sit.
	tx.Add(&knftables.Chain{
		Name: chainPre, Type: ptr(knftables.FilterType), Hook: ptr(knftables.PreroutingHook),
		Priority: ptr(knftables.ManglePriority), Policy: ptr(knftables.AcceptPolicy),
	})
	rule(chainPre, "iifname != @"+setGuestIfaces+" return", "only traffic from guests is handled here")
	rule(chainPre, "meta nfproto != ipv4 counter drop", "guest IPv6 (and anything not IPv4) never leaves")
	rule(chainPre, fmt.Sprintf("ip saddr != %s counter drop", s.VMCIDR), "source outside the guest range: spoofed")
	// Reverse-path check in the ruleset, whatever rp_filter says: a guest's
	// source must route back through the interface it came in on, so one
	// guest cannot take another's (or the host's) address and policy.
	rule(chainPre, "fib saddr . iif oif missing counter drop", "anti-spoofing: source address does not belong behind this interface")
	rule(chainPre, "fib saddr type local counter drop", "anti-spoofing: source is one of the host's own addresses")
	rule(chainPre, "ct direction reply ct status dnat accept", "replies of inbound SSH to the guest")
	rule(chainPre, "iifname @"+setNATIfaces+" accept", "direct NAT egress: not intercepted")
	rule(chainPre, "tcp dport 853 counter drop", "no DNS over TLS: guests use the allowlist resolver")
	rule(chainPre, "meta l4proto { tcp, udp } th dport 53 accept", "guest DNS, to any address: redirected to the resolver by chain dns")
	rule(chainPre, fmt.Sprintf("meta l4proto tcp tproxy ip to :%d meta mark set %#x accept", s.TProxyPort, s.Mark),
		"guest TCP goes to the data plane, marked for local delivery")
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
	rule(chainForward, "oifname @"+setGuestIfaces+" ct status dnat ct direction original tcp dport 22 accept", "inbound SSH to a guest")
	rule(chainForward, fromGuest+" ct status dnat ct direction reply accept", "replies of inbound SSH")
	rule(chainForward, "iifname @"+setNATIfaces+" "+out+" accept", "direct NAT egress (spec: FORWARD -i TAP -o LAN_IF)")
	replyIn := ""
	if s.Uplink != "" {
		replyIn = fmt.Sprintf("iifname %q ", s.Uplink)
	}
	rule(chainForward, replyIn+"oifname @"+setNATIfaces+" ct state established,related accept", "replies to direct NAT egress")
	rule(chainForward, fromGuest+" counter drop", "no forwarding from guests: egress only via the proxy")
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
