// Package daemon wires vmegress's pieces together: it installs the host's
// interception, runs the data plane, the resolver and the admin endpoint,
// reloads policy live, repairs drift, and keeps guests fail-closed when it
// stops (interception stays until `vmegress down`).
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/dest"
	vdns "github.com/vmegress/vmegress/internal/dns"
	"github.com/vmegress/vmegress/internal/envoy"
	"github.com/vmegress/vmegress/internal/firewall"
	"github.com/vmegress/vmegress/internal/hostnet"
	"github.com/vmegress/vmegress/internal/metrics"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/proxy"
	"github.com/vmegress/vmegress/internal/state"
)

// Firewall is the backend the daemon drives: apply, clean up, and read back.
type Firewall = firewall.Backend

// Interception is the host side of vmegress: packet filter plus policy routing.
type Interception struct {
	Firewall Firewall
	// Stale are the other backends available on the host: Install removes
	// what they left (a switch of the firewall key), Remove cleans them too.
	Stale   []Firewall
	Netlink hostnet.Netlink
	// Guard turns forwarding off on guest interfaces (may be nil). Its
	// Patterns are set from the config on Install.
	Guard *hostnet.ForwardingGuard
}

func (in Interception) guard(cfg *config.Config, st *state.State) error {
	if in.Guard == nil {
		return nil
	}
	in.Guard.Patterns = cfg.GuestInterfaces
	// NAT egress and inbound SSH need the kernel to route what the TAP sends.
	in.Guard.Exclude = nil
	if st != nil {
		for _, p := range st.Projects {
			if p.Egress == state.EgressNAT || p.SSHPort != 0 {
				in.Guard.Exclude = append(in.Guard.Exclude, p.TAP)
			}
		}
	}
	if _, err := in.Guard.Apply(); err != nil {
		return fmt.Errorf("turning forwarding off on guest interfaces: %w", err)
	}
	return nil
}

// Install makes the host's interception match cfg. It replaces whatever a
// previous (possibly crashed) run left, in one atomic ruleset transaction.
// The ruleset goes first: with it in place and no routing, guest traffic is
// dropped, never forwarded.
func (in Interception) Install(ctx context.Context, cfg *config.Config, st *state.State) error {
	if err := in.Firewall.Apply(ctx, firewall.Desired(cfg, st)); err != nil {
		return fmt.Errorf("installing interception: %w", err)
	}
	for _, old := range in.Stale {
		if err := old.Cleanup(ctx); err != nil {
			return fmt.Errorf("removing the rules of %s: %w", old.Describe(), err)
		}
	}
	if err := in.guard(cfg, st); err != nil {
		return err
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
	for _, fw := range append([]Firewall{in.Firewall}, in.Stale...) {
		if err := fw.Cleanup(ctx); err != nil {
			errs = append(errs, fmt.Errorf("removing interception (%s): %w", fw.Describe(), err))
		}
	}
	if in.Guard != nil {
		if err := in.Guard.Restore(); err != nil {
			errs = append(errs, fmt.Errorf("restoring forwarding on guest interfaces: %w", err))
		}
	}
	return errors.Join(errs...)
}

// DefaultDriftInterval is how often the daemon checks that the ruleset and
// routing are still what it installed.
const DefaultDriftInterval = time.Second

// Daemon is `vmegress run`. Set the fields, then call Run.
type Daemon struct {
	Config       *config.Config
	Interception Interception
	// Load reads the config again on reload (zero: config.Load of Config.Path).
	Load func() (*config.Config, error)
	// State reads the projects `net up` placed (zero: none).
	State func() (*state.State, error)
	// LockState takes the lock `net up/down` hold while they change the
	// state and the host (zero: none). The daemon holds it from reading the
	// state to installing it, so it never installs a state older than what
	// a finished `net up` put on the host.
	LockState func() (unlock func(), err error)
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
	// Registry receives the metrics (zero: a private registry).
	Registry *prometheus.Registry
	// DriftInterval (zero: DefaultDriftInterval).
	DriftInterval time.Duration
	// Notify is told "READY=1", "RELOADING=1", "STOPPING=1" (systemd; may be nil).
	Notify func(state string)
	// Version is reported by /status.
	Version string
	// StateDir holds runtime files (Envoy's bootstrap and xDS socket).
	StateDir string
	// AccessWriter receives Envoy's JSON access-log lines as they are.
	AccessWriter io.Writer

	mu        sync.Mutex     // guards the fields below and serialises reloads
	cfg       *config.Config // effective: config merged with state
	st        *state.State
	pol       *policy.Policy
	applied   string // ruleset snapshot after the last apply
	started   time.Time
	lastLoad  time.Time
	lastError string
	ready     bool

	metrics  *metrics.Metrics
	proxy    *proxy.Proxy
	resolver *vdns.Resolver
	xds      *envoy.Server
	envoyOpt envoy.Options
}

// Upstreams returns the resolvers guests' allowed queries go to: the config's
// dns.upstreams, else the host's (vdns.HostUpstreams: the nameservers of
// resolvConf, zero: /etc/resolv.conf, or the servers behind systemd-resolved's
// stub).
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
	return vdns.HostUpstreams(resolvConf, "")
}

