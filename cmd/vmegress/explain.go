package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/client"
	"github.com/vmegress/vmegress/internal/api"
	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/daemon"
	vdns "github.com/vmegress/vmegress/internal/dns"
	"github.com/vmegress/vmegress/internal/engine"
	"github.com/vmegress/vmegress/internal/placement"
	"github.com/vmegress/vmegress/internal/policy"
)

func (a *app) explainCmd() *cobra.Command {
	var asFlag, addrFlag, methodFlag, pathFlag string
	var asJSON bool
	c := &cobra.Command{
		Use:   "explain PROJECT HOST[:PORT]",
		Short: "Show the verdict for a connection, the rule that decides it, and what DNS would answer",
		Long: `Explain decides HOST[:PORT] (port 443 by default) for PROJECT with the same
compiled policy and the same steps as the data plane: the addresses first (cidr
rules, ports without rules), then the name the client sends. --as says what the
client sends first: tls (a ClientHello; SNI is HOST unless HOST is an address),
http (a request with Host HOST), raw (other bytes) or none (the server speaks
first). Without --as the port's rules choose; on a port with both sni and http
rules both verdicts are shown (the data plane tells TLS by its first byte).
--addr gives the destination address when HOST is a name (cidr rules match
addresses only). Where a connection's requests are decided one by one (https
rules; http rules with methods, paths or inject), --method and --path give the
request (default GET /). For a name it also shows what the resolver would answer the
guest, asking the upstream resolvers for real. With the daemon running, its
policy answers (projects placed through the API included).`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			host, port, err := splitHostPort(args[1])
			if err != nil {
				return err
			}
			req := client.ExplainRequest{Project: args[0], Host: host, Port: port, As: asFlag, Addr: addrFlag, Method: methodFlag, Path: pathFlag}
			exs, err := client.New(a.apiSocketFor(cfg)).Explain(cmd.Context(), req)
			if client.IsUnavailable(err) {
				exs, err = a.explainLocally(cmd.Context(), cfg, req)
			} else if err != nil {
				err = apiError(err)
			}
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(a.stdout)
				for _, ex := range exs {
					if err := enc.Encode(ex); err != nil {
						return fmt.Errorf("writing the explanation: %w", err)
					}
				}
				return nil
			}
			out := a.stdout
			fmt.Fprintf(out, "project: %s\nconnection: %s\n", exs[0].Project, exs[0].Connection)
			if exs[0].NoAddr {
				fmt.Fprintln(out, "address: not given (--addr); cidr rules, which match addresses, are not considered")
			}
			if exs[0].NoName {
				fmt.Fprintf(out, "verdict: depends on the name the client sends (TLS SNI or HTTP Host); no cidr rule names %s\nwithout a name:\n", host)
			}
			_, hostErr := netip.ParseAddr(host)
			for _, ex := range exs {
				printExplanation(out, ex, hostErr == nil)
			}
			if exs[0].DNS != "" {
				fmt.Fprintf(out, "dns: %s\n", exs[0].DNS)
			}
			return nil
		},
	}
	c.Flags().StringVar(&asFlag, "as", "", "what the client sends first: tls, http, raw or none (default: by the port's rules)")
	c.Flags().StringVar(&addrFlag, "addr", "", "the destination address, when HOST is a name")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON, one object per verdict")
	c.Flags().StringVar(&methodFlag, "method", "", "the request's method, where requests are decided one by one (https rules, http rules with methods/paths/inject; default GET)")
	c.Flags().StringVar(&pathFlag, "path", "", "the request's path there (default /)")
	return c
}

// explainLocally answers with an engine of this process (no daemon runs):
// the config file's projects and the API projects kept in the state directory.
func (a *app) explainLocally(ctx context.Context, cfg *config.Config, req client.ExplainRequest) ([]client.Explanation, error) {
	eng := &engine.Engine{Store: a.store(), Log: a.log}
	if err := eng.Open(ctx, cfg, false); err != nil {
		return nil, err
	}
	pol := eng.Snapshot().Policy
	if pol.Project(req.Project) == nil {
		return nil, usagef("no project %q in %s or placed through the API", req.Project, a.configPath)
	}
	dns := func(ctx context.Context, pr *policy.Project, name string, port uint16, addrKnown bool) string {
		ups, err := daemon.Upstreams(cfg, "")
		if err != nil {
			return fmt.Sprintf("answered by forwarding upstream, but %v", err)
		}
		res := &vdns.Resolver{Upstreams: ups, GuestRange: cfg.VMCIDR, Log: a.log}
		res.SetPolicy(pol)
		return api.ResolverDNS(res.Lookup, ups)(ctx, pr, name, port, addrKnown)
	}
	exs, err := api.Explain(ctx, pol, req, dns, nil) // no daemon: nothing was handed out
	if placement.IsInvalid(err) {
		return nil, usageError{err}
	}
	return exs, err
}

// printExplanation writes one verdict in the text form (the lines scripts
// and tests grep: as, verdict, rule, reason, inspection).
func printExplanation(out io.Writer, ex client.Explanation, hostIsAddr bool) {
	switch ex.As {
	case "tls":
		if hostIsAddr {
			fmt.Fprintln(out, "as: TLS without a server name (sni rules)")
		} else {
			fmt.Fprintln(out, "as: TLS (sni rules)")
		}
	case "http":
		fmt.Fprintln(out, "as: plain HTTP (http rules)")
	case "raw":
		fmt.Fprintln(out, "as: other bytes (neither a TLS ClientHello nor an HTTP request)")
	case "none":
		fmt.Fprintln(out, "as: nothing (the server speaks first)")
	}
	if ex.Request != "" {
		fmt.Fprintf(out, "request: %s (TLS terminated or plain HTTP read request by request)\n", ex.Request)
	}
	fmt.Fprintf(out, "verdict: %s\n", ex.Verdict)
	if ex.Rule != "" {
		fmt.Fprintf(out, "rule: %s\n", ex.Rule)
	}
	if ex.Reason != "" {
		fmt.Fprintf(out, "reason: %s\n", ex.Reason)
	}
	switch {
	case ex.Inspect == "none" && ex.Rule != "":
		fmt.Fprintln(out, "inspection: none (cidr rule)")
	case ex.Inspect == "none":
		fmt.Fprintln(out, "inspection: none (decided on the addresses, before any byte is read)")
	default:
		fmt.Fprintf(out, "inspection: %s\n", ex.Inspect)
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
