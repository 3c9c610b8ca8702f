// Package daemon wires vmegress's pieces together: it installs the host's
// interception, runs the data plane, and keeps guests fail-closed when it
// stops (interception stays until `vmegress down`).
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/dest"
	vdns "github.com/vmegress/vmegress/internal/dns"
	"github.com/vmegress/vmegress/internal/firewall"
	"github.com/vmegress/vmegress/internal/hostnet"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/proxy"
)

// Interception is the host side of vmegress: packet filter plus policy routing.
type Interception struct {
	Firewall firewall.Backend
	Netlink  hostnet.Netlink
}

// Install makes the host's interception match cfg. It replaces whatever a
// previous (possibly crashed) run left, in one atomic ruleset transaction.
// The ruleset goes first: with it in place and no routing, guest traffic is
// dropped, never forwarded.
func (in Interception) Install(ctx context.Context, cfg *config.Config) error {
	if err := in.Firewall.Apply(ctx, firewall.FromConfig(cfg)); err != nil {
		return fmt.Errorf("installing interception: %w", err)
	}
	pr := hostnet.PolicyRouting{Mark: cfg.Mark, Table: cfg.RouteTable}
	if err := pr.Ensure(in.Netlink); err != nil {
		return fmt.Errorf("installing policy routing: %w", err)
	}
	return nil
}

// Remove takes out everything Install added. Routing goes first, so guests
// never see a moment with routing but no ruleset.
func (in Interception) Remove(ctx context.Context) error {
	var errs []error
	if err := (hostnet.PolicyRouting{}).Remove(in.Netlink); err != nil {
		errs = append(errs, fmt.Errorf("removing policy routing: %w", err))
	}
	if err := in.Firewall.Cleanup(ctx); err != nil {
		errs = append(errs, fmt.Errorf("removing interception: %w", err))
	}
	return errors.Join(errs...)
}

// Daemon is `vmegress run`.
type Daemon struct {
	Config       *config.Config
	Interception Interception
	// Listen opens the data plane's transparent listener.
	Listen func(ctx context.Context, addr string) (net.Listener, error)
	// ListenPacket opens the resolver's UDP socket (zero: net.ListenPacket).
	ListenPacket func(ctx context.Context, network, addr string) (net.PacketConn, error)
	// Dial dials upstream with the upstream mark.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// DNSUDP and DNSTCP exchange upstream DNS queries with the upstream mark.
	DNSUDP, DNSTCP vdns.Exchanger
	// ResolvConf is read for upstream resolvers when the config names none
	// (zero: /etc/resolv.conf).
	ResolvConf string
	HostAddrs  proxy.AddrChecker
	Log        *slog.Logger
	AccessLog  *slog.Logger
	// Ready is called once interception and the data plane are up.
	Ready func()
}

// Upstreams returns the resolvers guests' allowed queries go to: the config's
// dns.upstreams, else the nameservers of resolvConf (zero: /etc/resolv.conf).
func Upstreams(cfg *config.Config, resolvConf string) ([]string, error) {
	if len(cfg.DNSUpstreams) > 0 {
		var out []string
		for _, u := range cfg.DNSUpstreams {
			out = append(out, u.String())
		}
		return out, nil
	}
	if resolvConf == "" {
		resolvConf = "/etc/resolv.conf"
	}
	return vdns.UpstreamsFromResolvConf(resolvConf)
}

// Run installs interception, serves until ctx ends, then stops the data plane
// and leaves interception in place (guests stay fail-closed).
func (d *Daemon) Run(ctx context.Context) error {
	cfg := d.Config
	pol, err := policy.Compile(cfg)
	if err != nil {
		return err
	}
	upstreams, err := Upstreams(cfg, d.ResolvConf)
	if err != nil {
		return err
	}
	if err := d.Interception.Install(ctx, cfg); err != nil {
		return err
	}
	addr := net.JoinHostPort("0.0.0.0", strconv.Itoa(int(cfg.TProxyPort)))
	ln, err := d.Listen(ctx, addr)
	if err != nil {
		return fmt.Errorf("starting the builtin data plane: %w", err)
	}
	answers := &dest.Answers{}
	res := &vdns.Resolver{
		Upstreams:  upstreams,
		UDP:        d.DNSUDP,
		TCP:        d.DNSTCP,
		Answers:    answers,
		GuestRange: cfg.VMCIDR,
		Log:        d.Log.With("component", "dns"),
	}
	res.SetPolicy(pol)
	dnsAddr := net.JoinHostPort("0.0.0.0", strconv.Itoa(int(cfg.DNSPort)))
	stopDNS, err := d.serveDNS(ctx, dnsAddr, res)
	if err != nil {
		ln.Close()
		return err
	}
	defer stopDNS()
	px := &proxy.Proxy{
		GuestRange:  cfg.VMCIDR,
		Dial:        d.Dial,
		HostAddrs:   d.HostAddrs,
		Answers:     answers,
		Resolver:    res,
		OriginalDst: cfg.Upstream == "original_dst",
		Log:         d.Log,
		AccessLog:   d.AccessLog,
	}
	px.SetPolicy(pol)
	var names []string
	for _, p := range pol.Projects() {
		names = append(names, p.Name+"="+p.Subnet.String())
	}
	d.Log.Info("vmegress ready", "dataplane", "builtin", "listen", addr, "dns", dnsAddr,
		"dns_upstreams", upstreams, "projects", names, "upstream", cfg.Upstream)
	if cfg.Upstream == "original_dst" {
		d.Log.Warn("upstream: original_dst dials the guest's chosen address on the strength of its SNI or Host alone: a guest can reach any address by naming an allowed host (SNI spoofing)")
	}
	if d.Ready != nil {
		d.Ready()
	}
	err = px.Serve(ctx, ln)
	d.Log.Info("data plane stopped; interception stays in place (guests fail closed) until `vmegress down`")
	return err
}

// serveDNS starts the resolver on UDP and TCP addr; the returned func stops it.
func (d *Daemon) serveDNS(ctx context.Context, addr string, h mdns.Handler) (func(), error) {
	listenPacket := d.ListenPacket
	if listenPacket == nil {
		listenPacket = func(ctx context.Context, network, addr string) (net.PacketConn, error) {
			var lc net.ListenConfig
			return lc.ListenPacket(ctx, network, addr)
		}
	}
	pc, err := listenPacket(ctx, "udp4", addr)
	if err != nil {
		return nil, fmt.Errorf("starting the resolver on udp %s: %w", addr, err)
	}
	var lc net.ListenConfig
	tl, err := lc.Listen(ctx, "tcp4", addr)
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("starting the resolver on tcp %s: %w", addr, err)
	}
	udp := &mdns.Server{PacketConn: pc, Handler: h}
	tcp := &mdns.Server{Listener: tl, Handler: h, ReadTimeout: 5 * time.Second}
	for _, s := range []*mdns.Server{udp, tcp} {
		go func() {
			if err := s.ActivateAndServe(); err != nil && ctx.Err() == nil {
				d.Log.Error("resolver stopped", "err", err)
			}
		}()
	}
	return func() { udp.Shutdown(); tcp.Shutdown() }, nil
}
