package main

import (
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/policytest"
)

func (a *app) policyTestCmd() *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "test FILE...",
		Short: "Check expectation files against the compiled policy (exit 1 listing each failed expectation)",
		Long: `Each FILE names a config (config: PATH, relative to the file) or holds projects
inline (projects:), and lists expectations:

  expect:
    - {project: alpha, connect: "github.com:443", verdict: allow}
    - {project: alpha, connect: "example.com:80", as: http, verdict: deny}
    - {project: alpha, resolve: pypi.org, verdict: allow}

They are decided by the same compiled policy the data planes use. Exit 0 when
every expectation holds, 1 when one does not, 2 when a file is invalid.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var all []policytest.Result
			for _, path := range args {
				f, err := policytest.Load(path)
				if err != nil {
					return usagef("%v", err)
				}
				rs, err := policytest.Run(f)
				if err != nil {
					return usagef("%v", err)
				}
				all = append(all, rs...)
			}
			failed := policytest.Failed(all)
			if asJSON {
				enc := json.NewEncoder(a.stdout)
				enc.SetIndent("", "  ")
				enc.Encode(map[string]any{"results": all, "passed": len(all) - len(failed), "failed": len(failed)})
			} else {
				fmt.Fprint(a.stdout, policytest.Table(all))
				fmt.Fprintf(a.stdout, "%d expectations, %d failed\n", len(all), len(failed))
			}
			if len(failed) > 0 {
				fmt.Fprint(a.stderr, policytest.Failures(all))
				return errSilent
			}
			return nil
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func (a *app) policyDiffCmd() *cobra.Command {
	var asJSON bool
	var expect []string
	c := &cobra.Command{
		Use:   "diff OLD NEW",
		Short: "Per project, the rules added and removed between two configs, and the expectations whose verdict changes",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			old, err := config.Load(args[0])
			if err != nil {
				return err
			}
			new, err := config.Load(args[1])
			if err != nil {
				return err
			}
			var files []*policytest.File
			for _, path := range expect {
				f, err := policytest.Load(path)
				if err != nil {
					return usagef("%v", err)
				}
				files = append(files, f)
			}
			ds, cs, err := policytest.Diff(old, new, files)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(a.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(map[string]any{"projects": ds, "changed_expectations": cs})
			}
			fmt.Fprint(a.stdout, policytest.DiffText(ds, cs))
			return nil
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	c.Flags().StringArrayVar(&expect, "expect", nil, "an expectation file whose verdicts to compare (repeatable)")
	return c
}
