package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"runtime/debug"
	"slices"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/daemon"
	"github.com/vmegress/vmegress/internal/firewall"
	"github.com/vmegress/vmegress/internal/hostnet"
	"github.com/vmegress/vmegress/internal/state"
)

func (a *app) netCmd() *cobra.Command {
	c := &cobra.Command{Use: "net", Short: "Per-project TAP devices and /30s (the spec's microvm-net-up/down)",
		// Short-lived commands that read every project: fewer collections,
		// a few more MiB for a few milliseconds (measured: BENCHMARKS.md).
		PersistentPreRun: func(*cobra.Command, []string) { debug.SetGCPercent(400) }}
	c.AddCommand(a.netUpCmd(), a.netDownCmd(), a.netListCmd())
	return c
}

// netInfo is what `net up` and `net list --json` print for a project.
type netInfo struct {
	Project    string          `json:"project"`
	TAP        string          `json:"tap"`
	HostIP     string          `json:"host_ip"`
	GuestIP    string          `json:"guest_ip"`
	Netmask    string          `json:"netmask"`
	Subnet     string          `json:"subnet"`
	MAC        string          `json:"mac"`
	Egress     string          `json:"egress"`
	SSHPort    uint16          `json:"ssh_port,omitempty"`
	Nameserver string          `json:"nameserver"`
	KernelIP   string          `json:"kernel_ip_arg"`
	Firecraker json.RawMessage `json:"firecracker_network_interface"`
}

func infoOf(p state.Project, nameserver string) netInfo {
	mask := net.IP(net.CIDRMask(30, 32)).String()
	fc, _ := json.Marshal(map[string]string{"iface_id": "eth0", "host_dev_name": p.TAP, "guest_mac": p.MAC})
	return netInfo{
		Project: p.Name, TAP: p.TAP, HostIP: p.HostIP().String(), GuestIP: p.GuestIP().String(), Netmask: mask,
		Subnet: p.Subnet.String(), MAC: p.MAC, Egress: p.Egress, SSHPort: p.SSHPort, Nameserver: nameserver,
		// ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>
		KernelIP:   fmt.Sprintf("ip=%s::%s:%s::eth0:off:%s", p.GuestIP(), p.HostIP(), mask, nameserver),
		Firecraker: fc,
	}
}

// nameserverFor is what the guest should put in resolv.conf: for proxied
// egress any address works (vmegress answers), the host's TAP address is
// the natural one; direct NAT egress needs a real resolver.
func nameserverFor(cfg *config.Config, p state.Project) string {
	if p.Egress == state.EgressNAT {
		if ups, err := daemon.Upstreams(cfg, ""); err == nil && len(ups) > 0 {
			if ap, err := netip.ParseAddrPort(ups[0]); err == nil {
				return ap.Addr().String()
			}
		}
	}
	return p.HostIP().String()
}

