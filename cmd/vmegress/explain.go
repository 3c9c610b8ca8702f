package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/daemon"
	vdns "github.com/vmegress/vmegress/internal/dns"
	"github.com/vmegress/vmegress/internal/policy"
)

// explainJSON is one verdict of `policy explain --json`, one object a line.
type explainJSON struct {
	Project    string `json:"project"`
	Connection string `json:"connection"`
	// As is what the client was taken to send (tls, http, raw, none; "any"
	// when the verdict is made before anything is read).
	As string `json:"as"`
	// Inspect is what the data plane reads (none, tls, http, tls-or-http).
	Inspect string `json:"inspect"`
	Verdict string `json:"verdict"`
	Rule    string `json:"rule,omitempty"`
	Reason  string `json:"reason,omitempty"`
	DNS     string `json:"dns,omitempty"`
}

func (a *app) explainCmd() *cobra.Command {
	var asFlag, addrFlag string
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
addresses only). For a name it also shows what the resolver would answer the
guest, asking the upstream resolvers for real.`,
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
			q := policy.Query{Project: pr.Name, Name: host}
			ip, hostIsAddr := netip.ParseAddr(host)
			if hostIsAddr == nil {
				q.Name = ""
				if addrFlag != "" {
					return usagef("--addr is for a HOST that is a name; %s is already an address", host)
				}
				q.Dst = netip.AddrPortFrom(ip.Unmap(), port)
			} else {
				var addr netip.Addr
				if addrFlag != "" {
					if addr, err = netip.ParseAddr(addrFlag); err != nil {
						return usagef("--addr %q is not an IP address", addrFlag)
					}
				}
				q.Dst = netip.AddrPortFrom(addr.Unmap(), port)
			}
			var kinds []policy.Bytes
			if asFlag != "" {
				b, err := policy.ParseBytes(asFlag)
				if err != nil {
					return usagef("--as: %v", err)
				}
				kinds = []policy.Bytes{b}
			} else {
				switch first := pol.Explain(q); first.Inspect {
				case policy.InspectNone:
					kinds = []policy.Bytes{""} // decided before any byte is read
				case policy.InspectTLS:
					kinds = []policy.Bytes{policy.BytesTLS}
				case policy.InspectHTTP:
					kinds = []policy.Bytes{policy.BytesHTTP}
				case policy.InspectEither:
					kinds = []policy.Bytes{policy.BytesTLS, policy.BytesHTTP}
				}
			}
			conn := net.JoinHostPort(host, strconv.Itoa(int(port)))
			var exs []policy.Explanation
			for _, k := range kinds {
				q.Bytes = k
				exs = append(exs, pol.Explain(q))
			}
			dns := ""
			if q.Name != "" {
				dns = a.explainDNS(cmd.Context(), cfg, pol, pr, q)
			}
			if asJSON {
				enc := json.NewEncoder(a.stdout)
				for i, ex := range exs {
					as := string(kinds[i])
					if as == "" {
						as = "any"
					}
					if err := enc.Encode(explainJSON{Project: pr.Name, Connection: conn, As: as, Inspect: ex.Inspect.String(),
						Verdict: string(ex.Verdict), Rule: ex.Rule, Reason: ex.Reason, DNS: dns}); err != nil {
						return fmt.Errorf("writing the explanation: %w", err)
					}
				}
				return nil
			}
			out := a.stdout
			fmt.Fprintf(out, "project: %s\nconnection: %s\n", pr.Name, conn)
			if hostIsAddr != nil && !q.Dst.Addr().IsValid() {
				fmt.Fprintln(out, "address: not given (--addr); cidr rules, which match addresses, are not considered")
			}
			if hostIsAddr == nil && asFlag == "" && exs[0].Inspect != policy.InspectNone {
				fmt.Fprintf(out, "verdict: depends on the name the client sends (TLS SNI or HTTP Host); no cidr rule names %s\nwithout a name:\n", ip)
			}
			for i, ex := range exs {
				printExplanation(out, kinds[i], q, ex)
			}
			if dns != "" {
				fmt.Fprintf(out, "dns: %s\n", dns)
			}
			return nil
		},
	}
	c.Flags().StringVar(&asFlag, "as", "", "what the client sends first: tls, http, raw or none (default: by the port's rules)")
	c.Flags().StringVar(&addrFlag, "addr", "", "the destination address, when HOST is a name")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON, one object per verdict")
	return c
}

// printExplanation writes one verdict in the text form (the lines scripts
// and tests grep: as, verdict, rule, reason, inspection).
func printExplanation(out io.Writer, b policy.Bytes, q policy.Query, ex policy.Explanation) {
	switch b {
	case policy.BytesTLS:
		if q.Name == "" {
			fmt.Fprintln(out, "as: TLS without a server name (sni rules)")
		} else {
			fmt.Fprintln(out, "as: TLS (sni rules)")
		}
	case policy.BytesHTTP:
		fmt.Fprintln(out, "as: plain HTTP (http rules)")
	case policy.BytesRaw:
		fmt.Fprintln(out, "as: other bytes (neither a TLS ClientHello nor an HTTP request)")
	case policy.BytesNone:
		fmt.Fprintln(out, "as: nothing (the server speaks first)")
	}
	fmt.Fprintf(out, "verdict: %s\n", ex.Verdict)
	if ex.Rule != "" {
		fmt.Fprintf(out, "rule: %s\n", ex.Rule)
	}
	if ex.Reason != "" {
		fmt.Fprintf(out, "reason: %s\n", ex.Reason)
	}
	switch {
	case ex.Inspect == policy.InspectNone && ex.Rule != "":
		fmt.Fprintln(out, "inspection: none (cidr rule)")
	case ex.Inspect == policy.InspectNone:
		fmt.Fprintln(out, "inspection: none (decided on the addresses, before any byte is read)")
	default:
		fmt.Fprintf(out, "inspection: %s\n", ex.Inspect)
	}
}

// explainDNS says what the resolver would answer the guest for q's name,
// and whether an answer falls under a cidr rule (the data plane then
// decides that address without reading the name).
func (a *app) explainDNS(ctx context.Context, cfg *config.Config, pol *policy.Policy, pr *policy.Project, q policy.Query) string {
	name := vdns.Name(q.Name)
	if !pr.AllowsName(name) {
		return "NXDOMAIN, decided locally (the query is never sent upstream)"
	}
	ups, err := daemon.Upstreams(cfg, "")
	if err != nil {
		return fmt.Sprintf("answered by forwarding upstream, but %v", err)
	}
	res := &vdns.Resolver{Upstreams: ups, GuestRange: cfg.VMCIDR, Log: a.log}
	res.SetPolicy(pol)
	ctx, cancel := context.WithTimeout(ctx, 2*vdns.UpstreamTimeout)
	defer cancel()
	addrs, err := res.Lookup(ctx, pr, name)
	if err != nil {
		return fmt.Sprintf("answered by forwarding to %s: %v", strings.Join(ups, ", "), err)
	}
	var s, notes []string
	for _, ad := range addrs {
		s = append(s, ad.String())
		if rule, ok := pr.CIDRAllows(ad, q.Dst.Port()); ok && !q.Dst.Addr().IsValid() {
			notes = append(notes, fmt.Sprintf("%s is allowed on port %d by %s without inspection", ad, q.Dst.Port(), rule))
		}
	}
	msg := fmt.Sprintf("answered by forwarding to %s: %s (after removing always-denied addresses)", strings.Join(ups, ", "), strings.Join(s, " "))
	if len(notes) > 0 {
		msg += "; note: " + strings.Join(notes, "; ")
	}
	return msg
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
