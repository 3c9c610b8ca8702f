package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/client"
	"github.com/vmegress/vmegress/internal/daemon"
)

func (a *app) statusCmd() *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "status",
		Short: "Show what is installed and the running daemon's per-project counters",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 5*time.Second)
			defer cancel()
			st, err := client.New(a.apiSocketFor(cfg)).Status(ctx)
			if err != nil {
				// An older daemon, or the API socket elsewhere: the admin endpoint.
				st, err = fetchStatus(ctx, "http://"+cfg.Admin.String()+"/status")
			}
			if err != nil {
				return fmt.Errorf("asking the daemon at %s (is vmegress run running?): %w", cfg.Admin, err)
			}
			if asJSON {
				enc := json.NewEncoder(a.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			printStatus(a.stdout, st)
			return nil
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func fetchStatus(ctx context.Context, url string) (*daemon.Status, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %s", resp.Status)
	}
	var st daemon.Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return nil, fmt.Errorf("decoding status: %w", err)
	}
	return &st, nil
}

func counts(m map[string]uint64) string {
	if len(m) == 0 {
		return "-"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%d", k, m[k]))
	}
	return strings.Join(parts, " ")
}

func printStatus(w io.Writer, st *daemon.Status) {
	fmt.Fprintf(w, "vmegress %s, up since %s, ready=%v\n", st.Version, st.Started.Format(time.RFC3339), st.Ready)
	fmt.Fprintf(w, "config %s (last reload %s", st.Config, st.LastReload.Format(time.RFC3339))
	if st.LastError != "" {
		fmt.Fprintf(w, ", FAILED: %s", st.LastError)
	}
	fmt.Fprintf(w, ")\ndataplane %s, upstream %s, firewall %s, interception installed=%v\n\n", st.Dataplane, st.Upstream, st.Firewall, st.Interception)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PROJECT\tSUBNET\tMODE\tRULES\tACTIVE\tCONNECTIONS\tDNS")
	for _, p := range st.Projects {
		subnet := p.Subnet
		if subnet == "" {
			subnet = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\n", p.Name, subnet, p.Mode, p.Rules, p.Active, counts(p.Connections), counts(p.DNSQueries))
	}
	tw.Flush()
}
