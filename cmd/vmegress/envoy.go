package main

import (
	"fmt"
	"net/netip"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/internal/daemon"
	"github.com/vmegress/vmegress/internal/engine"
	"github.com/vmegress/vmegress/internal/envoy"
	"github.com/vmegress/vmegress/internal/policy"
)

func (a *app) envoyCmd() *cobra.Command {
	c := &cobra.Command{Use: "envoy", Short: "Envoy as the data plane (spec 6.2-6.7)"}
	var static bool
	var adminPort int
	var adminSocket string
	cfgCmd := &cobra.Command{
		Use:   "config --static",
		Short: "Print a standalone Envoy bootstrap with the policy applied (spec 6.6)",
		Long: `Config --static prints an Envoy bootstrap (JSON, which Envoy reads as YAML too)
for people who run Envoy themselves under the spec's systemd unit
(packaging/envoy-microvm-egress.service): the transparent listener on
tproxy_port with original_dst and tls_inspector, one filter chain per project,
port and rule kind picked by source /30 first, allowed names dialled through
Envoy's dynamic forward proxy (never the guest's chosen address), always-denied
DNS answers dropped, upstream sockets marked with upstream_mark. Install the
interception with 'vmegress up' and the projects with 'vmegress net up'; rerun
this after policy changes (the daemon's xDS mode is not built yet).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !static {
				return usagef("only --static is supported yet (Envoy driven by the daemon over xDS is not built)")
			}
			raw, err := a.loadConfig()
			if err != nil {
				return err
			}
			st, err := a.store().Load()
			if err != nil {
				return err
			}
			cfg, err := engine.Effective(raw, st)
			if err != nil {
				return usageError{err}
			}
			ups, err := daemon.Upstreams(cfg, "")
			if err != nil {
				return err
			}
			if adminPort < 1 || adminPort > 65535 {
				return usagef("--admin-port %d out of range", adminPort)
			}
			pol, err := policy.Compile(cfg)
			if err != nil {
				return usageError{err}
			}
			if err := envoy.Check(pol); err != nil {
				return usageError{fmt.Errorf("the policy cannot be carried out by Envoy: %w", err)}
			}
			set := envoy.SettingsFrom(cfg)
			set.Upstreams = ups
			set.AdminAddress = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(adminPort))
			set.AdminSocket = adminSocket
			set.AccessLogPath = "/dev/stdout"
			b := envoy.Bootstrap(pol, set)
			fmt.Fprintf(a.stdout, "%s\n", envoy.JSON(b))
			return nil
		},
	}
	cfgCmd.Flags().BoolVar(&static, "static", false, "a standalone bootstrap (no xDS)")
	cfgCmd.Flags().IntVar(&adminPort, "admin-port", 9902, "Envoy's admin port on 127.0.0.1 (without --admin-socket; any local user can use it)")
	cfgCmd.Flags().StringVar(&adminSocket, "admin-socket", "", "put Envoy's admin on this unix socket (mode 0600) instead of a TCP port")
	c.AddCommand(cfgCmd)
	return c
}
