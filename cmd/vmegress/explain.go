package main

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/internal/daemon"
	vdns "github.com/vmegress/vmegress/internal/dns"
	"github.com/vmegress/vmegress/internal/policy"
)

func (a *app) explainCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "explain PROJECT HOST[:PORT]",
		Short: "Show the verdict for a connection, the rule that decides it, and what DNS would answer",
		Long: `Explain decides HOST[:PORT] (port 443 by default) for PROJECT as the data plane
would: TLS (sni rules) or plain HTTP (http rules) by the port's rules, or cidr rules
when HOST is an address. For a name it also shows what the resolver would answer
the guest, asking the upstream resolvers for real.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			pol, err := policy.Compile(cfg)
			if err != nil {
				return err
			}
			pr := pol.Project(args[0])
			if pr == nil {
				return usagef("no project %q in %s", args[0], a.configPath)
			}
			host, port, err := splitHostPort(args[1])
			if err != nil {
				return err
			}
			out := a.stdout
			fmt.Fprintf(out, "project: %s\nconnection: %s\n", pr.Name, net.JoinHostPort(host, strconv.Itoa(int(port))))
			if ip, err := netip.ParseAddr(host); err == nil {
				if rule, ok := pr.CIDRAllows(ip, port); ok {
					fmt.Fprintf(out, "verdict: allow\nrule: %s\ninspection: none (cidr rule)\n", rule)
				} else if pr.InspectFor(port) != policy.InspectNone {
					fmt.Fprintf(out, "verdict: depends on the name the client sends (TLS SNI or HTTP Host); no cidr rule names %s\n", ip)
				} else {
					fmt.Fprintf(out, "verdict: deny\nreason: no rule of project %s allows %s on port %d\n", pr.Name, ip, port)
				}
				return nil
			}
			kind := policy.KindTLS
			if pr.InspectFor(port) == policy.InspectHTTP {
				kind = policy.KindHTTP
			}
			d := pr.DecideName(kind, host, port)
			fmt.Fprintf(out, "as: %s\nverdict: %s\n", map[policy.Kind]string{policy.KindTLS: "TLS (sni rules)", policy.KindHTTP: "plain HTTP (http rules)"}[kind], d.Verdict)
			if d.Rule != "" {
				fmt.Fprintf(out, "rule: %s\n", d.Rule)
			}
			if d.Reason != "" {
				fmt.Fprintf(out, "reason: %s\n", d.Reason)
			}
			name := vdns.Name(host)
			if !pr.AllowsName(name) {
				fmt.Fprintln(out, "dns: NXDOMAIN, decided locally (the query is never sent upstream)")
				return nil
			}
			ups, err := daemon.Upstreams(cfg, "")
			if err != nil {
				fmt.Fprintf(out, "dns: answered by forwarding upstream, but %v\n", err)
				return nil
			}
			res := &vdns.Resolver{Upstreams: ups, GuestRange: cfg.VMCIDR, Log: a.log}
			res.SetPolicy(pol)
			ctx, cancel := context.WithTimeout(cmd.Context(), 2*vdns.UpstreamTimeout)
			defer cancel()
			addrs, err := res.Lookup(ctx, pr, name)
			if err != nil {
				fmt.Fprintf(out, "dns: answered by forwarding to %s: %v\n", strings.Join(ups, ", "), err)
				return nil
			}
			var s []string
			for _, ad := range addrs {
				s = append(s, ad.String())
			}
			fmt.Fprintf(out, "dns: answered by forwarding to %s: %s (after removing always-denied addresses)\n", strings.Join(ups, ", "), strings.Join(s, " "))
			return nil
		},
	}
}

func splitHostPort(s string) (string, uint16, error) {
	host, portS, err := net.SplitHostPort(s)
	if err != nil {
		return s, 443, nil
	}
	p, err := strconv.ParseUint(portS, 10, 16)
	if err != nil || p == 0 {
		return "", 0, usagef("port %q out of range (1-65535)", portS)
	}
	return host, uint16(p), nil
}
