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

	"github.com/vmegress/vmegress/internal/config"
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
	// Dial dials upstream with the upstream mark.
	Dial      func(ctx context.Context, network, addr string) (net.Conn, error)
	HostAddrs proxy.AddrChecker
	Log       *slog.Logger
	AccessLog *slog.Logger
	// Ready is called once interception and the data plane are up.
	Ready func()
}

// Run installs interception, serves until ctx ends, then stops the data plane
// and leaves interception in place (guests stay fail-closed).
func (d *Daemon) Run(ctx context.Context) error {
	cfg := d.Config
	pol, err := policy.Compile(cfg)
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
	px := &proxy.Proxy{
		GuestRange: cfg.VMCIDR,
		Dial:       d.Dial,
		HostAddrs:  d.HostAddrs,
		Log:        d.Log,
		AccessLog:  d.AccessLog,
	}
	px.SetPolicy(pol)
	var names []string
	for _, p := range pol.Projects() {
		names = append(names, p.Name+"="+p.Subnet.String())
	}
	d.Log.Info("vmegress ready", "dataplane", "builtin", "listen", addr, "projects", names,
		"upstream", cfg.Upstream)
	if cfg.Upstream == "original_dst" {
		d.Log.Warn("upstream: original_dst dials the guest's chosen address on the strength of its SNI alone")
	}
	if d.Ready != nil {
		d.Ready()
	}
	err = px.Serve(ctx, ln)
	d.Log.Info("data plane stopped; interception stays in place (guests fail closed) until `vmegress down`")
	return err
}
