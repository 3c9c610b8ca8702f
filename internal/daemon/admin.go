package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"sort"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/vmegress/vmegress/client"
)

// Status is what /status and /v1/status report (and `vmegress status` prints).
type Status = client.Status

// ProjectStatus is one project's line in Status.
type ProjectStatus = client.ProjectStatus

// Status returns the daemon's current status.
func (d *Daemon) Status(ctx context.Context) Status {
	d.mu.Lock()
	ready, px := d.ready, d.proxy
	snap := d.Engine.Snapshot()
	cfg := snap.Config
	st := Status{Version: d.Version, Ready: ready, Started: d.started, Config: cfg.Path, Dataplane: cfg.Dataplane,
		Firewall: d.Engine.Interception.Firewall.Describe(), Upstream: cfg.Upstream, LastReload: d.lastLoad, LastError: d.lastError,
		Generation: snap.Generation}
	d.mu.Unlock()
	if ok, err := d.Engine.Interception.Firewall.Installed(ctx); err == nil {
		st.Interception = ok
	}
	conns, dns := d.countsByProject()
	for _, p := range cfg.Projects {
		ps := ProjectStatus{Name: p.Name, Mode: p.Mode, Rules: len(p.Allow),
			Connections: conns[p.Name], DNSQueries: dns[p.Name]}
		if p.Subnet.IsValid() {
			ps.Subnet = p.Subnet.String()
		}
		if px != nil {
			ps.Active = px.Active(p.Name)
		}
		st.Projects = append(st.Projects, ps)
	}
	sort.Slice(st.Projects, func(i, j int) bool { return st.Projects[i].Name < st.Projects[j].Name })
	return st
}

// countsByProject reads the connection and query counters back from the registry.
func (d *Daemon) countsByProject() (conns, dns map[string]map[string]uint64) {
	conns, dns = map[string]map[string]uint64{}, map[string]map[string]uint64{}
	// What could be gathered, even when some collector failed.
	families, _ := d.Registry.Gather()
	for _, f := range families {
		var into map[string]map[string]uint64
		switch f.GetName() {
		case "vmegress_proxy_connections_total":
			into = conns
		case "vmegress_dns_queries_total":
			into = dns
		default:
			continue
		}
		for _, m := range f.GetMetric() {
			var project, verdict string
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "project":
					project = l.GetValue()
				case "verdict":
					verdict = l.GetValue()
				}
			}
			if into[project] == nil {
				into[project] = map[string]uint64{}
			}
			into[project][verdict] += uint64(m.GetCounter().GetValue())
		}
	}
	return conns, dns
}

// serveAdmin serves /metrics, /healthz, /readyz and /status on addr.
func (d *Daemon) serveAdmin(ctx context.Context, addr string) (func(), error) {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.Registry, promhttp.HandlerOpts{
		// A collector that cannot read (the ruleset's counters, Envoy's
		// open connections while it restarts) must not hide the others:
		// vmegress_dataplane_up == 0 is what the alert needs then.
		ErrorHandling: promhttp.ContinueOnError,
		ErrorLog:      slog.NewLogLogger(d.Log.Handler(), slog.LevelWarn),
	}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		st := d.Status(r.Context())
		if !st.Ready || !st.Interception {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(d.Status(r.Context()))
	})
	if os.Getenv("VMEGRESS_PPROF") == "1" {
		// Profiling for benchmarks only (the admin address is loopback).
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("starting the admin endpoint on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.Log.Error("admin endpoint stopped", "err", err)
		}
	}()
	return func() { srv.Close() }, nil
}
