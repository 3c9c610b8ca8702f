// Package firewall computes the host's desired packet-filter state from the
// config and applies it with a backend: nftables (one private table) or
// iptables (the spec's rule shape in chains of vmegress's own, plus an ipset).
//
// The desired state is data (State). A backend turns it into rules and applies
// the whole of it atomically (iptables: table by table, rolled back on a
// failure), so a failed apply leaves the previous ruleset in force, and
// Cleanup removes exactly what Apply added.
package firewall

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"time"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/state"
)

// State is everything the host's interception needs to know.
type State struct {
	// VMCIDR is the guest range; packets from guest interfaces with any other
	// source are spoofed and dropped.
	VMCIDR netip.Prefix
	// GuestInterfaces are interface names or patterns ending in '*'.
	GuestInterfaces []string
	// TProxyPort is where intercepted TCP goes (the data plane's listener).
	TProxyPort uint16
	// DNSPort is where guest DNS (UDP and TCP 53) is redirected (the resolver).
	DNSPort uint16
	// Mark is set on intercepted packets; policy routing delivers them locally.
	Mark uint32
	// UpstreamMark is carried by the data plane's own upstream sockets.
	UpstreamMark uint32
	// NATIfaces are guest interfaces of projects with the spec's direct NAT
	// egress (unfiltered): no interception, forwarded and masqueraded.
	NATIfaces []string
	// NATGuests are the guest addresses of those projects (the iptables
	// backend keys its NAT set by address).
	NATGuests []netip.Addr
	// SSH forwards a host port to a guest's port 22 (inbound only; replies
	// only for those flows).
	SSH []SSHForward
	// Uplink, when set, is the only interface direct-NAT egress and the
	// flows the kernel forwards leave by (the spec's LAN_IF); empty: any
	// interface that is not a guest's.
	Uplink string
	// Guests are the placed projects' guests (proxied egress) with the part
	// of their policy the ruleset carries out, sorted by address.
	Guests []Guest
}

// SSHForward is one inbound SSH DNAT.
type SSHForward struct {
	HostPort uint16
	GuestIP  netip.Addr
}

// Desired returns the desired state for cfg and the projects placed by
// `net up` (st may be nil), each guest's kernel part taken from pol, cfg
// compiled (the one decider: nothing here weighs a rule).
func Desired(cfg *config.Config, st *state.State, pol *policy.Policy) State {
	s := State{
		VMCIDR:          cfg.VMCIDR,
		GuestInterfaces: append([]string(nil), cfg.GuestInterfaces...),
		TProxyPort:      cfg.TProxyPort,
		DNSPort:         cfg.DNSPort,
		Mark:            cfg.Mark,
		UpstreamMark:    cfg.UpstreamMark,
		Uplink:          cfg.Uplink,
	}
	// Every placed project's guest (the config's merged view names each
	// placed project with its subnet) gets its kernel part.
	var taps map[string]string
	if st != nil {
		taps = make(map[string]string, len(st.Projects))
		for _, p := range st.Projects {
			taps[p.Name] = p.TAP
		}
	}
	for i := range cfg.Projects {
		cp := &cfg.Projects[i]
		if !cp.Subnet.IsValid() {
			continue
		}
		if st != nil {
			if p, ok := st.Projects[cp.Name]; ok && p.Egress == state.EgressNAT {
				continue
			}
		}
		// pol is cfg compiled, so it holds every project; should one be
		// missing all the same, its guest gets nothing but resets.
		var k policy.Kernel
		if pr := pol.Project(cp.Name); pr != nil {
			k = pr.Kernel()
		}
		s.Guests = append(s.Guests, Guest{Addr: cp.Subnet.Masked().Addr().Next().Next(), TAP: taps[cp.Name], Kernel: k})
	}
	sort.Slice(s.Guests, func(i, j int) bool { return s.Guests[i].Addr.Less(s.Guests[j].Addr) })
	if st == nil {
		return s
	}
	// Only the few projects with NAT egress or SSH are sorted (by name), not
	// all of them: this runs on every `net up` and reload.
	var special []state.Project
	for _, p := range st.Projects {
		if p.Egress == state.EgressNAT || p.SSHPort != 0 {
			special = append(special, p)
		}
	}
	sort.Slice(special, func(i, j int) bool { return special[i].Name < special[j].Name })
	for _, p := range special {
		if p.Egress == state.EgressNAT {
			s.NATIfaces = append(s.NATIfaces, p.TAP)
			s.NATGuests = append(s.NATGuests, p.GuestIP())
		}
		if p.SSHPort != 0 {
			s.SSH = append(s.SSH, SSHForward{HostPort: p.SSHPort, GuestIP: p.GuestIP()})
		}
	}
	return s
}

