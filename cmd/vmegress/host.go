package main

import (
	"fmt"
	"log/slog"
	"net"

	mdns "github.com/miekg/dns"
	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"

	"github.com/vmegress/vmegress/internal/daemon"
	vdns "github.com/vmegress/vmegress/internal/dns"
	"github.com/vmegress/vmegress/internal/firewall"
	"github.com/vmegress/vmegress/internal/proxy"
)

// hostInterception builds the interception over the real host (current netns).
func hostInterception() (daemon.Interception, *netlink.Handle, error) {
	fw, err := firewall.NewHostNFTables()
	if err != nil {
		return daemon.Interception{}, nil, err
	}
	h, err := netlink.NewHandle()
	if err != nil {
		return daemon.Interception{}, nil, fmt.Errorf("opening netlink: %w", err)
	}
	return daemon.Interception{Firewall: fw, Netlink: h}, h, nil
}

func (a *app) runCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "Run the daemon: install interception and serve the data plane",
		Long: `Run installs the host's interception (replacing whatever a previous run left),
serves the builtin data plane, and writes one JSON access-log line per connection
to stdout (daemon logs go to stderr). On SIGTERM or SIGINT the data plane stops
and interception stays in place, so guests stay fail-closed until 'vmegress down'.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			in, h, err := hostInterception()
			if err != nil {
				return err
			}
			defer h.Close()
			d := &daemon.Daemon{
				Config:       cfg,
				Interception: in,
				Listen:       proxy.ListenTransparent,
				Dial:         proxy.MarkedDialer(cfg.UpstreamMark, net.Dialer{Timeout: proxy.DefaultDialTimeout}),
				DNSUDP:       &mdns.Client{Net: "udp", Timeout: vdns.UpstreamTimeout, Dialer: &net.Dialer{Control: proxy.MarkControl(cfg.UpstreamMark)}},
				DNSTCP:       &mdns.Client{Net: "tcp", Timeout: vdns.UpstreamTimeout, Dialer: &net.Dialer{Control: proxy.MarkControl(cfg.UpstreamMark)}},
				HostAddrs:    proxy.KernelAddrChecker{Handle: h},
				Log:          a.log,
				AccessLog:    slog.New(slog.NewJSONHandler(a.stdout, nil)),
			}
			return d.Run(cmd.Context())
		},
	}
}

func (a *app) upCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "up",
		Short: "Install the host's interception (nftables table + policy routing); idempotent",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			in, h, err := hostInterception()
			if err != nil {
				return err
			}
			defer h.Close()
			if err := in.Install(cmd.Context(), cfg); err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "interception installed: nft table inet %s, ip rule fwmark %#x lookup %d, local 0.0.0.0/0 dev lo table %d\n",
				firewall.TableName, cfg.Mark, cfg.RouteTable, cfg.RouteTable)
			return nil
		},
	}
}

func (a *app) downCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "down",
		Short: "Remove everything 'up' added; idempotent, needs no config",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			in, h, err := hostInterception()
			if err != nil {
				return err
			}
			defer h.Close()
			if err := in.Remove(cmd.Context()); err != nil {
				return err
			}
			fmt.Fprintln(a.stdout, "interception removed")
			return nil
		},
	}
}
