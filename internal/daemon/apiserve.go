package daemon

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"os/user"
	"strconv"
	"time"

	"github.com/vmegress/vmegress/internal/api"
	"github.com/vmegress/vmegress/internal/placement"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/state"
)

// apiGroupID is the gid of the API group, or root's group (0) when no such
// group exists on the host.
func apiGroupID(name string) int {
	if name == "" {
		return 0
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return 0
	}
	return gid
}

// serveAPI serves the local API on d.APISocket; the returned func stops it.
func (d *Daemon) serveAPI(ctx context.Context) (func(), error) {
	gid := apiGroupID(d.APIGroup)
	ln, err := api.Listen(d.APISocket, gid)
	if err != nil {
		return nil, err
	}
	srv := &api.Server{
		Engine:  d.Engine,
		Applied: d.applied,
		// The daemon's record of answers, read at each call.
		Resolved: func(project string, a netip.Addr) []string {
			if r := d.resolved(); r != nil {
				return r(project, a)
			}
			return nil
		},
		Group: gid,
		Nameserver: func(p state.Project) string {
			ups, _ := Upstreams(d.Engine.Snapshot().Config, d.ResolvConf)
			return placement.Nameserver(p, ups)
		},
		CheckSSHPort: d.CheckSSHPort,
		Counters: func(project string) (int64, map[string]uint64, map[string]uint64) {
			d.mu.Lock()
			px := d.proxy
			d.mu.Unlock()
			var active int64
			if px != nil {
				active = px.Active(project)
			}
			conns, dns := d.countsByProject()
			return active, conns[project], dns[project]
		},
		Log:    d.Log.With("component", "api"),
		Events: d.Events,
		DNS: func(ctx context.Context, pr *policy.Project, name string, port uint16, addrKnown bool) string {
			d.mu.Lock()
			res := d.resolver
			d.mu.Unlock()
			if res == nil {
				return ""
			}
			ups, _ := Upstreams(d.Engine.Snapshot().Config, d.ResolvConf)
			return api.ResolverDNS(res.Lookup, ups)(ctx, pr, name, port, addrKnown)
		},
		Status: func(ctx context.Context) any { return d.Status(ctx) },
	}
	hs := &http.Server{Handler: srv.Handler(), ConnContext: api.ConnContext, ReadHeaderTimeout: 5 * time.Second,
		// Event streams end with the daemon.
		BaseContext: func(net.Listener) context.Context { return ctx }}
	go func() {
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) && ctx.Err() == nil {
			d.Log.Error("API stopped", "err", err)
		}
	}()
	return func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		hs.Shutdown(sctx)
	}, nil
}
