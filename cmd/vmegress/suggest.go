package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/suggest"
)

func (a *app) suggestCmd() *cobra.Command {
	var (
		since  time.Duration
		file   string
		asJSON bool
	)
	c := &cobra.Command{
		Use:   "suggest PROJECT",
		Short: "Print allow rules (YAML, ready to paste) that would have covered a project's observed traffic",
		Long: `Suggest reads the access log (--log, default the config's access_log; "-" is
stdin) and prints allow rules covering every connection the project made, allowed
or not: run a project with mode: audit, then paste the suggestion and switch to
enforce. Several names under one registrable domain become a "*." wildcard
(never above one: no "*.co.uk"). Addresses of this host, of the guest range
(vm_cidr) and always-denied addresses (metadata, private, loopback, ...) are never
suggested; what was left out is listed in comments with the reason.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			// The guest range comes from the config; with --log and no
			// loadable config, the default range.
			ex := suggest.Exclusions{GuestRange: config.DefaultVMCIDR}
			cfg, cfgErr := a.loadConfig()
			if cfgErr == nil {
				ex.GuestRange = cfg.VMCIDR
			}
			hostAddrs, err := localAddrs()
			if err != nil {
				return err
			}
			ex.HostAddrs = hostAddrs
			if file == "" {
				if cfgErr != nil {
					return cfgErr
				}
				if cfg.AccessLog == "" {
					return usagef("no access log to read: pass --log FILE (or set access_log in %s)", a.configPath)
				}
				file = cfg.AccessLog
			}
			var r io.Reader = os.Stdin
			if file != "-" {
				f, err := os.Open(file)
				if err != nil {
					return fmt.Errorf("opening the access log: %w", err)
				}
				defer f.Close()
				r = f
			}
			var from time.Time
			if since > 0 {
				from = time.Now().Add(-since)
			}
			o, err := suggest.Read(r, args[0], from)
			if err != nil {
				return fmt.Errorf("reading the access log: %w", err)
			}
			sg := o.Suggest(ex)
			if asJSON {
				enc := json.NewEncoder(a.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(suggest.NewReport(args[0], sg, o))
			}
			fmt.Fprint(a.stdout, suggest.YAML(args[0], sg, o))
			return nil
		},
	}
	c.Flags().DurationVar(&since, "since", 0, "only traffic this recent (e.g. 24h); zero: all")
	c.Flags().StringVar(&file, "log", "", "access log file (- for stdin)")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON: rules, and what was omitted and why")
	return c
}

// localAddrs returns the addresses of every interface of this network
// namespace: the host's own addresses, which suggest never proposes.
func localAddrs() ([]netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("listing the host's addresses: %w", err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr().Unmap())
		}
	}
	return out, nil
}