func (d *Daemon) notify(state string) {
	if d.Notify != nil {
		d.Notify(state)
	}
}

// lockState takes the state lock (see LockState) and returns its release.
// Always taken after d.mu.
func (d *Daemon) lockState() func() {
	if d.LockState == nil {
		return func() {}
	}
	unlock, err := d.LockState()
	if err != nil {
		d.Log.Warn("taking the state lock; going on without it", "err", err.Error())
		return func() {}
	}
	return unlock
}

func (d *Daemon) loadState() (*state.State, error) {
	if d.State == nil {
		return &state.State{Projects: map[string]state.Project{}}, nil
	}
	return d.State()
}

// install applies the interception for cfg and st and remembers the
// resulting ruleset.
func (d *Daemon) install(ctx context.Context, cfg *config.Config, st *state.State) error {
	if err := d.Interception.Install(ctx, cfg, st); err != nil {
		return err
	}
	snap, err := d.Interception.Firewall.Snapshot(ctx)
	if err != nil {
		return err
	}
	d.applied = snap
	return nil
}

// Run installs interception, serves until ctx ends, then stops the data plane
// and leaves interception in place (guests stay fail-closed).
func (d *Daemon) Run(ctx context.Context) error {
	unlock := d.lockState()
	defer func() { unlock() }()
	st, err := d.loadState()
	if err != nil {
		return err
	}
	cfg, err := Effective(d.Config, st)
	if err != nil {
		return err
	}
	if d.Registry == nil {
		d.Registry = prometheus.NewRegistry()
	}
	d.metrics = metrics.New(d.Registry)
	d.Registry.MustRegister(metrics.NewRulesetCollector(func() (map[string]uint64, error) {
		return d.Interception.Firewall.Counters(context.Background())
	}))
	pol, err := policy.Compile(cfg)
	if err != nil {
		return err
	}
	upstreams, err := Upstreams(cfg, d.ResolvConf)
	if err != nil {
		return err
	}
	d.mu.Lock()
	d.cfg, d.st, d.pol, d.started, d.lastLoad = cfg, st, pol, time.Now(), time.Now()
	err = d.install(ctx, cfg, st)
	// The other backend's leftovers are gone now; later installs (reloads,
	// drift repairs) need not look again.
	d.Interception.Stale = nil
	d.mu.Unlock()
	unlock()
	unlock = func() {}
	if err != nil {
		return err
	}
	answers := &dest.Answers{}
	d.resolver = &vdns.Resolver{
		Upstreams:  upstreams,
		UDP:        d.DNSUDP,
		TCP:        d.DNSTCP,
		Answers:    answers,
		GuestRange: cfg.VMCIDR,
		Rate:       rate.Limit(cfg.DNSRateLimit),
		Burst:      2 * cfg.DNSRateLimit,
		Log:        d.Log.With("component", "dns"),
		AccessLog:  d.AccessLog,
		Metrics:    d.metrics,
	}
	d.resolver.SetPolicy(pol)
	dnsAddr := net.JoinHostPort("0.0.0.0", strconv.Itoa(int(cfg.DNSPort)))
	stopDNS, err := d.serveDNS(ctx, dnsAddr, d.resolver)
	if err != nil {
		return err
	}
	defer stopDNS()
	stopAdmin, err := d.serveAdmin(ctx, cfg.Admin.String())
	if err != nil {
		return err
	}
	defer stopAdmin()
	addr := net.JoinHostPort("0.0.0.0", strconv.Itoa(int(cfg.TProxyPort)))
	var serve func(context.Context) error
	if cfg.Dataplane == "envoy" {
		if serve, err = d.startEnvoy(ctx, cfg, upstreams); err != nil {
			return err
		}
	} else {
		if serve, err = d.startProxy(ctx, cfg, addr, answers, pol); err != nil {
			return err
		}
	}
	var names []string
	for _, p := range pol.Projects() {
		names = append(names, p.Name+"="+p.Subnet.String())
	}
	d.Log.Info("vmegress ready", "dataplane", cfg.Dataplane, "listen", addr, "dns", dnsAddr, "admin", cfg.Admin.String(),
		"dns_upstreams", upstreams, "projects", names, "upstream", cfg.Upstream)
	if cfg.Upstream == "original_dst" {
		d.Log.Warn("upstream: original_dst dials the guest's chosen address on the strength of its SNI or Host alone: a guest can reach any address by naming an allowed host (SNI spoofing)")
	}
	d.mu.Lock()
	d.ready = true
	d.mu.Unlock()
	d.metrics.DataplaneUp(true)
	d.notify("READY=1")

	driftCtx, stopDrift := context.WithCancel(ctx)
	driftDone := make(chan struct{})
	go func() { defer close(driftDone); d.watchDrift(driftCtx) }()

	err = serve(ctx)
	stopDrift()
	<-driftDone
	d.metrics.DataplaneUp(false)
	d.notify("STOPPING=1")
	d.Log.Info("data plane stopped; interception stays in place (guests fail closed) until `vmegress down`")
	return err
}

