package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmegress/vmegress/client"
	"github.com/vmegress/vmegress/internal/api"
	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/daemon"
	"github.com/vmegress/vmegress/internal/engine"
	"github.com/vmegress/vmegress/internal/hostnet"
	"github.com/vmegress/vmegress/internal/placement"
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

// apiError turns an API refusal into the CLI's exit codes: invalid or
// conflicting requests are usage errors (2), the rest runtime failures (1).
func apiError(err error) error {
	var ce *client.Error
	if errors.As(err, &ce) && (ce.Status == 400 || ce.Status == 409 || ce.Status == 404) {
		return usageError{err}
	}
	return err
}

// engineErr maps the engine's refusals to exit code 2.
func engineErr(err error) error {
	if placement.IsInvalid(err) || placement.IsConflict(err) {
		return usageError{err}
	}
	return err
}

// viaDaemonOrEngine runs a change through the running daemon's API, or,
// when no daemon answers, through an engine of this process under the state
// lock. A daemon that is starting (it holds the lock, its API is not up
// yet) is waited for.
func (a *app) viaDaemonOrEngine(ctx context.Context, cfg *config.Config, remote func(*client.Client) error, local func(*engine.Engine) error) error {
	c := client.New(a.apiSocketFor(cfg))
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := remote(c)
		if err == nil || !client.IsUnavailable(err) {
			return apiError(err)
		}
		unlock, lerr := a.store().TryLock()
		if lerr == nil {
			defer unlock()
			eng, closeEng, err := a.newEngine(ctx, cfg, false)
			if err != nil {
				return engineErr(err)
			}
			defer closeEng()
			return engineErr(local(eng))
		}
		if !errors.Is(lerr, state.ErrLocked) || time.Now().After(deadline) {
			return fmt.Errorf("no daemon answers on %s and the state directory is locked: %w", c.Socket, lerr)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (a *app) netUpCmd() *cobra.Command {
	var (
		spec                client.ProjectSpec
		subnet, tap, egress string
		owner, group        int
		sshPort             int
		asJSON              bool
	)
	c := &cobra.Command{
		Use:   "up PROJECT",
		Short: "Create the project's TAP and /30 and put its egress behind vmegress (idempotent)",
		Long: `Net up creates a persistent TAP for the project (owned by --owner/--group, for
Firecracker's jailer), allocates the next free /30 of vm_cidr that no address or
route of the host overlaps (or --subnet, or the project's subnet in the config),
puts the host address (.1) on the TAP, derives a stable guest MAC, records it all in
the state directory, and makes the guest's egress go through the interception
(--egress nat: the spec's direct NAT instead). --ssh-port N forwards host port N to
the guest's port 22 (not a port the host listens on; below 1024 only with
--allow-privileged-ssh-port). It prints the TAP, addresses, MAC, the kernel ip=
argument and the body of Firecracker's PUT /network-interfaces/eth0. With the daemon
running, the change is made by the daemon (its API); otherwise by this command.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			if sshPort < 0 || sshPort > 65535 {
				return usagef("--ssh-port %d out of range (1-65535)", sshPort)
			}
			spec.TAP, spec.Subnet, spec.Egress, spec.SSHPort = tap, subnet, egress, uint16(sshPort)
			spec.Owner, spec.Group = optID(owner), optID(group)
			var out client.Placement
			err = a.viaDaemonOrEngine(cmd.Context(), cfg, func(c *client.Client) error {
				pl, err := c.PutProject(cmd.Context(), name, spec)
				if err == nil {
					out = *pl
				}
				return err
			}, func(eng *engine.Engine) error {
				req, err := api.RequestFromSpec(name, spec)
				if err != nil {
					return err
				}
				if spec.SSHPort != 0 {
					if cur, ok := eng.Snapshot().State.Projects[name]; !ok || cur.SSHPort != spec.SSHPort {
						if err := checkSSHPort(spec.SSHPort, spec.AllowPrivilegedSSHPort); err != nil {
							return &placement.Conflict{Err: err}
						}
					}
				}
				p, _, err := eng.Place(cmd.Context(), req, nil)
				if err != nil {
					return err
				}
				out = describe(eng.Snapshot().Config, p)
				return nil
			})
			if err != nil {
				return err
			}
			return a.printNet([]client.Placement{out}, asJSON, true)
		},
	}
	f := c.Flags()
	f.StringVar(&subnet, "subnet", "", "the /30 to use (default: the config's, else the next free one)")
	f.StringVar(&tap, "tap", "", "TAP name (default tap-PROJECT); must match guest_interfaces")
	f.IntVar(&owner, "owner", -1, "uid that may open the TAP (Firecracker's jailer user)")
	f.IntVar(&group, "group", -1, "gid that may open the TAP")
	f.IntVar(&sshPort, "ssh-port", 0, "forward this host port to the guest's port 22")
	f.BoolVar(&spec.AllowPrivilegedSSHPort, "allow-privileged-ssh-port", false, "allow an --ssh-port below 1024")
	f.StringVar(&egress, "egress", state.EgressProxy, "proxy (through vmegress) or nat (the spec's direct NAT, unfiltered)")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

// checkSSHPort is the host check of an SSH forward's port (no privileged
// port unless asked; see daemon.CheckSSHPort).
func checkSSHPort(port uint16, allowPrivileged bool) error {
	if err := daemon.CheckSSHPort(port, allowPrivileged); err != nil {
		return err
	}
	// Not a port the host serves on: the forward would take the service over.
	nl, err := netlink.NewHandle(unix.NETLINK_INET_DIAG)
	if err != nil {
		return fmt.Errorf("opening netlink: %w", err)
	}
	defer nl.Close()
	return hostnet.CheckPortFree(nl, port, "")
}

func describe(cfg *config.Config, p state.Project) client.Placement {
	ups, _ := daemon.Upstreams(cfg, "")
	return placement.Describe(p, placement.Nameserver(p, ups))
}

func optID(v int) *uint32 {
	if v < 0 {
		return nil
	}
	u := uint32(v)
	return &u
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
			var out client.Removed
			err = a.viaDaemonOrEngine(cmd.Context(), cfg, func(c *client.Client) error {
				r, err := c.DeleteProject(cmd.Context(), name)
				if err == nil {
					out = *r
				}
				return err
			}, func(eng *engine.Engine) error {
				p, found, err := eng.Remove(cmd.Context(), name)
				out = client.Removed{Project: name, Found: found}
				if found {
					out.TAP, out.Subnet = p.TAP, p.Subnet.String()
				}
				return err
			})
			if err != nil {
				return err
			}
			if !out.Found {
				fmt.Fprintf(a.stdout, "project %s is not up; nothing to do\n", name)
				return nil
			}
			fmt.Fprintf(a.stdout, "project %s down: %s and %s removed\n", name, out.TAP, out.Subnet)
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
			var ps []client.Placement
			projects, err := client.New(a.apiSocketFor(cfg)).Projects(cmd.Context())
			for _, p := range projects {
				if p.Placement != nil {
					ps = append(ps, *p.Placement)
				}
			}
			if client.IsUnavailable(err) {
				// No daemon: the state file (replaced whole on every change,
				// so it reads consistently without the lock).
				ps, err = nil, nil
				eng, closeEng, oerr := a.newEngine(cmd.Context(), cfg, false)
				if oerr != nil {
					return engineErr(oerr)
				}
				defer closeEng()
				for _, p := range eng.Snapshot().State.Sorted() {
					ps = append(ps, describe(cfg, p))
				}
			}
			if err != nil {
				return apiError(err)
			}
			return a.printNet(ps, asJSON, false)
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func (a *app) printNet(infos []client.Placement, asJSON, detail bool) error {
	if asJSON {
		enc := json.NewEncoder(a.stdout)
		enc.SetIndent("", "  ")
		if detail && len(infos) == 1 {
			return enc.Encode(infos[0])
		}
		if infos == nil {
			infos = []client.Placement{}
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
