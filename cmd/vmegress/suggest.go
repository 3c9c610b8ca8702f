package main

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/internal/suggest"
)

func (a *app) suggestCmd() *cobra.Command {
	var (
		since time.Duration
		file  string
	)
	c := &cobra.Command{
		Use:   "suggest PROJECT",
		Short: "Print allow rules (YAML, ready to paste) that would have covered a project's observed traffic",
		Long: `Suggest reads the access log (--log, default the config's access_log; "-" is
stdin) and prints allow rules covering every connection the project made, allowed
or not: run a project with mode: audit, then paste the suggestion and switch to
enforce. Several names under one parent become a "*." wildcard.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				cfg, err := a.loadConfig()
				if err != nil {
					return err
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
			fmt.Fprint(a.stdout, suggest.YAML(args[0], o.Rules(), o))
			return nil
		},
	}
	c.Flags().DurationVar(&since, "since", 0, "only traffic this recent (e.g. 24h); zero: all")
	c.Flags().StringVar(&file, "log", "", "access log file (- for stdin)")
	return c
}
