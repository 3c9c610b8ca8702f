package main

import (
	"context"
	"errors"
	"fmt"
	"github.com/vmegress/vmegress/internal/ctflow"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	sdnotify "github.com/coreos/go-systemd/v22/daemon"
	"github.com/fsnotify/fsnotify"

	mdns "github.com/miekg/dns"
	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/daemon"
	vdns "github.com/vmegress/vmegress/internal/dns"
	"github.com/vmegress/vmegress/internal/engine"
	"github.com/vmegress/vmegress/internal/events"
	"github.com/vmegress/vmegress/internal/firewall"
	"github.com/vmegress/vmegress/internal/hostnet"
	"github.com/vmegress/vmegress/internal/proxy"
	"github.com/vmegress/vmegress/internal/state"
)

func (a *app) store() state.Store { return state.Store{Dir: a.stateDir} }

// hostInterception builds the interception over the real host (current
// netns) with the firewall backend of kind; the other backend, when its
// tools are there, is Stale.
func (a *app) hostInterception(kind string) (engine.Interception, *netlink.Handle, error) {
	fw, err := firewall.NewHost(kind)
	if err != nil {
		return engine.Interception{}, nil, err
	}
	var stale []engine.Firewall
	for _, other := range []string{firewall.KindNFTables, firewall.KindIPTables} {
		if other == kind || (kind == "" && other == firewall.KindNFTables) {
			continue
		}
		if b, err := firewall.NewHost(other); err == nil {
			stale = append(stale, b)
		}
	}
	h, err := netlink.NewHandle()
	if err != nil {
		return engine.Interception{}, nil, fmt.Errorf("opening netlink: %w", err)
	}
	guard := &hostnet.ForwardingGuard{
		StateFile: filepath.Join(a.stateDir, "forwarding.json"),
		Links: func() ([]string, error) {
			links, err := h.LinkList()
			if err != nil {
				return nil, err
			}
			names := make([]string, len(links))
			for i, l := range links {
				names[i] = l.Attrs().Name
			}
			return names, nil
		},
		Forwarding: func() (map[string]string, error) { return hostnet.LinkForwarding(h) },
		AddrLinks:  func() (map[netip.Addr]string, error) { return hostnet.AddrLinks(h) },
	}
	return engine.Interception{Firewall: fw, Stale: stale, Netlink: h, Guard: guard}, h, nil
}

// newEngine builds the engine over the real host and opens it on cfg (with
// install: installing the whole interception). The caller holds the state
// lock; the returned func releases the engine's netlink handle.
func (a *app) newEngine(ctx context.Context, cfg *config.Config, install bool) (*engine.Engine, func(), error) {
	in, h, err := a.hostInterception(cfg.Firewall)
	if err != nil {
		return nil, nil, err
	}
	eng := &engine.Engine{Store: a.store(), Interception: in, Host: engine.NetlinkHost{Handle: h}, Log: a.log}
	// No daemon is running: `up` cuts the kernel-forwarded flows the
	// policy does not allow, and a change to the interception a stopped
	// daemon left cuts those the change refuses.
	var cut lazyCutter
	eng.Flows = &cut
	if err := eng.Open(ctx, cfg, install); err != nil {
		h.Close()
		return nil, nil, err
	}
	return eng, func() { h.Close(); cut.close() }, nil
}

// lazyCutter opens conntrack on its first Revoke: most commands cut
// nothing.
type lazyCutter struct{ t *ctflow.Tracker }

func (c *lazyCutter) Revoke(keep func(ctflow.Flow) bool) (int, error) {
	if c.t == nil {
		t, err := ctflow.Open("")
		if err != nil {
			return 0, err
		}
		c.t = t
	}
	return c.t.Revoke(keep)
}

func (c *lazyCutter) close() {
	if c.t != nil {
		c.t.Close()
	}
}

// apiSocketFor is the API socket: --api-socket, else VMEGRESS_API_SOCKET,
// else the config's api_socket.
func (a *app) apiSocketFor(cfg *config.Config) string {
	if a.apiSocket != "" {
		return a.apiSocket
	}
	if cfg != nil && cfg.APISocket != "" {
		return cfg.APISocket
	}
	return config.DefaultAPISocket
}