// String renders s for logs and comparisons.
func (s State) String() string {
	return s.Global() + fmt.Sprintf(" nat=%v ssh=%v guests=%v", s.NATIfaces, s.SSH, s.Guests)
}

// Global renders the parts of s that are not per project: when they are
// equal, two states differ only by elements (UpdateProjects).
func (s State) Global() string {
	return fmt.Sprintf("vm_cidr=%s guest_interfaces=%v tproxy_port=%d dns_port=%d mark=%#x upstream_mark=%#x uplink=%q limits=%v",
		s.VMCIDR, s.GuestInterfaces, s.TProxyPort, s.DNSPort, s.Mark, s.UpstreamMark, s.Uplink, s.Limits())
}

// Backend applies a desired State to the host.
type Backend interface {
	// Apply makes the host's rules equal to s in one atomic step.
	Apply(ctx context.Context, s State) error
	// UpdateProjects changes only the per-project parts (NAT egress, SSH
	// forwards) from old to s, element by element.
	UpdateProjects(ctx context.Context, old, s State) error
	// Cleanup removes everything Apply added; it is not an error if nothing is there.
	Cleanup(ctx context.Context) error
	// Installed reports whether the backend's rules are present.
	Installed(ctx context.Context) (bool, error)
	// Snapshot is the installed ruleset in canonical text ("" if absent).
	Snapshot(ctx context.Context) (string, error)
	// Counters are the ruleset's packet counters by "chain: comment".
	Counters(ctx context.Context) (map[string]uint64, error)
	// Describe names what the backend installs, for messages.
	Describe() string
	// Admit adds timed elements: the kernel forwards each guest's new
	// connections to the address and port until the element times out
	// (tcp rules: what the resolver handed out). Adding one that is there
	// refreshes nothing and is not an error.
	Admit(ctx context.Context, es []Admitted) error
	// Unadmit deletes such elements (absent ones are not an error).
	Unadmit(ctx context.Context, es []Admitted) error
	// UnadmitGuests deletes every such element of these guests, whoever
	// admitted it (a daemon that is no longer running, whose record of
	// them is gone).
	UnadmitGuests(ctx context.Context, guests []netip.Addr) error
}

// Admitted is one timed element: guest may open connections to Addr:Port
// for TTL.
type Admitted struct {
	Guest, Addr netip.Addr
	Port        uint16
	TTL         time.Duration
	// Deny makes it a refusal instead (a tcp deny rule's name was handed
	// out for Addr), checked before any allow; AllPorts: on every port
	// (Port is ignored).
	Deny, AllPorts bool
}

// Kinds are the config's firewall values.
const (
	KindNFTables = "nftables"
	KindIPTables = "iptables"
)

// NewHost returns the backend of kind for the current network namespace.
func NewHost(kind string) (Backend, error) {
	switch kind {
	case KindNFTables, "":
		return NewHostNFTables()
	case KindIPTables:
		return NewHostIPTables()
	}
	return nil, fmt.Errorf("unknown firewall backend %q", kind)
}
