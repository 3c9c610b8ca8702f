// Package daemon wires vmegress's pieces together: it installs the host's
// interception, runs the data plane, the resolver and the admin endpoint,
// reloads policy live, repairs drift, and keeps guests fail-closed when it
// stops (interception stays until `vmegress down`).
package daemon

import (
	"context"
	"fmt"
	"github.com/vmegress/vmegress/internal/ctflow"
	"github.com/vmegress/vmegress/internal/policy"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/dest"
	vdns "github.com/vmegress/vmegress/internal/dns"
	"github.com/vmegress/vmegress/internal/engine"
	"github.com/vmegress/vmegress/internal/envoy"
	"github.com/vmegress/vmegress/internal/events"
	"github.com/vmegress/vmegress/internal/metrics"
	"github.com/vmegress/vmegress/internal/proxy"
)

// DefaultDriftInterval is how often the daemon checks that the ruleset and
// routing are still what it installed.
const DefaultDriftInterval = time.Second

// Daemon is `vmegress run`. Set the fields, then call Run.
type Daemon struct {
	Config *config.Config
	// Engine is the only writer of the state and the host; the daemon opens
	// it (installing the interception) and serves its changes. Its Store's
	// lock is the caller's to hold for the daemon's life.
	Engine *engine.Engine
	// Load reads the config again on reload (zero: config.Load of Config.Path).
	Load func() (*config.Config, error)
	// APISocket is the local API's unix socket ("": no API).
	APISocket string
	// APIGroup may call the API besides root (its socket's group).
	APIGroup string
	// Events receives every change (placed, removed, policy); the access
	// log's lines reach it through AccessLog's handler (may be nil).
	Events *events.Hub
	// CheckSSHPort refuses an SSH port the host itself uses (may be nil).
	CheckSSHPort func(port uint16, allowPrivileged bool) error
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
	// AccessWriter receives Envoy's JSON access-log lines as they are (the
	// daemon publishes them to Events and counts them in its metrics), and
	// the lines of kernel-forwarded flows, written as AccessLog's JSON
	// handler would, a batch at a time; it must be AccessLog's writer.
	// Nil: those lines go through AccessLog.
	AccessWriter io.Writer
	// Flows follows the flows the kernel forwards for cidr rules (logging
	// them when they end, cutting them on a policy change); nil: neither.
	Flows Flows
	// Termination is the builtin plane's TLS termination (https rules);
	// nil: connections that need it are refused.
	Termination *proxy.Termination

	mu        sync.Mutex // guards the fields below
	started   time.Time
	lastLoad  time.Time
	lastError string
	ready     bool

	metrics *metrics.Metrics
	answers *dest.Answers
	// planeGen and planeErr: the last snapshot pushed to Envoy and whether
	// it was acknowledged.
	planeGen uint64
	planeErr error
	proxy    *proxy.Proxy
	resolver *vdns.Resolver
	// kernelLines is kernelFlowsEnded's buffer (Flows.Watch's goroutine).
	kernelLines []byte
	xds         *envoy.Server
	envoyOpt    envoy.Settings
}