func (a *app) runCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "Run the daemon: install interception and serve the data plane",
		Long: `Run installs the host's interception (replacing whatever a previous run left),
serves the builtin data plane, the allowlist resolver and the admin endpoint, and
writes one JSON access-log line per connection and per guest DNS query to stdout
(or the access_log file; SIGUSR1 reopens it). Daemon logs go to stderr.
SIGHUP, or a change of the config file, reloads the policy live; an invalid config
is refused and the running policy stays. On SIGTERM or SIGINT the data plane stops
and interception stays in place, so guests stay fail-closed until 'vmegress down'.
Under systemd (Type=notify) readiness is sent once interception and data plane are up.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			// The daemon is the only writer for its whole life: it holds the
			// state lock until it exits.
			unlock, err := a.store().Lock()
			if err != nil {
				return err
			}
			defer unlock()
			in, h, err := a.hostInterception(cfg.Firewall)
			if err != nil {
				return err
			}
			defer h.Close()
			var access io.Writer = a.stdout
			var logFile *reopenFile
			if cfg.AccessLog != "" {
				if logFile, err = openLog(cfg.AccessLog); err != nil {
					return err
				}
				defer logFile.Close()
				access = logFile
			}
			term, err := a.termination(cfg, os.Getenv("CREDENTIALS_DIRECTORY"))
			if err != nil {
				return err
			}
			// The data plane's "is this the host's own address?" answers,
			// kept while netlink tells of every address and route change.
			hostAddrs := &proxy.HostAddrCache{Checker: proxy.KernelAddrChecker{Handle: h}}
			hub := &events.Hub{}        // the API's /v1/events stream
			cfgCache := &config.Cache{} // reloads parse the file again only when it changed
			d := &daemon.Daemon{
				Config:       cfg,
				Load:         func() (*config.Config, error) { return cfgCache.Load(cfg.Path) },
				Engine:       &engine.Engine{Store: a.store(), Interception: in, Host: engine.NetlinkHost{Handle: h}, Log: a.log.With("component", "engine")},
				APISocket:    a.apiSocketFor(cfg),
				APIGroup:     cfg.APIGroup,
				CheckSSHPort: checkSSHPort,
				Listen:       proxy.ListenTransparent,
				Dial:         proxy.MarkedDialer(cfg.UpstreamMark, net.Dialer{Timeout: proxy.DefaultDialTimeout}),
				DNSUDP:       &mdns.Client{Net: "udp", Timeout: vdns.UpstreamTimeout, Dialer: &net.Dialer{Control: proxy.MarkControl(cfg.UpstreamMark)}},
				DNSTCP:       &mdns.Client{Net: "tcp", Timeout: vdns.UpstreamTimeout, Dialer: &net.Dialer{Control: proxy.MarkControl(cfg.UpstreamMark)}},
				HostAddrs:    hostAddrs,
				Log:          a.log,
				AccessLog:    slog.New(events.Handler{Next: slog.NewJSONHandler(access, nil), Hub: hub}),
				Events:       hub,
				Notify:       func(state string) { sdnotify.SdNotify(false, state) },
				Version:      version,
				StateDir:     a.stateDir,
				AccessWriter: access,
				Termination:  term,
			}
			// Flows the kernel forwards (cidr rules) are logged from conntrack.
			flows, err := ctflow.Open("")
			if err != nil {
				return err
			}
			defer flows.Close()
			flows.OnError = func(err error) { a.log.Warn("following kernel-forwarded flows", "err", err.Error()) }
			d.Flows = flows
			d.Engine.Flows = flows // cuts at the start what the policy does not allow
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()
			lost := func(err error) {
				hostAddrs.SetWatching(false)
				a.log.Warn("following the host's address and route changes (every destination is now looked up in the kernel)", "err", err.Error())
			}
			// Watching is on before the subscriptions are made (nothing asks
			// before d.Run), so a failure told at once turns it off for good.
			hostAddrs.SetWatching(true)
			if err := hostnet.WatchAddrsAndRoutes(ctx, nil, hostAddrs.Changed, lost); err != nil {
				lost(err)
			}
			go a.reloadOnSignalOrChange(ctx, d, cfg.Path, logFile)
			return d.Run(ctx)
		},
	}
}

// reloadOnSignalOrChange reloads d on SIGHUP and when the config file
// changes (watched through its directory, so editors' rename-and-replace
// and ConfigMap-style symlink swaps are seen); SIGUSR1 reopens the access log.
func (a *app) reloadOnSignalOrChange(ctx context.Context, d *daemon.Daemon, path string, logFile *reopenFile) {
	sig := make(chan os.Signal, 4)
	signal.Notify(sig, syscall.SIGHUP, syscall.SIGUSR1)
	defer signal.Stop(sig)
	var events <-chan fsnotify.Event
	w, err := fsnotify.NewWatcher()
	if err == nil {
		defer w.Close()
		if err := w.Add(filepath.Dir(path)); err != nil {
			a.log.Warn("not watching the config file; reload with SIGHUP", "err", err.Error())
		}
		events = w.Events
	}
	// Editors write in several steps: wait for quiet before reloading.
	var debounce <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case s := <-sig:
			if s == syscall.SIGUSR1 {
				if logFile != nil {
					if err := logFile.Reopen(); err != nil {
						a.log.Error("reopening the access log", "err", err.Error())
					}
				}
				continue
			}
			d.Reload(ctx, "SIGHUP")
		case ev := <-events:
			if filepath.Clean(ev.Name) == filepath.Clean(path) || filepath.Base(ev.Name) == "..data" {
				debounce = time.After(100 * time.Millisecond)
			}
		case <-debounce:
			debounce = nil
			d.Reload(ctx, "config changed")
		}
	}
}

func (a *app) upCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "up",
		Short: "Install the host's interception (nftables table or iptables chains, policy routing); idempotent",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			unlock, err := a.store().TryLock()
			if errors.Is(err, state.ErrLocked) {
				fmt.Fprintln(a.stdout, "the daemon is running (it holds the state directory); it installed the interception and keeps it")
				return nil
			}
			if err != nil {
				return err
			}
			defer unlock()
			eng, closeEng, err := a.newEngine(cmd.Context(), cfg, true)
			if err != nil {
				if config.IsInvalid(err) {
					return err
				}
				return usageError{err}
			}
			defer closeEng()
			fmt.Fprintf(a.stdout, "interception installed: %s, ip rule fwmark %#x lookup %d, local 0.0.0.0/0 dev lo table %d\n",
				eng.Interception.Firewall.Describe(), cfg.Mark, cfg.RouteTable, cfg.RouteTable)
			return nil
		},
	}
}

func (a *app) downCmd() *cobra.Command {
	var restoreNAT bool
	c := &cobra.Command{
		Use:   "down",
		Short: "Remove everything 'up' added; idempotent, needs no config",
		Long: `Down removes the nftables table and the iptables chains and ipset (whichever
are there), the policy routing rule and route, and puts
back the forwarding setting of guest interfaces. With --restore-nat (spec 6.8
step 4) every project that net up placed is switched to direct NAT egress
instead (unfiltered; the table then holds only the NAT rules) and the
interception is removed; stop the daemon first.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Down needs no config; with one, its backend goes first.
			kind := firewall.KindNFTables
			if cfg, err := a.loadConfig(); err == nil {
				kind = cfg.Firewall
			}
			in, h, err := a.hostInterception(kind)
			if err != nil {
				return err
			}
			defer h.Close()
			if !restoreNAT {
				if err := in.Remove(cmd.Context()); err != nil {
					return err
				}
				fmt.Fprintln(a.stdout, "interception removed")
				return nil
			}
			cfg, err := a.loadConfig()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), time.Second)
			_, derr := fetchStatus(ctx, "http://"+cfg.Admin.String()+"/status")
			cancel()
			if derr == nil {
				return usagef("the daemon is running and would put interception back: stop it first (systemctl stop vmegress)")
			}
			unlock, err := a.store().TryLock()
			if err != nil {
				return usagef("the state directory is locked (is the daemon running?): %v", err)
			}
			defer unlock()
			h.Close()
			eng, closeEng, err := a.newEngine(cmd.Context(), cfg, false)
			if err != nil {
				return usageError{err}
			}
			defer closeEng()
			switched, err := eng.RestoreNAT(cmd.Context(), func(tap string) error { return hostnet.EnableForwarding("", tap) })
			if err != nil {
				return err
			}
			if err := clearProxiedSockets(cfg.VMCIDR); err != nil {
				fmt.Fprintf(a.stderr, "vmegress: warning: NAT is restored, but guests' new connections may fail for up to a minute: %v\n", err)
			}
			st := struct{ Projects []state.Project }{switched}
			fmt.Fprintf(a.stdout, "interception removed; %d projects switched to direct NAT egress (unfiltered)\n", len(st.Projects))
			return nil
		},
	}
	c.Flags().BoolVar(&restoreNAT, "restore-nat", false, "switch every project to direct NAT egress instead (spec 6.8)")
	return c
}

// clearProxiedSockets removes what the stopped proxy left of guests'
// connections (TIME_WAIT and closing sockets whose local address is the
// server the guest asked for): forwarded SYNs reusing their 4-tuples would
// meet them and be dropped (issue 12, item 12).
func clearProxiedSockets(guests netip.Prefix) error {
	nl, err := netlink.NewHandle(unix.NETLINK_ROUTE, unix.NETLINK_INET_DIAG)
	if err != nil {
		return fmt.Errorf("opening netlink: %w", err)
	}
	defer nl.Close()
	isLocal, err := hostnet.LocalAddrs(nl)
	if err != nil {
		return err
	}
	_, err = hostnet.DestroyProxiedSockets(nl, guests, isLocal)
	return err
}