// startProxy opens the builtin data plane's listener; the returned func
// serves until ctx ends.
func (d *Daemon) startProxy(ctx context.Context, cfg *config.Config, addr string, answers *dest.Answers, pol *policy.Policy) (func(context.Context) error, error) {
	ln, err := d.Listen(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("starting the builtin data plane: %w", err)
	}
	d.proxy = &proxy.Proxy{
		GuestRange:  cfg.VMCIDR,
		Dial:        d.Dial,
		HostAddrs:   d.HostAddrs,
		Answers:     answers,
		Resolver:    d.resolver,
		OriginalDst: cfg.Upstream == "original_dst",
		Log:         d.Log,
		AccessLog:   d.AccessLog,
		Metrics:     d.metrics,
	}
	d.proxy.SetPolicy(pol, false)
	return func(ctx context.Context) error { return d.proxy.Serve(ctx, ln) }, nil
}

// startEnvoy serves the policy over xDS and runs a supervised Envoy that
// takes it; it returns once Envoy has the listener, and the returned func
// keeps Envoy running until ctx ends.
func (d *Daemon) startEnvoy(ctx context.Context, cfg *config.Config, upstreams []string) (func(context.Context) error, error) {
	bin, err := envoy.FindBinary(cfg.EnvoyBinary)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(d.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	sock := filepath.Join(d.StateDir, "envoy-xds.sock")
	os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return nil, fmt.Errorf("starting the xDS server: %w", err)
	}
	// Envoy's admin: loopback, the port after vmegress's own.
	d.envoyOpt = envoy.Options{Upstreams: upstreams, AccessLogPath: "/dev/stdout", OnPolicyChange: cfg.OnPolicyChange,
		AdminAddress: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), cfg.Admin.Port()+1)}
	d.xds = envoy.NewServer()
	if err := d.xds.Update(ctx, cfg, d.envoyOpt); err != nil {
		ln.Close()
		return nil, err
	}
	go d.xds.Serve(ctx, ln)
	boot := filepath.Join(d.StateDir, "envoy-bootstrap.json")
	if err := os.WriteFile(boot, envoy.JSON(envoy.XDSBootstrap(d.envoyOpt, sock)), 0o600); err != nil {
		return nil, fmt.Errorf("writing the Envoy bootstrap: %w", err)
	}
	access := d.AccessWriter
	if access == nil {
		access = io.Discard
	}
	sup := &envoy.Supervisor{Binary: bin, Bootstrap: boot, Admin: d.envoyOpt.AdminAddress.String(), Access: access,
		Log: d.Log.With("component", "envoy"), OnState: func(up bool) { d.metrics.DataplaneUp(up) }}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); sup.Run(runCtx) }()
	deadline := time.Now().Add(30 * time.Second)
	for !sup.Ready(ctx) {
		if time.Now().After(deadline) || ctx.Err() != nil {
			stop()
			<-done
			return nil, fmt.Errorf("envoy did not become ready with the vmegress listener within 30s (see its log above)")
		}
		time.Sleep(100 * time.Millisecond)
	}
	return func(ctx context.Context) error {
		<-ctx.Done()
		stop()
		<-done
		return nil
	}, nil
}