// Flows is ctflow.Tracker's interface.
type Flows interface {
	// Start subscribes before guests are served; Watch then reports.
	Start() error
	Watch(ctx context.Context, ended func([]ctflow.Flow)) error
	Revoke(keep func(ctflow.Flow) bool) (int, error)
	// Open lists the open kernel-forwarded flows (for the gauge).
	Open() ([]ctflow.Flow, error)
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

// Run installs interception, serves until ctx ends, then stops the data plane
// and leaves interception in place (guests stay fail-closed).
func (d *Daemon) Run(ctx context.Context) error {
	if d.Registry == nil {
		d.Registry = prometheus.NewRegistry()
	}
	d.metrics = metrics.New(d.Registry)
	d.Registry.MustRegister(metrics.NewRulesetCollector(func() (map[string]uint64, error) {
		return d.Engine.Interception.Firewall.Counters(context.Background())
	}))
	// The consumers see every snapshot from the first one on; the data
	// plane's pieces are created below and pick up the latest then.
	d.Engine.Consumers = append(d.Engine.Consumers, d.consume)
	if err := d.Engine.Open(ctx, d.Config, true); err != nil {
		return err
	}
	snap := d.Engine.Snapshot()
	cfg := snap.Config
	upstreams, err := Upstreams(cfg, d.ResolvConf)
	if err != nil {
		return err
	}
	d.mu.Lock()
	d.started, d.lastLoad = time.Now(), time.Now()
	d.mu.Unlock()
	answers := &dest.Answers{}
	d.Engine.SetAnswers(answers)
	res := &vdns.Resolver{
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
		Admit: func(project, name string, addrs []netip.Addr, ttl time.Duration) error {
			ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			return d.Engine.Admit(ctx, project, name, addrs, ttl)
		},
	}
	d.mu.Lock()
	d.answers = answers
	d.resolver = res
	d.mu.Unlock()
	res.SetPolicy(d.Engine.Snapshot().Policy) // the latest, whatever changed since Open
	dnsAddr := net.JoinHostPort("0.0.0.0", strconv.Itoa(int(cfg.DNSPort)))
	stopDNS, err := d.serveDNS(ctx, dnsAddr, res)
	if err != nil {
		return err
	}
	defer stopDNS()
	stopAdmin, err := d.serveAdmin(ctx, cfg.Admin.String())
	if err != nil {
		return err
	}
	defer stopAdmin()
	if d.APISocket != "" {
		stopAPI, err := d.serveAPI(ctx)
		if err != nil {
			return err
		}
		defer stopAPI()
	}
	if d.Flows != nil {
		// Before the data plane serves: a flow whose conntrack entry is made
		// before the subscription is never reported.
		if err := d.Flows.Start(); err != nil {
			return fmt.Errorf("following kernel-forwarded flows: %w", err)
		}
		d.Registry.MustRegister(metrics.NewKernelFlowsCollector(d.kernelFlowsOpen))
	}
	addr := net.JoinHostPort("0.0.0.0", strconv.Itoa(int(cfg.TProxyPort)))
	var serve func(context.Context) error
	if cfg.Dataplane == "envoy" {
		if serve, err = d.startEnvoy(ctx, cfg, upstreams); err != nil {
			return err
		}
	} else {
		if serve, err = d.startProxy(ctx, cfg, addr, answers); err != nil {
			return err
		}
	}
	var names []string
	for _, p := range d.Engine.Snapshot().Policy.Projects() {
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
	if d.Flows != nil {
		go func() {
			if err := d.Flows.Watch(driftCtx, d.kernelFlowsEnded); err != nil {
				d.Log.Error("following kernel-forwarded flows stopped: they are no longer logged", "err", err.Error())
			}
		}()
	}

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
func (d *Daemon) startProxy(ctx context.Context, cfg *config.Config, addr string, answers *dest.Answers) (func(context.Context) error, error) {
	ln, err := d.Listen(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("starting the builtin data plane: %w", err)
	}
	px := &proxy.Proxy{
		GuestRange:  cfg.VMCIDR,
		Dial:        d.Dial,
		HostAddrs:   d.HostAddrs,
		Answers:     answers,
		Resolver:    d.resolver,
		OriginalDst: cfg.Upstream == "original_dst",
		Log:         d.Log,
		AccessLog:   d.AccessLog,
		Metrics:     d.metrics,
		Termination: d.Termination,
	}
	px.SetPolicy(d.Engine.Snapshot().Policy, false)
	d.mu.Lock()
	d.proxy = px
	d.mu.Unlock()
	px.SetPolicy(d.Engine.Snapshot().Policy, false) // the latest, whatever changed meanwhile
	return func(ctx context.Context) error { return px.Serve(ctx, ln) }, nil
}

// envoyStatsTimeout bounds a scrape's question to Envoy's admin (a
// scrape's default timeout is 10s; a stuck Envoy must not use it all).
const envoyStatsTimeout = 2 * time.Second

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
	// Envoy's admin: a unix socket only root can open, never a TCP port.
	d.envoyOpt = envoy.SettingsFrom(cfg)
	d.envoyOpt.Upstreams, d.envoyOpt.AccessLogPath = upstreams, "/dev/stdout"
	d.envoyOpt.AdminSocket = filepath.Join(d.StateDir, "envoy-admin.sock")
	// https rules: certificates of the vmegress CA and inject secrets,
	// served to Envoy over SDS; upstreams verified as the builtin plane does.
	if d.Termination != nil {
		d.envoyOpt.Leaf, d.envoyOpt.Secret = d.Termination.Leaf, d.Termination.Secret
	}
	if d.envoyOpt.UpstreamRoots, err = envoy.HostUpstreamRoots(cfg.UpstreamCAFile); err != nil {
		ln.Close()
		return nil, err
	}
	xds := envoy.NewServer()
	xds.Log = d.Log.With("component", "xds")
	if err := xds.Update(ctx, d.Engine.Snapshot().Policy, d.envoyOpt); err != nil {
		ln.Close()
		return nil, err
	}
	d.mu.Lock()
	d.xds = xds
	d.mu.Unlock()
	if err := xds.Update(ctx, d.Engine.Snapshot().Policy, d.envoyOpt); err != nil { // the latest
		ln.Close()
		return nil, err
	}
	go xds.Serve(ctx, ln)
	boot := filepath.Join(d.StateDir, "envoy-bootstrap.json")
	if err := os.WriteFile(boot, envoy.JSON(envoy.XDSBootstrap(d.envoyOpt, sock)), 0o600); err != nil {
		return nil, fmt.Errorf("writing the Envoy bootstrap: %w", err)
	}
	access := d.AccessWriter
	if access == nil {
		access = io.Discard
	}
	// Envoy's access-log lines feed the event stream and the same metrics
	// the builtin proxy feeds (parsed once, here).
	access = &events.LineWriter{W: access, Hub: d.Events, Observe: func(e events.Event) { d.metrics.AccessLine(e) }}
	sup := &envoy.Supervisor{Binary: bin, Bootstrap: boot, AdminSocket: d.envoyOpt.AdminSocket, Access: access,
		KeepOnChange: cfg.OnPolicyChange == "keep",
		Log:          d.Log.With("component", "envoy"), OnState: func(up bool) { d.metrics.DataplaneUp(up) }}
	// Open connections are Envoy's to count: read at scrape time.
	d.metrics.SetActiveFunc(func() (map[string]float64, error) {
		ctx, cancel := context.WithTimeout(ctx, envoyStatsTimeout)
		defer cancel()
		return sup.ActiveConnections(ctx)
	})
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

// consume hands a new snapshot to the data plane: the resolver, the builtin
// proxy (re-deciding open connections of the projects that changed), or
// Envoy (one xDS push). It runs inside the engine's change, so the change
// returns only once new connections are decided by the new policy.
func (d *Daemon) consume(s *engine.Snapshot, ch engine.Change) {
	d.mu.Lock()
	res, px, xds := d.resolver, d.proxy, d.xds
	d.mu.Unlock()
	if res != nil {
		res.SetPolicy(s.Policy)
	}
	closed := 0
	if px != nil {
		closed = px.SetPolicy(s.Policy, s.Config.OnPolicyChange != "keep")
	}
	if xds != nil {
		err := xds.Update(context.Background(), s.Policy, d.envoyOpt)
		if err != nil {
			d.Log.Error("pushing the new policy to Envoy", "generation", s.Generation, "err", err.Error())
		}
		d.mu.Lock()
		d.planeGen, d.planeErr = s.Generation, err
		d.mu.Unlock()
	}
	if d.Flows != nil && ch.Kind != engine.ChangeOpen && s.Config.OnPolicyChange != "keep" {
		n, err := d.Flows.Revoke(func(f ctflow.Flow) bool {
			return s.Policy.KernelForwards(f.Src.Addr(), f.Dst, d.resolved())
		})
		if err != nil {
			d.Log.Error("cutting kernel-forwarded flows the new policy no longer allows", "err", err.Error())
		}
		closed += n
	}
	if ch.Kind != engine.ChangeOpen {
		d.Events.Publish(events.Event{"type": "change", "change": string(ch.Kind), "project": ch.Project,
			"projects_changed": len(ch.Projects), "generation": s.Generation})
		d.Log.Info("policy updated", "change", string(ch.Kind), "project", ch.Project, "projects_changed", len(ch.Projects),
			"generation", s.Generation, "closed_connections", closed)
	}
}

// Reload reads the config again and hands it to the engine. An invalid
// config is logged and counted, and the running policy stays in force.
func (d *Daemon) Reload(ctx context.Context, why string) error {
	d.notify("RELOADING=1")
	defer d.notify("READY=1")
	load := d.Load
	if load == nil {
		path := d.Config.Path
		load = func() (*config.Config, error) { return config.Load(path) }
	}
	cfg, err := load()
	var changed []string
	if err == nil {
		changed, err = d.Engine.SetConfig(ctx, cfg)
	}
	d.mu.Lock()
	d.lastLoad = time.Now()
	if err != nil {
		d.lastError = err.Error()
	} else {
		d.lastError = ""
	}
	d.mu.Unlock()
	if err != nil {
		d.metrics.Reload(false)
		d.Log.Error("policy reload failed; the previous policy stays in force", "trigger", why, "err", err.Error())
		return err
	}
	d.metrics.Reload(true)
	d.Log.Info("policy reloaded", "trigger", why, "projects_changed", len(changed))
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
		what, err := d.Engine.RepairDrift(ctx)
		if what != "" {
			d.Log.Warn("interception changed behind vmegress's back; restoring it", "what", what)
			d.metrics.DriftRepaired()
		}
		if err != nil && ctx.Err() == nil {
			d.Log.Error("checking for drift", "err", err.Error())
		}
	}
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

// kernelFlowsEnded logs the flows the kernel forwarded, as the data plane
// logs its connections (path "kernel"), and counts them. They come in
// batches (ctflow.Tracker.Watch): the policy is looked up once, the lines
// are written at once (to AccessWriter) and the counters are added once
// per project and verdict.
func (d *Daemon) kernelFlowsEnded(fs []ctflow.Flow) {
	pol := d.Engine.Snapshot().Policy
	names := d.resolved()
	var h slog.Handler
	if d.AccessWriter == nil && d.AccessLog != nil {
		if h = d.AccessLog.Handler(); !h.Enabled(context.Background(), slog.LevelInfo) {
			h = nil
		}
	}
	now := time.Now()
	buf := d.kernelLines[:0]
	var tallies [4]flowTally // a batch's flows are of a few projects
	tally := tallies[:0]
	for i := range fs {
		f := &fs[i]
		l := kernelLine{verdict: string(policy.Allow), src: f.Src, dst: f.Dst, up: int64(f.Up), down: int64(f.Down)}
		if dec, _ := pol.ConnectWith(f.Src.Addr(), f.Dst, names); dec.Project != "" {
			l.project = dec.Project
			if dec.Verdict == policy.Allow {
				l.rule = dec.Rule
			}
		}
		if f.Revoked {
			l.verdict, l.reason = "revoked", "closed: the new policy no longer allows it"
		}
		tally = addTally(tally, l.project, l.verdict, f.Up, f.Down)
		if names != nil && l.project != "" {
			// The names the resolver handed the address out for (tcp rules).
			l.resolved = strings.Join(names(l.project, f.Dst.Addr()), ",")
		}
		if !f.Start.IsZero() && f.Stop.After(f.Start) {
			l.durationMS = float64(f.Stop.Sub(f.Start).Microseconds()) / 1000
		}
		switch {
		case d.AccessWriter != nil:
			buf = appendKernelLine(buf, now, &l)
			if d.Events.Active() {
				d.Events.Publish(l.event(now))
			}
		case h != nil:
			// Handed to the handler directly, as the proxy does:
			// Logger.LogAttrs would look up the caller's program counter.
			r := slog.NewRecord(now, slog.LevelInfo, "connection", 0)
			r.AddAttrs(l.attrs()...)
			h.Handle(context.Background(), r) // a failed write is not retried (as the proxy's)
		}
	}
	if len(buf) > 0 {
		d.AccessWriter.Write(buf) // as slog's: a failed write is not retried
	}
	if cap(buf) <= maxKernelLines {
		d.kernelLines = buf
	}
	for _, t := range tally {
		d.metrics.Connections(t.project, t.verdict, t.n)
		d.metrics.Bytes(t.project, int64(t.up), int64(t.down))
	}
}

// maxKernelLines bounds the buffer kernelFlowsEnded keeps between batches
// (a line is some 300 bytes: 1 MiB is a batch of over 3,000 flows).
const maxKernelLines = 1 << 20

// flowTally is what a batch of kernel-forwarded flows adds to the counters
// of one project and verdict.
type flowTally struct {
	project, verdict string
	n                int
	up, down         uint64
}

func addTally(ts []flowTally, project, verdict string, up, down uint64) []flowTally {
	for i := range ts {
		if ts[i].project == project && ts[i].verdict == verdict {
			ts[i].n++
			ts[i].up += up
			ts[i].down += down
			return ts
		}
	}
	return append(ts, flowTally{project: project, verdict: verdict, n: 1, up: up, down: down})
}

// resolved is what the resolver handed out, for tcp rules' decisions.
func (d *Daemon) resolved() policy.Resolved {
	d.mu.Lock()
	a := d.answers
	d.mu.Unlock()
	if a == nil {
		return nil
	}
	return a.Names
}

// applied reports whether the data plane took the snapshot of generation:
// the builtin plane takes every snapshot in the engine's change; Envoy must
// have acknowledged it (or a later one).
func (d *Daemon) applied(generation uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.xds == nil || d.planeGen > generation {
		return nil
	}
	if d.planeGen == generation && d.planeErr != nil {
		return fmt.Errorf("pushing to envoy: %w", d.planeErr)
	}
	return nil
}

// kernelFlowsOpen counts the open kernel-forwarded flows by the project
// that owns their guest's address now (one conntrack dump per scrape).
func (d *Daemon) kernelFlowsOpen() (map[string]float64, error) {
	flows, err := d.Flows.Open()
	if err != nil {
		return nil, err
	}
	pol := d.Engine.Snapshot().Policy
	out := map[string]float64{}
	for _, f := range flows {
		if pr := pol.ProjectFor(f.Src.Addr()); pr != nil {
			out[pr.Name]++
		}
	}
	return out, nil
}