func (a *app) netUpCmd() *cobra.Command {
	var (
		subnet, tap, egress string
		owner, group        int
		sshPort             int
		asJSON              bool
	)
	c := &cobra.Command{
		Use:   "up PROJECT",
		Short: "Create the project's TAP and /30 and put its egress behind vmegress (idempotent)",
		Long: `Net up creates a persistent TAP for the project (owned by --owner/--group, for
Firecracker's jailer), allocates the next free /30 of vm_cidr (or --subnet, or the
project's subnet in the config), puts the host address (.1) on the TAP, derives a
stable guest MAC, records it all in the state directory (locked, atomic), and makes
the guest's egress go through the interception (--egress nat: the spec's direct
NAT instead). --ssh-port N forwards host port N to the guest's port 22. It prints
the TAP, addresses, MAC, the kernel ip= argument and the body of Firecracker's
PUT /network-interfaces/eth0. A running daemon picks the project up at once.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			if egress != state.EgressProxy && egress != state.EgressNAT {
				return usagef("--egress must be proxy or nat, not %q", egress)
			}
			if sshPort < 0 || sshPort > 65535 {
				return usagef("--ssh-port %d out of range (1-65535)", sshPort)
			}
			if tap == "" {
				tap = state.TAPName(name)
			}
			if len(tap) > 15 {
				return usagef("--tap %q is longer than 15 characters", tap)
			}
			if !hostnet.Matches(cfg.GuestInterfaces, tap) {
				// An interface the ruleset does not treat as a guest's would
				// be routed like any other: refuse rather than leave it open.
				return usagef("TAP name %q does not match guest_interfaces %v, so its traffic would not be intercepted", tap, cfg.GuestInterfaces)
			}
			var want netip.Prefix
			if subnet != "" {
				if want, err = netip.ParsePrefix(subnet); err != nil || want.Bits() != 30 || want != want.Masked() || !cfg.VMCIDR.Contains(want.Addr()) {
					return usagef("--subnet %q must be a /30 network inside vm_cidr %s", subnet, cfg.VMCIDR)
				}
			}
			if cp := cfg.Project(name); cp != nil && cp.Subnet.IsValid() {
				if want.IsValid() && want != cp.Subnet {
					return usagef("--subnet %s disagrees with project %s's subnet %s in %s", want, name, cp.Subnet, a.configPath)
				}
				want = cp.Subnet
			}
			var placed state.Project
			var before *state.Project
			var after *state.State
			err = a.store().Update(func(s *state.State) error {
				if old, ok := s.Projects[name]; ok {
					before = &old
				}
				used := make([]netip.Prefix, 0, len(cfg.Projects)+len(s.Projects))
				for _, p := range cfg.Projects {
					if p.Subnet.IsValid() && p.Name != name {
						used = append(used, p.Subnet)
					}
				}
				for _, p := range s.Projects {
					if p.Name == name {
						continue
					}
					used = append(used, p.Subnet)
					if p.TAP == tap {
						return usagef("TAP %s is already project %s's", tap, p.Name)
					}
					if sshPort != 0 && int(p.SSHPort) == sshPort {
						return usagef("--ssh-port %d is already project %s's", sshPort, p.Name)
					}
				}
				p, exists := s.Projects[name]
				if exists && want.IsValid() && p.Subnet != want {
					return usagef("project %s is already up at %s; run net down first to move it", name, p.Subnet)
				}
				if !exists {
					sub := want
					if !sub.IsValid() {
						if sub, err = state.Allocate(cfg.VMCIDR, used); err != nil {
							return err
						}
					} else if slices.ContainsFunc(used, sub.Overlaps) {
						return usagef("subnet %s is already in use", sub)
					}
					p = state.Project{Name: name, Subnet: sub, MAC: state.MAC(name)}
				}
				p.TAP, p.Egress, p.SSHPort = tap, egress, uint16(sshPort)
				p.Owner, p.Group = optID(owner), optID(group)
				s.Projects[name] = p
				placed = p
				after = s // not changed after this
				return nil
			}, func() error {
				// Under the state lock: the daemon never installs an older state over this.
				nl, err := netlink.NewHandle()
				if err != nil {
					return fmt.Errorf("opening netlink: %w", err)
				}
				defer nl.Close()
				if err := hostnet.CreateTAP(nl, hostnet.TAP{Name: placed.TAP, HostIP: placed.HostIP(), GuestIP: placed.GuestIP(),
					GuestMAC: placed.MAC, Owner: placed.Owner, Group: placed.Group,
					Forwarding: placed.Egress == state.EgressNAT || placed.SSHPort != 0}); err != nil {
					return err
				}
				return a.applyProjects(cmd.Context(), cfg, before, &placed, after)
			})
			if err != nil {
				return err
			}
			return a.printNet(cfg, []state.Project{placed}, asJSON, true)
		},
	}
	f := c.Flags()
	f.StringVar(&subnet, "subnet", "", "the /30 to use (default: the config's, else the next free one)")
	f.StringVar(&tap, "tap", "", "TAP name (default tap-PROJECT); must match guest_interfaces")
	f.IntVar(&owner, "owner", -1, "uid that may open the TAP (Firecracker's jailer user)")
	f.IntVar(&group, "group", -1, "gid that may open the TAP")
	f.IntVar(&sshPort, "ssh-port", 0, "forward this host port to the guest's port 22")
	f.StringVar(&egress, "egress", state.EgressProxy, "proxy (through vmegress) or nat (the spec's direct NAT, unfiltered)")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func optID(v int) *uint32 {
	if v < 0 {
		return nil
	}
	u := uint32(v)
	return &u
}

func copyState(s *state.State) *state.State {
	c := &state.State{Projects: map[string]state.Project{}}
	for k, v := range s.Projects {
		c.Projects[k] = v
	}
	return c
}

// applyProjects brings the ruleset from project before to after (either
// nil: absent), all of the projects being all: only the changed elements
// when interception is installed, the whole ruleset otherwise (a TAP never
// comes up unfiltered).
func (a *app) applyProjects(ctx context.Context, cfg *config.Config, before, after *state.Project, all *state.State) error {
	in, h, err := a.hostInterception(cfg.Firewall)
	if err != nil {
		return err
	}
	defer h.Close()
	installed, err := in.Firewall.Installed(ctx)
	if err != nil {
		return err
	}
	if !installed {
		eff, err := daemon.Effective(cfg, all)
		if err != nil {
			return usageError{err}
		}
		return in.Install(ctx, eff, all)
	}
	// The other projects do not change: the difference of the one project
	// is the difference of the whole.
	one := func(p *state.Project) *state.State {
		st := &state.State{Projects: map[string]state.Project{}}
		if p != nil {
			st.Projects[p.Name] = *p
		}
		return st
	}
	return in.Firewall.UpdateProjects(ctx, firewall.Desired(cfg, one(before)), firewall.Desired(cfg, one(after)))
}

func (a *app) netDownCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "down PROJECT",
		Short: "Remove the project's TAP, addresses and rules; other projects are untouched",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			var gone state.Project
			var found bool
			var after *state.State
			err = a.store().Update(func(s *state.State) error {
				gone, found = s.Projects[name]
				delete(s.Projects, name)
				after = s
				return nil
			}, func() error {
				if !found {
					return nil
				}
				nl, err := netlink.NewHandle()
				if err != nil {
					return fmt.Errorf("opening netlink: %w", err)
				}
				defer nl.Close()
				if err := hostnet.DeleteTAP(nl, gone.TAP); err != nil {
					return err
				}
				return a.applyProjects(cmd.Context(), cfg, &gone, nil, after)
			})
			if err != nil {
				return err
			}
			if !found {
				fmt.Fprintf(a.stdout, "project %s is not up; nothing to do\n", name)
				return nil
			}
			fmt.Fprintf(a.stdout, "project %s down: %s and %s removed\n", name, gone.TAP, gone.Subnet)
			return nil
		},
	}
}

func (a *app) netListCmd() *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "list",
		Short: "List the projects that are up",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			st, err := a.store().Load()
			if err != nil {
				return err
			}
			return a.printNet(cfg, st.Sorted(), asJSON, false)
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func (a *app) printNet(cfg *config.Config, ps []state.Project, asJSON, detail bool) error {
	infos := make([]netInfo, len(ps))
	for i, p := range ps {
		infos[i] = infoOf(p, nameserverFor(cfg, p))
	}
	if asJSON {
		enc := json.NewEncoder(a.stdout)
		enc.SetIndent("", "  ")
		if detail && len(infos) == 1 {
			return enc.Encode(infos[0])
		}
		return enc.Encode(infos)
	}
	if detail {
		for _, in := range infos {
			tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "project\t%s\ntap\t%s\nhost ip\t%s\nguest ip\t%s\nnetmask\t%s\nmac\t%s\negress\t%s\n",
				in.Project, in.TAP, in.HostIP, in.GuestIP, in.Netmask, in.MAC, in.Egress)
			if in.SSHPort != 0 {
				fmt.Fprintf(tw, "ssh\thost port %d -> %s:22\n", in.SSHPort, in.GuestIP)
			}
			fmt.Fprintf(tw, "nameserver\t%s\nkernel arg\t%s\n", in.Nameserver, in.KernelIP)
			tw.Flush()
			fmt.Fprintf(a.stdout, "firecracker PUT /network-interfaces/eth0:\n%s\n", in.Firecraker)
		}
		return nil
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PROJECT\tTAP\tSUBNET\tGUEST IP\tMAC\tEGRESS\tSSH")
	for _, in := range infos {
		ssh := "-"
		if in.SSHPort != 0 {
			ssh = fmt.Sprint(in.SSHPort)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", in.Project, in.TAP, in.Subnet, in.GuestIP, in.MAC, in.Egress, ssh)
	}
	return tw.Flush()
}
