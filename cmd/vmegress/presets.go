package main

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/internal/config"
)

// presetJSON is one preset as `policy presets --json` prints it.
type presetJSON struct {
	Name        string   `json:"name"`
	Version     string   `json:"version"`
	Description string   `json:"description"`
	Sources     []string `json:"sources"`
	Rules       []string `json:"rules"`
}

func (a *app) presetsCmd() *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "presets [NAME]",
		Short: "List the shipped presets (- preset: NAME) and the rules each expands to",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			list := config.Presets()
			if len(args) == 1 {
				pre, ok := config.LookupPreset(args[0])
				if !ok {
					return usagef("preset %q does not exist (presets: %s)", args[0], strings.Join(config.PresetNames(), ", "))
				}
				list = []config.Preset{pre}
			}
			var out []presetJSON
			for _, pre := range list {
				rules, err := pre.Rules("allow")
				if err != nil {
					return fmt.Errorf("expanding preset %s: %w", pre.Name, err)
				}
				pj := presetJSON{Name: pre.Name, Version: pre.Version, Description: pre.Description, Sources: pre.Sources}
				for _, r := range rules {
					r.Preset = ""
					pj.Rules = append(pj.Rules, r.String())
				}
				out = append(out, pj)
			}
			if asJSON {
				enc := json.NewEncoder(a.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(out)
			}
			for i, pj := range out {
				if len(args) == 0 {
					fmt.Fprintf(a.stdout, "%-14s %s  %s\n", pj.Name, pj.Version, pj.Description)
					continue
				}
				if i > 0 {
					fmt.Fprintln(a.stdout)
				}
				fmt.Fprintf(a.stdout, "preset %s (version %s): %s\n", pj.Name, pj.Version, pj.Description)
				for _, s := range pj.Sources {
					fmt.Fprintf(a.stdout, "  # source: %s\n", s)
				}
				for _, r := range pj.Rules {
					fmt.Fprintf(a.stdout, "  - %s\n", r)
				}
			}
			return nil
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}
