package main

import (
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/doctor"
)

func (a *app) doctorCmd() *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "doctor",
		Short: "Check the host: kernel support, interception, routing, daemon, DNS, guest interfaces",
		Long: `Doctor runs the spec's verification (6.3, 6.10) as named checks. Each failure
says how to fix it; the exit code is 1 when any check fails.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			results := doctor.Run(cmd.Context(), a.checks(cfg))
			if asJSON {
				enc := json.NewEncoder(a.stdout)
				enc.SetIndent("", "  ")
				enc.Encode(results)
			} else {
				for _, r := range results {
					mark := "ok  "
					if !r.OK {
						mark = "FAIL"
					}
					fmt.Fprintf(a.stdout, "[%s] %s: %s\n", mark, r.Name, r.Detail)
					if !r.OK && r.Fix != "" {
						fmt.Fprintf(a.stdout, "       fix: %s\n", r.Fix)
					}
				}
			}
			// Valid but weaker than the default: said, never a failure.
			warnTo := a.stdout
			if asJSON {
				warnTo = a.stderr
			}
			for _, w := range cfg.Warnings() {
				fmt.Fprintf(warnTo, "[warn] policy: %s\n", w)
			}
			if doctor.Failed(results) {
				return errSilent
			}
			return nil
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func (a *app) checks(cfg *config.Config) []doctor.Check {
	in, h, ierr := a.hostInterception(cfg.Firewall)
	return doctor.Host{Config: cfg, Store: a.store(), Interception: in, Netlink: h, IErr: ierr, FetchStatus: fetchStatus}.Checks()
}
