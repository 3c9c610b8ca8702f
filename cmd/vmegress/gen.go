package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"

	"github.com/vmegress/vmegress/client"
	"github.com/vmegress/vmegress/internal/state"
)

// addGen adds the hidden `gen` command (man pages and shell completions,
// written at package build time from this very command tree, so they cannot
// go stale) and completes project names from the config and the state.
func (a *app) addGen(root *cobra.Command) {
	root.AddCommand(a.genCmd())
	for _, path := range [][]string{
		{"net", "up"}, {"net", "down"},
		{"policy", "explain"}, {"policy", "set"}, {"policy", "suggest"},
	} {
		c, _, err := root.Find(path)
		if err != nil || c.Name() != path[len(path)-1] {
			continue // a command that is not (yet) there completes nothing
		}
		c.ValidArgsFunction = a.completeProject
	}
	if c, _, err := root.Find([]string{"events"}); err == nil && c.Name() == "events" && c.Flags().Lookup("project") != nil {
		c.RegisterFlagCompletionFunc("project", func(cmd *cobra.Command, _ []string, toComplete string) ([]string, cobra.ShellCompDirective) {
			return a.completeProject(cmd, nil, toComplete)
		})
	}
}

// completionAPITimeout bounds the question to the daemon while completing:
// a shell waiting on a stuck daemon is worse than a partial list.
const completionAPITimeout = time.Second

// completeProject completes a command's first argument with project names;
// later arguments complete as files (policy set's FILE).
func (a *app) completeProject(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveDefault
	}
	ctx := context.Background()
	if cmd != nil && cmd.Context() != nil {
		ctx = cmd.Context()
	}
	var out []string
	for _, n := range a.projectNames(ctx) {
		if strings.HasPrefix(n, toComplete) {
			out = append(out, n)
		}
	}
	return out, cobra.ShellCompDirectiveNoFileComp
}

// projectNames lists the projects: those the running daemon has (asked over
// its API, which members of api_group may call), those of the config file,
// those placed by `net up` and those whose policy the API set (both in the
// state directory, for when no daemon runs). What cannot be read (no
// daemon, no config, a state directory only root may read) adds nothing.
func (a *app) projectNames(ctx context.Context) []string {
	seen := map[string]bool{}
	cfg, err := a.loadConfig()
	if err == nil {
		for _, p := range cfg.Projects {
			seen[p.Name] = true
		}
	}
	ctx, cancel := context.WithTimeout(ctx, completionAPITimeout)
	defer cancel()
	if ps, err := client.New(a.apiSocketFor(cfg)).Projects(ctx); err == nil {
		for _, p := range ps {
			seen[p.Name] = true
		}
	}
	st := state.Store{Dir: a.stateDir}
	if s, err := st.Load(); err == nil {
		for name := range s.Projects {
			seen[name] = true
		}
	}
	if pols, err := st.LoadPolicies(); err == nil {
		for name := range pols {
			seen[name] = true
		}
	}
	names := make([]string, 0, len(seen))
	for n := range seen {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

func (a *app) genCmd() *cobra.Command {
	c := &cobra.Command{
		Use:    "gen",
		Short:  "Generate man pages and shell completions (for packaging)",
		Hidden: true,
	}
	c.AddCommand(&cobra.Command{
		Use:   "man DIR",
		Short: "Write a man page (section 1) for every command into DIR",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			root := cmd.Root()
			root.DisableAutoGenTag = true // no build date in the page text
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return fmt.Errorf("writing man pages: %w", err)
			}
			header := &doc.GenManHeader{
				Title:   "VMEGRESS",
				Section: "1",
				Source:  "vmegress " + version,
				Manual:  "vmegress manual",
				Date:    buildDate(os.Getenv),
			}
			if err := doc.GenManTree(root, header, args[0]); err != nil {
				return fmt.Errorf("writing man pages: %w", err)
			}
			return nil
		},
	})
	c.AddCommand(&cobra.Command{
		Use:   "completion DIR",
		Short: "Write bash (vmegress.bash), zsh (_vmegress) and fish (vmegress.fish) completions into DIR",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			root := cmd.Root()
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return fmt.Errorf("writing completions: %w", err)
			}
			for name, gen := range map[string]func(f *os.File) error{
				"vmegress.bash": func(f *os.File) error { return root.GenBashCompletionV2(f, true) },
				"_vmegress":     func(f *os.File) error { return root.GenZshCompletion(f) },
				"vmegress.fish": func(f *os.File) error { return root.GenFishCompletion(f, true) },
			} {
				f, err := os.Create(filepath.Join(args[0], name))
				if err != nil {
					return fmt.Errorf("writing completions: %w", err)
				}
				err = gen(f)
				if cerr := f.Close(); err == nil {
					err = cerr
				}
				if err != nil {
					return fmt.Errorf("writing %s: %w", name, err)
				}
			}
			return nil
		},
	})
	return c
}

// buildDate is the man pages' date: SOURCE_DATE_EPOCH (reproducible builds)
// when set, else the Unix epoch, so the same tree always gives the same pages.
func buildDate(getenv func(string) string) *time.Time {
	t := time.Unix(0, 0).UTC()
	if s := getenv("SOURCE_DATE_EPOCH"); s != "" {
		if n, err := strconv.ParseInt(s, 10, 64); err == nil {
			t = time.Unix(n, 0).UTC()
		}
	}
	return &t
}
