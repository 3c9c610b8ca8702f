package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/client"
	"github.com/vmegress/vmegress/internal/api"
	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/engine"
	"go.yaml.in/yaml/v3"
)

func (a *app) policySetCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "set PROJECT FILE",
		Short: "Replace a project's policy (mode, max_connections, allow) from a YAML or JSON file",
		Long: `Set replaces the policy of a project the API owns (one not named in the config
file) with FILE's: a YAML or JSON mapping with the keys of a project in the config
file (mode, max_connections, allow), checked with the config file's rules. New
connections are decided by it once the command returns; open ones follow
on_policy_change. "-" reads standard input.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			name, file := args[0], args[1]
			var data []byte
			var err error
			if file == "-" {
				data, err = io.ReadAll(os.Stdin)
			} else {
				data, err = os.ReadFile(file)
			}
			if err != nil {
				return usagef("reading %s: %v", file, err)
			}
			// Checked here first: errors name the file and line.
			pol, err := parsePolicyFile(file, name, data)
			if err != nil {
				return err
			}
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			var gen uint64
			err = a.viaDaemonOrEngine(cmd.Context(), cfg, func(c *client.Client) error {
				b, _ := json.Marshal(pol)
				r, err := c.SetPolicyDocument(cmd.Context(), name, b)
				if err == nil {
					gen = r.Generation
				}
				return err
			}, func(eng *engine.Engine) error {
				p, err := api.ParsePolicy(name, mustJSON(pol))
				if err != nil {
					return err
				}
				gen, err = eng.SetPolicy(cmd.Context(), *p)
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "policy of %s set (generation %d)\n", name, gen)
			return nil
		},
	}
}

func (a *app) eventsCmd() *cobra.Command {
	var f client.EventFilter
	c := &cobra.Command{
		Use:   "events",
		Short: "Follow the running daemon's decisions and changes (one JSON object a line)",
		Long: `Events prints every connection and DNS verdict (the access log's fields) and
every change (project placed, removed, policy replaced) as the daemon makes them,
until interrupted. --project and --verdict (allow, deny, would_deny, revoked)
filter. A reader that falls behind is sent a "lagged" event and dropped.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			for e, err := range client.New(a.apiSocketFor(cfg)).Events(cmd.Context(), f) {
				if err != nil {
					if cmd.Context().Err() != nil {
						return nil
					}
					return apiError(err)
				}
				fmt.Fprintf(a.stdout, "%s\n", e.Raw)
				if e.Type == "lagged" {
					return fmt.Errorf("dropped by the daemon: this reader fell behind")
				}
			}
			return nil
		},
	}
	c.Flags().StringVar(&f.Project, "project", "", "only this project's events")
	c.Flags().StringVar(&f.Verdict, "verdict", "", "only decisions with this verdict (changes always show)")
	return c
}

// parsePolicyFile checks a policy file with the config file's rules and
// returns it as a generic document (to send as JSON).
func parsePolicyFile(file, name string, data []byte) (any, error) {
	if _, err := config.ParsePolicy(file, name, data); err != nil {
		return nil, err
	}
	var doc any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, usagef("%s: %v", file, err)
	}
	return doc, nil
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}