// Reload reads the config again and swaps it in atomically. An invalid
// config is logged and counted, and the running policy stays in force.
// Established connections the new policy refuses are closed unless
// on_policy_change is keep.
func (d *Daemon) Reload(ctx context.Context, why string) error {
	d.notify("RELOADING=1")
	defer d.notify("READY=1")
	d.mu.Lock()
	defer d.mu.Unlock()
	load := d.Load
	if load == nil {
		load = func() (*config.Config, error) { return config.Load(d.cfg.Path) }
	}
	var (
		cfg *config.Config
		st  *state.State
		pol *policy.Policy
		err error
	)
	// A `net up/down` that lands between reading the state and installing
	// it makes the attempt start over: installing the older state would
	// undo it.
	for attempt := 0; attempt < 5; attempt++ {
		cfg, err = load()
		if err == nil {
			st, err = d.loadState()
		}
		if err == nil {
			cfg, err = Effective(cfg, st)
		}
		if err == nil {
			err = reloadable(d.cfg, cfg)
		}
		if err == nil {
			pol, err = policy.Compile(cfg)
		}
		if err == nil && firewall.Desired(cfg, st).String() != firewall.Desired(d.cfg, d.st).String() {
			err = d.installIfCurrent(ctx, cfg, st)
		}
		if !errors.Is(err, errStateChanged) {
			break
		}
	}
	d.lastLoad = time.Now()
	if err != nil {
		d.lastError = err.Error()
		d.metrics.Reload(false)
		d.Log.Error("policy reload failed; the previous policy stays in force", "trigger", why, "err", err.Error())
		return err
	}
	d.lastError = ""
	d.cfg, d.st, d.pol = cfg, st, pol
	d.resolver.SetPolicy(pol)
	closed := 0
	if d.proxy != nil {
		closed = d.proxy.SetPolicy(pol, cfg.OnPolicyChange != "keep")
	}
	if d.xds != nil {
		if err := d.xds.Update(ctx, cfg, d.envoyOpt); err != nil {
			d.Log.Error("pushing the new policy to Envoy", "err", err.Error())
		}
	}
	d.metrics.Reload(true)
	d.Log.Info("policy reloaded", "trigger", why, "projects", len(pol.Projects()), "closed_connections", closed)
	return nil
}

// reloadable refuses changes that need a restart (listening sockets).
func reloadable(old, cfg *config.Config) error {
	switch {
	case old.TProxyPort != cfg.TProxyPort, old.DNSPort != cfg.DNSPort, old.Admin != cfg.Admin, old.Upstream != cfg.Upstream,
		old.Dataplane != cfg.Dataplane, old.EnvoyBinary != cfg.EnvoyBinary, old.Firewall != cfg.Firewall:
		return errors.New("tproxy_port, dns_port, admin, upstream, dataplane, envoy and firewall change only with a restart")
	}
	return nil
}

// watchDrift restores the ruleset or routing when they change behind the
// daemon's back.
func (d *Daemon) watchDrift(ctx context.Context) {
	every := d.DriftInterval
	if every == 0 {
		every = DefaultDriftInterval
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := d.repairDrift(ctx)
		if errors.Is(err, errStateChanged) {
			// `net up/down` changed elements ahead of the state watch.
			d.Reload(ctx, "state changed")
			continue
		}
		if err != nil && ctx.Err() == nil {
			d.Log.Error("checking for drift", "err", err.Error())
		}
	}
}

// errStateChanged: the ruleset differs because the project state changed.
var errStateChanged = errors.New("project state changed")

// installIfCurrent installs cfg and st under the state lock if st is still
// what the state file holds (errStateChanged otherwise).
func (d *Daemon) installIfCurrent(ctx context.Context, cfg *config.Config, st *state.State) error {
	defer d.lockState()()
	cur, err := d.loadState()
	if err != nil {
		return err
	}
	if !reflect.DeepEqual(cur.Projects, st.Projects) {
		return errStateChanged
	}
	return d.install(ctx, cfg, st)
}

func (d *Daemon) repairDrift(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	// `net up/down` first: acting on stale state would undo their work.
	if st, err := d.loadState(); err == nil && !reflect.DeepEqual(st.Projects, d.st.Projects) {
		return errStateChanged
	}
	// New guest interfaces (and ones a global ip_forward write reset) get
	// their forwarding turned off.
	if err := d.Interception.guard(d.cfg, d.st); err != nil {
		return err
	}
	snap, err := d.Interception.Firewall.Snapshot(ctx)
	if err != nil {
		return err
	}
	pr := hostnet.PolicyRouting{Mark: d.cfg.Mark, Table: d.cfg.RouteTable}
	routed, err := pr.Installed(d.Interception.Netlink)
	if err != nil {
		return err
	}
	if snap == d.applied && routed {
		return nil
	}
	what := "policy routing"
	if snap != d.applied {
		what = d.Interception.Firewall.Describe()
	}
	// A `net up/down` in flight changes the ruleset too: the state lock
	// waits for it, and a changed state is theirs, not drift.
	unlock := d.lockState()
	defer unlock()
	if st, err := d.loadState(); err == nil && !reflect.DeepEqual(st.Projects, d.st.Projects) {
		return errStateChanged
	}
	d.Log.Warn("interception changed behind vmegress's back; restoring it", "what", what)
	d.metrics.DriftRepaired()
	return d.install(ctx, d.cfg, d.st)
}

// serveDNS starts the resolver on UDP and TCP addr; the returned func stops
// it. Rate limits, connection caps and accept retries are the resolver's
// (vdns.Resolver.Serve).
func (d *Daemon) serveDNS(ctx context.Context, addr string, r *vdns.Resolver) (func(), error) {
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
	return r.Serve(pc, tl), nil
}
