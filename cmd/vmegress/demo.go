package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/internal/world"
)

const demoConfig = `# vmegress demo: project alpha may reach GitHub over TLS, nothing else.
vm_cidr: 172.31.0.0/16
guest_interfaces: ["tap-*"]
tproxy_port: 15001
projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: github.com
      - sni: "*.github.com"
`

func (a *app) demoCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "demo",
		Short: "Show the spec's verification in a throwaway world of network namespaces",
		Long: `Demo builds uniquely named network namespaces (a host, a guest behind a TAP-like
veth, a fake internet with TLS servers for github.com, www.github.com and
example.com), runs the daemon on the builtin data plane in the host namespace,
runs the spec's two checks from the guest (curl https://www.github.com must
succeed, curl https://example.com must be refused), prints the access log and
removes everything, also on Ctrl-C. Needs root, iproute2, nftables and curl.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return usagef("demo needs root: it creates network namespaces (run it as root)")
			}
			self, err := os.Executable()
			if err != nil {
				return fmt.Errorf("finding the vmegress binary: %w", err)
			}
			return a.demo(cmd.Context(), self)
		},
	}
}

func (a *app) demo(ctx context.Context, self string) error {
	out := a.stdout
	fmt.Fprintln(out, "== building a throwaway world in network namespaces")
	w, err := world.New(ctx, world.Options{Prefix: "vmdemo", Guests: []world.GuestSpec{{Project: "alpha", Subnet: netip.MustParsePrefix("172.31.0.0/30")}}})
	if err != nil {
		return err
	}
	defer func() {
		fmt.Fprintln(out, "== cleaning up: vmegress down, namespaces removed")
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		w.Vmegress(cctx, self, "down")
		w.Close()
	}()
	g := w.Guest("alpha")
	fmt.Fprintf(out, "   host %s, guest %s (%s behind %s), fake internet %s\n", w.Host, g.NS, g.GuestIP, g.TAP, w.Inet)
	fmt.Fprintf(out, "   github.com %s, www.github.com %s, example.com %s\n", world.GitHubIP, world.WWWGitHubIP, world.ExampleIP)
	cfgPath, err := w.WriteConfig("config.yaml", demoConfig)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "== config (%s)\n%s", cfgPath, indent(demoConfig))
	fmt.Fprintln(out, "== vmegress run (builtin data plane) in the host namespace")
	d, err := w.StartDaemon(ctx, self, cfgPath)
	if err != nil {
		return err
	}
	ok := true
	check := func(url string, wantAllowed bool, extra ...string) {
		fmt.Fprintf(out, "== from the guest: curl %s%s\n", strings.Join(append(extra, ""), " "), url)
		args := append([]string{"curl", "-sS", "--max-time", "10", "--cacert", w.CAFile}, extra...)
		body, cerr := world.Output(ctx, world.NS(g.NS, append(args, url)...)...)
		allowed := cerr == nil
		switch {
		case allowed:
			fmt.Fprintf(out, "   allowed: %s", body)
		default:
			fmt.Fprintf(out, "   refused: %s\n", curlError(cerr.Error()))
		}
		if allowed == wantAllowed {
			fmt.Fprintln(out, "   as expected")
		} else {
			fmt.Fprintln(out, "   NOT as expected")
			ok = false
		}
	}
	fmt.Fprintf(out, "   (the guest's resolv.conf says nameserver %s; vmegress answers DNS to any address)\n", world.GuestNameserver)
	check("https://www.github.com", true)
	check("https://example.com", false)
	fmt.Fprintln(out, "   (example.com got NXDOMAIN from vmegress; the name never left the host. With its address known anyway:)")
	check("https://example.com", false, "--resolve", "example.com:443:"+world.ExampleIP.String())
	fmt.Fprintln(out, "   (SNI spoofing: an allowed name aimed at the attacker's address reaches the real github.com, never the attacker)")
	check("https://github.com", true, "--resolve", "github.com:443:"+world.AttackerIP.String())
	if ctx.Err() != nil {
		return ctx.Err()
	}
	// Let the last connection's line (written at close) arrive.
	d.WaitAccessLog(2*time.Second, func(m map[string]any) bool {
		return m["sni"] == "github.com" && m["dst"] == world.AttackerIP.String()+":443"
	})
	fmt.Fprintln(out, "== access log (one JSON line per connection)")
	fmt.Fprint(out, indent(d.RawAccessLog()))
	d.Stop(5 * time.Second)
	if !ok {
		return errors.New("demo: the spec's verification did not hold")
	}
	if h := w.Log.Hits(); len(h) > 0 {
		for _, x := range h {
			if strings.HasPrefix(x.Server, "attacker") || x.Server == "dns:example.com" {
				return fmt.Errorf("demo: the fake internet saw %s from %s", x.Server, x.Remote)
			}
		}
	}
	fmt.Fprintln(out, "== PASS: www.github.com allowed, example.com refused (spec 6.10); nothing reached the attacker")
	return nil
}

func indent(s string) string {
	var b strings.Builder
	for _, l := range strings.SplitAfter(s, "\n") {
		if l != "" {
			b.WriteString("   " + l)
		}
	}
	return b.String()
}

// curlError keeps curl's own message of a failed run's error.
func curlError(s string) string {
	if i := strings.LastIndex(s, "curl: ("); i >= 0 {
		return strings.TrimSpace(s[i:])
	}
	return s
}
