// Package engine is the one door to every change of vmegress's state and of
// the host: placing and removing projects, config reloads, drift repair and
// restore-NAT each enter as one call, serialized, which validates the change,
// builds the next snapshot (recompiling only the projects it touches),
// applies the host delta, persists the state atomically and hands the new
// compiled policy to every consumer before it returns.
//
// The daemon runs one engine for its whole life and holds the state lock
// meanwhile; when no daemon runs, a CLI command runs the same engine
// in-process under the same lock. Nothing else writes the state or changes
// the host's interception.
package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/ctflow"
	"github.com/vmegress/vmegress/internal/dest"
	"github.com/vmegress/vmegress/internal/firewall"
	"github.com/vmegress/vmegress/internal/hostnet"
	"github.com/vmegress/vmegress/internal/placement"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/state"
)

// Host is what the engine changes on the host besides the ruleset: project
// TAPs, and the host's own addresses and routes it must not collide with.
type Host interface {
	// CreateTAP creates (or adopts a TAP of this project) and configures t.
	// created reports whether the interface is new (a rollback deletes it).
	CreateTAP(t hostnet.TAP, project string) (created bool, err error)
	// DeleteTAP removes the TAP if it is one vmegress made for project.
	DeleteTAP(name, project string) error
	// Prefixes lists the host's IPv4 addresses and routes on interfaces other
	// than those skip names (vmegress's own TAPs).
	Prefixes(skip func(iface string) bool) ([]placement.HostPrefix, error)
	// Links names the host's network interfaces.
	Links() (map[string]bool, error)
}

// Snapshot is one consistent view: the config file, the projects placed,
// their merge, and the policy compiled from it. Snapshots are immutable.
type Snapshot struct {
	// File is the config as loaded from its file.
	File *config.Config
	// Config is File merged with the placed projects (Effective).
	Config *config.Config
	State  *state.State
	// Policies are the policies of the projects the API owns (not named in
	// the config file), by name.
	Policies map[string]config.Project
	Policy   *policy.Policy
	// Generation counts the snapshots this engine made (1 after Open).
	Generation uint64
}

// FlowCutter deletes the conntrack entries of the open kernel-forwarded
// flows for which keep is false (ctflow.Tracker).
type FlowCutter interface {
	Revoke(keep func(ctflow.Flow) bool) (int, error)
}

// ChangeKind says what a change did.
type ChangeKind string

// Kinds of change.
const (
	ChangeOpen    ChangeKind = "open"
	ChangePlaced  ChangeKind = "placed"
	ChangeRemoved ChangeKind = "removed"
	ChangeConfig  ChangeKind = "config"
	ChangeNAT     ChangeKind = "restore_nat"
	ChangePolicy  ChangeKind = "policy"
)

// Change describes one applied change, for consumers and events.
type Change struct {
	Kind ChangeKind
	// Project is the project placed or removed ("" for config changes).
	Project string
	// Projects whose compiled policy changed (nil: none; all on open).
	Projects []string
}

// Engine serializes every change. Set the fields, then call Open.
type Engine struct {
	Store        state.Store
	Interception Interception
	Host         Host
	Log          *slog.Logger
	// Answers is what the resolver handed out (may be nil): a policy change
	// turns the answers of the projects it touched into the ruleset's timed
	// elements under the new policy (tcp rules).
	Answers *dest.Answers
	// Flows cuts open kernel-forwarded flows (nil: the engine cuts none):
	// at a start that installs the interception, those the policy does
	// not allow (cutAtStart); and for the changes an engine that did not
	// install it makes to the one a stopped daemon left (the CLI's). A
	// running daemon's changes are cut by its consumers, which also close
	// the data plane's connections.
	Flows FlowCutter
	// Consumers get every new snapshot, in order, before the call that made
	// it returns (the builtin proxy, the resolver, the Envoy xDS server).
	Consumers []func(*Snapshot, Change)

	mu      sync.Mutex
	snap    *Snapshot
	applied string // the ruleset's snapshot after the engine's last apply
	// installed: the engine installed the whole interception (the daemon);
	// otherwise (the CLI) project changes install it only if absent.
	installed bool
	adm       admissions
}

// Open reads the state and builds the first snapshot from file. With
// install, it installs the whole interception (replacing whatever a previous
// run left); the daemon opens so, the CLI does not. Held locks are the
// caller's: the engine never takes the state lock itself.
func (e *Engine) Open(ctx context.Context, file *config.Config, install bool) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	st, err := e.Store.Load()
	if err != nil {
		return err
	}
	pols, err := e.loadPolicies()
	if err != nil {
		return err
	}
	eff, err := EffectiveWith(file, st, pols)
	if err != nil {
		return err
	}
	pol, err := policy.Compile(eff)
	if err != nil {
		return err
	}
	snap := &Snapshot{File: file, Config: eff, State: st, Policies: pols, Policy: pol, Generation: 1}
	if install {
		if err := e.install(ctx, eff, st, pol); err != nil {
			return err
		}
		// The other backend's leftovers are gone now; later installs
		// (reloads, drift repairs) need not look again.
		e.Interception.Stale = nil
		e.installed = true
		e.restoreTAPs(st)
		e.cutAtStart(eff, pol)
	}
	e.snap = snap
	e.publish(snap, Change{Kind: ChangeOpen})
	return nil
}

// cutAtStart cuts, when the engine installs the interception, the open
// kernel-forwarded flows pol does not allow: a policy that changed while
// no daemon ran (the config file edited, a project removed by hand) leaves
// open nothing a running daemon would have cut. A flow to a port where its
// project has a tcp allow rule stays: the resolver's answers that admitted
// it went with the previous daemon, and the rule may still allow its name
// (such a flow is cut when a change of the project's policy comes with the
// daemon running). Failures are logged: a start is never refused for them.
func (e *Engine) cutAtStart(eff *config.Config, pol *policy.Policy) {
	if e.Flows == nil || eff.OnPolicyChange == "keep" {
		return
	}
	n, err := e.Flows.Revoke(func(f ctflow.Flow) bool {
		if pol.KernelForwards(f.Src.Addr(), f.Dst, nil) {
			return true
		}
		pr := pol.ProjectFor(f.Src.Addr())
		return pr != nil && !pr.Audit && pr.TCPAllowsPort(f.Dst.Port())
	})
	if n > 0 {
		e.log().Info("cut kernel-forwarded flows left open from before the start that the policy does not allow", "flows", n)
	}
	if err != nil {
		e.log().Error("cutting kernel-forwarded flows left open from before the start that the policy does not allow", "err", err.Error())
	}
}

// restoreTAPs re-creates the TAP of every placed project that has none: a
// crash between a removal's TAP deletion and its state write, or a reboot
// (TAPs do not survive one; the state does). Without it the project stays
// placed with nothing to attach a VM to, and placing it again changes
// nothing. The ruleset is installed first, so a TAP never comes up
// unfiltered. A TAP the state does not list (a crash between a placement's
// TAP and its state write) is left: it is a guest interface with forwarding
// off in no project's /30, so nothing from it leaves, and placing its
// project again adopts it. A TAP that cannot be made is logged, not fatal:
// one project's trouble never keeps the others' data plane down.
func (e *Engine) restoreTAPs(st *state.State) {
	if e.Host == nil || len(st.Projects) == 0 {
		return
	}
	have, err := e.Host.Links()
	if err != nil {
		e.log().Error("listing interfaces to restore the projects' TAPs", "err", err.Error())
		return
	}
	n := 0
	for _, p := range st.Sorted() {
		if have[p.TAP] {
			continue
		}
		if _, err := e.Host.CreateTAP(tapOf(p), p.Name); err != nil {
			e.log().Error("re-creating a placed project's TAP", "project", p.Name, "tap", p.TAP, "err", err.Error())
			continue
		}
		n++
	}
	if n > 0 {
		e.log().Info("re-created the TAPs of placed projects that were missing (after a reboot?)", "count", n)
	}
}

func tapOf(p state.Project) hostnet.TAP {
	return hostnet.TAP{Name: p.TAP, HostIP: p.HostIP(), GuestIP: p.GuestIP(), GuestMAC: p.MAC, Owner: p.Owner, Group: p.Group,
		Forwarding: p.Egress == state.EgressNAT || p.SSHPort != 0}
}

// Snapshot returns the current snapshot.
func (e *Engine) Snapshot() *Snapshot {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.snap
}

func (e *Engine) publish(s *Snapshot, ch Change) {
	if ch.Kind != ChangeOpen && e.Interception.Firewall != nil {
		e.reconcileAdmitted(context.Background(), s, ch.Projects)
	}
	for _, c := range e.Consumers {
		c(s, ch)
	}
}

func (e *Engine) install(ctx context.Context, cfg *config.Config, st *state.State, pol *policy.Policy) error {
	if err := e.Interception.Install(ctx, cfg, st, pol); err != nil {
		return err
	}
	if err := e.readmit(ctx); err != nil {
		return err
	}
	snap, err := e.Interception.Firewall.Snapshot(ctx)
	if err != nil {
		return err
	}
	e.applied = snap
	return nil
}

func (e *Engine) log() *slog.Logger {
	if e.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return e.Log
}

// Place places (or updates) a project on the host: it allocates, creates the
// TAP, changes the ruleset's elements, persists the state and swaps the
// policy, in that order, undoing the earlier steps when a later one fails,
// so a refused or failed placement leaves nothing behind. changed is false
// when the project was already placed exactly so.
func (e *Engine) Place(ctx context.Context, req placement.Request, pol *config.Project) (p state.Project, changed bool, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	cur := e.snap
	if pol != nil {
		if cur.File.Project(req.Name) != nil {
			return state.Project{}, false, &placement.Conflict{Err: fmt.Errorf("project %s is owned by the config file %s: change its policy there", req.Name, cur.File.Path)}
		}
		if err := planeSupports(cur.File, *pol); err != nil {
			return state.Project{}, false, err
		}
	}
	ownTAPs := make(map[string]bool, len(cur.State.Projects)+1)
	for _, q := range cur.State.Projects {
		ownTAPs[q.TAP] = true
	}
	// The project's own TAP, if it exists already, is the project's (a TAP
	// made by the spec's script, adopted), not a clash.
	tap := req.TAP
	if tap == "" {
		tap = state.TAPName(req.Name)
	}
	ownTAPs[tap] = true
	var host []placement.HostPrefix
	if e.Host != nil {
		if host, err = e.Host.Prefixes(func(iface string) bool { return ownTAPs[iface] }); err != nil {
			return state.Project{}, false, fmt.Errorf("reading the host's addresses and routes: %w", err)
		}
	}
	p, err = placement.Place(cur.File, cur.State, host, req)
	if err != nil {
		return state.Project{}, false, err
	}
	before, existed := cur.State.Projects[p.Name]
	oldPol, hadPol := cur.Policies[p.Name]
	samePol := pol == nil || (hadPol && SameProject(oldPol, *pol))
	if existed && samePlacement(before, p) && samePol {
		return p, false, nil
	}
	next := cur.State.With(p)
	policies := cur.Policies
	if !samePol {
		policies = withPolicy(cur.Policies, *pol)
	}
	// A project the file does not name goes into the merge alone; others
	// are merged anew.
	var apiPol *config.Project
	if q, ok := policies[p.Name]; ok {
		apiPol = &q
	}
	eff, ok, err := withPlaced(cur.File, cur.Config, p.Name, p.Subnet, apiPol)
	if !ok {
		eff, err = EffectiveWith(cur.File, next, policies)
	}
	if err != nil {
		return state.Project{}, false, &placement.Conflict{Err: err}
	}
	cp := eff.Project(p.Name)
	compiled, err := cur.Policy.Update([]config.Project{*cp}, nil)
	if err != nil {
		return state.Project{}, false, &placement.Conflict{Err: err}
	}
	var undo []func()
	rollback := func() {
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i]()
		}
	}
	if existed && before.TAP != p.TAP && e.Host != nil {
		// Moving to another TAP: the old one goes (after the new one works).
		defer func() {
			if err == nil {
				if derr := e.Host.DeleteTAP(before.TAP, p.Name); derr != nil {
					e.log().Warn("removing the project's previous TAP", "tap", before.TAP, "err", derr.Error())
				}
			}
		}()
	}
	if e.Host != nil {
		created, err := e.Host.CreateTAP(tapOf(p), p.Name)
		if err != nil {
			return state.Project{}, false, err
		}
		if created {
			undo = append(undo, func() {
				if err := e.Host.DeleteTAP(p.TAP, p.Name); err != nil {
					e.log().Warn("rolling back: removing the TAP", "tap", p.TAP, "err", err.Error())
				}
			})
		}
	}
	var old *state.Project
	if existed {
		old = &before
	}
	restore, err := e.applyProject(ctx, cur.Config, cur.Policy, eff, compiled, next, old, &p)
	if err != nil {
		rollback()
		return state.Project{}, false, err
	}
	undo = append(undo, restore)
	if !samePol {
		if err := e.savePolicy(*pol); err != nil {
			rollback()
			return state.Project{}, false, err
		}
		undo = append(undo, func() { e.restorePolicy(p.Name, oldPol, hadPol) })
	}
	if err := e.Store.Save(next); err != nil {
		rollback()
		return state.Project{}, false, err
	}
	e.snap = &Snapshot{File: cur.File, Config: eff, State: next, Policies: policies, Policy: compiled, Generation: cur.Generation + 1}
	e.publish(e.snap, Change{Kind: ChangePlaced, Project: p.Name, Projects: []string{p.Name}})
	return p, true, nil
}

func samePlacement(a, b state.Project) bool {
	eq := func(x, y *uint32) bool { return (x == nil) == (y == nil) && (x == nil || *x == *y) }
	return a.Name == b.Name && a.TAP == b.TAP && a.Subnet == b.Subnet && a.MAC == b.MAC && a.SSHPort == b.SSHPort &&
		a.Egress == b.Egress && eq(a.Owner, b.Owner) && eq(a.Group, b.Group)
}

// applyProject brings the ruleset from project old (placed, with its policy
// in oldEff) to new (with its policy in eff), either nil: absent, with all
// the projects being st: only the changed elements when interception is
// installed, the whole ruleset otherwise (a TAP never comes up unfiltered).
// It returns how to undo it.
func (e *Engine) applyProject(ctx context.Context, oldEff *config.Config, oldPol *policy.Policy, eff *config.Config, pol *policy.Policy, st *state.State, old, new *state.Project) (undo func(), err error) {
	fw := e.Interception.Firewall
	if fw == nil {
		return func() {}, nil
	}
	if !e.installed {
		ok, err := fw.Installed(ctx)
		if err != nil {
			return nil, err
		}
		if !ok {
			if err := e.Interception.Install(ctx, eff, st, pol); err != nil {
				return nil, err
			}
			return func() {}, nil // the ruleset stays: removing it would open nothing, it only filters
		}
	}
	from, to := projectPart(oldEff, oldPol, old), projectPart(eff, pol, new)
	if from.String() == to.String() {
		return func() {}, e.settleIfDaemonless(ctx, eff, pol, from, to)
	}
	return e.moveAndSettle(ctx, from, to, eff, pol, st)
}

// moveAndSettle moves the elements (moveElements) and, in an engine that
// did not install the interception, settles what the daemon that did
// would have (settleDaemonless), undoing the move when that fails.
func (e *Engine) moveAndSettle(ctx context.Context, from, to firewall.State, eff *config.Config, pol *policy.Policy, st *state.State) (undo func(), err error) {
	undo, err = e.moveElements(ctx, from, to, eff, pol, st)
	if err != nil {
		return undo, err
	}
	if err := e.settleIfDaemonless(ctx, eff, pol, from, to); err != nil {
		undo()
		return nil, err
	}
	return undo, nil
}

// settleIfDaemonless settles (settleDaemonless) in an engine that did not
// install the interception; the daemon's own does nothing here. Called
// even when the elements stay the same: any change of a project's policy
// withdraws what the resolver admitted for it.
func (e *Engine) settleIfDaemonless(ctx context.Context, eff *config.Config, pol *policy.Policy, from, to firewall.State) error {
	if e.installed {
		return nil
	}
	return e.settleDaemonless(ctx, eff, pol, from, to)
}

// settleDaemonless does for a change of the guests of from and to what a
// running daemon does after it, when the interception a stopped daemon
// left is in place and the CLI's engine changes it: the addresses the
// resolver admitted for those guests are withdrawn (no resolver is running
// to vouch for them: fail closed, as on a daemon restart, whose new ruleset
// holds none), and their open kernel-forwarded flows that pol, without the
// resolver's answers, no longer allows are cut (on_policy_change: drop), so
// a revoked cidr or tcp rule, or a /30 handed to another project, leaves
// nothing open.
func (e *Engine) settleDaemonless(ctx context.Context, eff *config.Config, pol *policy.Policy, from, to firewall.State) error {
	guests := map[netip.Addr]bool{}
	var list []netip.Addr
	for _, g := range append(append([]firewall.Guest(nil), from.Guests...), to.Guests...) {
		if !guests[g.Addr] {
			guests[g.Addr] = true
			list = append(list, g.Addr)
		}
	}
	if len(list) == 0 {
		return nil
	}
	if err := e.Interception.Firewall.UnadmitGuests(ctx, list); err != nil {
		return err
	}
	if e.Flows == nil || eff.OnPolicyChange == "keep" {
		return nil
	}
	n, err := e.Flows.Revoke(func(f ctflow.Flow) bool {
		if !guests[f.Src.Addr()] {
			return true
		}
		return pol.KernelForwards(f.Src.Addr(), f.Dst, nil)
	})
	if n > 0 {
		e.log().Info("cut kernel-forwarded flows the change no longer allows", "flows", n)
	}
	if err != nil {
		return fmt.Errorf("cutting kernel-forwarded flows the change no longer allows: %w", err)
	}
	return nil
}

// projectPart is the desired state of the placed project p alone (nil:
// nothing), its kernel part from its policy in eff, compiled in pol.
func projectPart(eff *config.Config, pol *policy.Policy, p *state.Project) firewall.State {
	c := *eff
	c.Projects = nil
	s := &state.State{Projects: map[string]state.Project{}}
	if p != nil {
		s.Projects[p.Name] = *p
		if cp := eff.Project(p.Name); cp != nil {
			q := *cp
			q.Subnet = p.Subnet
			c.Projects = []config.Project{q}
		}
	}
	return firewall.Desired(&c, s, pol)
}

// applyPolicy brings the ruleset's elements of the projects named from
// their policies in oldEff (compiled: oldPol) to those in eff (pol), the
// placements being st's, or the config's subnets. It returns how to undo it.
func (e *Engine) applyPolicy(ctx context.Context, oldEff *config.Config, oldPol *policy.Policy, eff *config.Config, pol *policy.Policy, st *state.State, names []string) (undo func(), err error) {
	fw := e.Interception.Firewall
	if fw == nil {
		return func() {}, nil
	}
	if !e.installed {
		// The CLI's engine: a stopped daemon's interception, if one is
		// in place, follows the change (with none, nothing is
		// intercepted and nothing is to change).
		ok, err := fw.Installed(ctx)
		if err != nil || !ok {
			return func() {}, err
		}
	}
	part := func(c *config.Config, pol *policy.Policy) firewall.State {
		out := *c
		out.Projects = nil
		for _, n := range names {
			if cp := c.Project(n); cp != nil {
				out.Projects = append(out.Projects, *cp)
			}
		}
		sub := &state.State{Projects: map[string]state.Project{}}
		for _, n := range names {
			if p, ok := placed(st, n); ok {
				sub.Projects[n] = p
			}
		}
		return firewall.Desired(&out, sub, pol)
	}
	from, to := part(oldEff, oldPol), part(eff, pol)
	if from.String() == to.String() {
		return func() {}, e.settleIfDaemonless(ctx, eff, pol, from, to)
	}
	return e.moveAndSettle(ctx, from, to, eff, pol, st)
}

// moveElements brings the ruleset's per-project elements from from to to
// (the whole ruleset when that needs new rules), then the guard's
// forwarding settings, and returns how to undo it.
func (e *Engine) moveElements(ctx context.Context, from, to firewall.State, eff *config.Config, pol *policy.Policy, st *state.State) (undo func(), err error) {
	if full, err := e.updateElements(ctx, from, to, eff, pol, st); err != nil || full != nil {
		return full, err
	}
	if err := e.Interception.guard(eff, st); err != nil {
		return nil, err
	}
	e.refreshApplied(ctx)
	return func() {
		if err := e.Interception.Firewall.UpdateProjects(ctx, to, from); err != nil {
			e.log().Error("rolling back the ruleset's project elements", "err", err.Error())
		}
		e.refreshApplied(ctx)
	}, nil
}

// updateElements moves the ruleset's elements from from to to. When the
// change needs new rules (a max_connections value no guest had), it
// installs the whole ruleset for eff and st instead and returns how to undo
// that (full non-nil).
func (e *Engine) updateElements(ctx context.Context, from, to firewall.State, eff *config.Config, pol *policy.Policy, st *state.State) (full func(), err error) {
	err = e.Interception.Firewall.UpdateProjects(ctx, from, to)
	if !errors.Is(err, firewall.ErrNewLimit) {
		return nil, err
	}
	prev := e.snap
	if err := e.install(ctx, eff, st, pol); err != nil {
		return nil, err
	}
	return func() {
		if err := e.install(ctx, prev.Config, prev.State, prev.Policy); err != nil {
			e.log().Error("rolling back the ruleset", "err", err.Error())
		}
	}, nil
}

func (e *Engine) refreshApplied(ctx context.Context) {
	if !e.installed {
		return
	}
	if snap, err := e.Interception.Firewall.Snapshot(ctx); err == nil {
		e.applied = snap
	}
}

// ErrNotFound: no such project.
var ErrNotFound = errors.New("no such project")

// Remove takes a project off the host: its ruleset elements, its TAP (only
// one vmegress made for it), its state record and its policy. found is false
// when it was not placed (nothing to do).
func (e *Engine) Remove(ctx context.Context, name string) (p state.Project, found bool, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	cur := e.snap
	p, found = cur.State.Projects[name]
	if !found {
		if _, ok := cur.Policies[name]; ok {
			// An API policy of a project not placed (any more): it goes too.
			return p, true, e.dropPolicy(ctx, name)
		}
		return p, false, nil
	}
	next := cur.State.Without(name)
	policies := cur.Policies
	if _, ok := policies[name]; ok {
		policies = withoutPolicy(policies, name)
	}
	var eff *config.Config
	if cur.File.Project(name) == nil && cur.Config != cur.File {
		// Not the file's: the merge loses that one entry.
		c := *cur.Config
		c.Projects = slices.DeleteFunc(slices.Clone(cur.Config.Projects), func(q config.Project) bool { return q.Name == name })
		eff = &c
	} else if eff, err = EffectiveWith(cur.File, next, policies); err != nil {
		return p, true, err
	}
	var changed []config.Project
	var removed []string
	if cp := eff.Project(name); cp != nil {
		changed = append(changed, *cp) // the config still names it: unplaced
	} else {
		removed = append(removed, name)
	}
	pol, err := cur.Policy.Update(changed, removed)
	if err != nil {
		return p, true, err
	}
	restore, err := e.applyProject(ctx, cur.Config, cur.Policy, eff, pol, next, &p, nil)
	if err != nil {
		return p, true, err
	}
	if e.Host != nil {
		if err := e.Host.DeleteTAP(p.TAP, p.Name); errors.Is(err, hostnet.ErrNotOurs) {
			// Never delete what vmegress did not create: the record goes, the interface stays.
			e.log().Warn("leaving the interface in place", "tap", p.TAP, "err", err.Error())
		} else if err != nil {
			restore()
			return p, true, err
		}
	}
	if err := e.Store.Save(next); err != nil {
		// The TAP is gone and the elements too: the state must say so, or
		// the next start re-creates a project its owner removed. Report it.
		return p, true, fmt.Errorf("project %s is off the host but the state still lists it: %w", name, err)
	}
	if err := e.Store.RemovePolicy(name); err != nil {
		e.log().Error("removing a removed project's policy", "project", name, "err", err.Error())
	}
	e.snap = &Snapshot{File: cur.File, Config: eff, State: next, Policies: policies, Policy: pol, Generation: cur.Generation + 1}
	e.publish(e.snap, Change{Kind: ChangeRemoved, Project: name, Projects: []string{name}})
	return p, true, nil
}

// SetConfig swaps in a newly loaded config file: only the projects whose
// effective policy changed are recompiled, the ruleset is applied only if
// its desired state changed. An error leaves the previous snapshot in force.
func (e *Engine) SetConfig(ctx context.Context, file *config.Config) (changedProjects []string, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	cur := e.snap
	if err := Reloadable(cur.File, file); err != nil {
		return nil, err
	}
	eff, err := EffectiveWith(file, cur.State, cur.Policies)
	if err != nil {
		return nil, err
	}
	changed, removed := diffProjects(cur.Config.Projects, eff.Projects)
	for i := range changed {
		changedProjects = append(changedProjects, changed[i].Name)
	}
	changedProjects = append(changedProjects, removed...)
	slices.Sort(changedProjects)
	pol, err := cur.Policy.Update(changed, removed)
	if err != nil {
		return nil, err
	}
	if e.installed {
		// Only the per-project elements changed: element by element;
		// anything else: the whole ruleset, atomically.
		from, to := firewall.Desired(cur.Config, cur.State, cur.Policy), firewall.Desired(eff, cur.State, pol)
		switch {
		case from.Global() != to.Global():
			if err := e.install(ctx, eff, cur.State, pol); err != nil {
				return nil, err
			}
		case from.String() != to.String():
			if _, err := e.updateElements(ctx, from, to, eff, pol, cur.State); err != nil {
				return nil, err
			}
			if err := e.Interception.guard(eff, cur.State); err != nil {
				return nil, err
			}
			e.refreshApplied(ctx)
		}
	}
	e.snap = &Snapshot{File: file, Config: eff, State: cur.State, Policies: cur.Policies, Policy: pol, Generation: cur.Generation + 1}
	e.publish(e.snap, Change{Kind: ChangeConfig, Projects: changedProjects})
	return changedProjects, nil
}

// diffProjects returns the projects of to that are new or compile
// differently than in from, and the names of from's projects that to lacks.
// Merged configs list projects in a stable order, so it compares position
// by position and builds a map by name only from the first position where
// the names part.
func diffProjects(from, to []config.Project) (changed []config.Project, removed []string) {
	i := 0
	for ; i < len(from) && i < len(to) && from[i].Name == to[i].Name; i++ {
		if !SameProject(from[i], to[i]) {
			changed = append(changed, to[i])
		}
	}
	if i == len(from) && i == len(to) {
		return changed, nil
	}
	oldBy := make(map[string]*config.Project, len(from)-i)
	for j := i; j < len(from); j++ {
		oldBy[from[j].Name] = &from[j]
	}
	for j := i; j < len(to); j++ {
		p := &to[j]
		o, ok := oldBy[p.Name]
		if !ok || !SameProject(*o, *p) {
			changed = append(changed, *p)
		}
		delete(oldBy, p.Name)
	}
	for name := range oldBy {
		removed = append(removed, name)
	}
	slices.Sort(removed)
	return changed, removed
}

// SameProject reports whether two projects compile to the same policy.
func SameProject(a, b config.Project) bool {
	return a.Name == b.Name && a.Subnet == b.Subnet && a.Mode == b.Mode && a.MaxConnections == b.MaxConnections &&
		config.SameRules(a.Allow, b.Allow) && config.SameRules(a.Deny, b.Deny)
}

// Reloadable refuses changes that need a restart (listening sockets, the
// data plane, the firewall backend).
func Reloadable(old, cfg *config.Config) error {
	switch {
	case old.TProxyPort != cfg.TProxyPort, old.DNSPort != cfg.DNSPort, old.Admin != cfg.Admin, old.Upstream != cfg.Upstream,
		old.Dataplane != cfg.Dataplane, old.EnvoyBinary != cfg.EnvoyBinary, old.Firewall != cfg.Firewall,
		old.APISocket != cfg.APISocket, old.APIGroup != cfg.APIGroup:
		return errors.New("tproxy_port, dns_port, admin, upstream, dataplane, envoy, firewall, api_socket and api_group change only with a restart")
	}
	return nil
}

// RepairDrift puts the interception back when the ruleset or the policy
// routing changed behind the engine's back (what names what was repaired;
// "" when nothing was). Only an engine that installed the interception
// (Open with install) repairs it.
func (e *Engine) RepairDrift(ctx context.Context) (what string, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.installed {
		return "", nil
	}
	cur := e.snap
	// New guest interfaces (and ones a global ip_forward write reset) get
	// their forwarding turned off.
	if err := e.Interception.guard(cur.Config, cur.State); err != nil {
		return "", err
	}
	snap, err := e.Interception.Firewall.Snapshot(ctx)
	if err != nil {
		return "", err
	}
	pr := Routing(cur.Config)
	routed, err := pr.Installed(e.Interception.Netlink)
	if err != nil {
		return "", err
	}
	if snap == e.applied && routed {
		return "", nil
	}
	what = "policy routing"
	if snap != e.applied {
		what = e.Interception.Firewall.Describe()
	}
	return what, e.install(ctx, cur.Config, cur.State, cur.Policy)
}

// RestoreNAT switches every placed project to the spec's direct NAT egress
// (unfiltered) and removes the interception but the NAT rules (spec 6.8
// step 4). It returns the projects switched.
func (e *Engine) RestoreNAT(ctx context.Context, setForwarding func(tap string) error) ([]state.Project, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	cur := e.snap
	next := cur.State.Clone()
	for n, p := range next.Projects {
		p.Egress = state.EgressNAT
		next.Projects[n] = p
	}
	eff, err := EffectiveWith(cur.File, next, cur.Policies)
	if err != nil {
		return nil, err
	}
	if err := e.Store.Save(next); err != nil {
		return nil, err
	}
	// Every project is NAT now: no guest has a kernel part to compile.
	if err := e.Interception.Firewall.Apply(ctx, firewall.Desired(eff, next, nil)); err != nil {
		return nil, err
	}
	if err := (hostnet.PolicyRouting{}).Remove(e.Interception.Netlink); err != nil {
		return nil, err
	}
	if e.Interception.Guard != nil {
		if err := e.Interception.Guard.Restore(); err != nil {
			return nil, err
		}
	}
	sorted := next.Sorted()
	for _, p := range sorted {
		if err := setForwarding(p.TAP); err != nil {
			return nil, err
		}
	}
	pol, err := policy.Compile(eff)
	if err != nil {
		return nil, err
	}
	e.snap = &Snapshot{File: cur.File, Config: eff, State: next, Policies: cur.Policies, Policy: pol, Generation: cur.Generation + 1}
	e.publish(e.snap, Change{Kind: ChangeNAT})
	return sorted, nil
}

// withPolicy and withoutPolicy copy with maps.Clone, which copies the
// map's table whole (thousands of projects) instead of inserting one by one.
func withPolicy(m map[string]config.Project, p config.Project) map[string]config.Project {
	out := maps.Clone(m)
	if out == nil {
		out = map[string]config.Project{}
	}
	out[p.Name] = p
	return out
}

func withoutPolicy(m map[string]config.Project, name string) map[string]config.Project {
	out := maps.Clone(m)
	delete(out, name)
	return out
}

func (e *Engine) savePolicy(p config.Project) error {
	b, err := json.Marshal(config.PolicyDocument(p))
	if err != nil {
		return fmt.Errorf("encoding the policy of %s: %w", p.Name, err)
	}
	return e.Store.SavePolicy(p.Name, b)
}

// restorePolicy puts a project's policy file back as it was (rollback).
func (e *Engine) restorePolicy(name string, old config.Project, had bool) {
	var err error
	if had {
		err = e.savePolicy(old)
	} else {
		err = e.Store.RemovePolicy(name)
	}
	if err != nil {
		e.log().Error("rolling back the policy file", "project", name, "err", err.Error())
	}
}

// loadPolicies reads the API projects' policies. One that does not parse
// (a file edited by hand) is left out with an error logged: its project
// then allows nothing, never more than it did.
func (e *Engine) loadPolicies() (map[string]config.Project, error) {
	return LoadPolicies(e.Store, func(name string, err error) {
		e.log().Error("an API project's policy does not parse; the project allows nothing until its policy is set again", "project", name, "err", err.Error())
	})
}

// SetPolicy replaces the policy of a project the API owns: persisted, then
// compiled (that project only) and handed to the consumers, so new
// connections are decided by it when SetPolicy returns. A project the
// config file names is the file's (a conflict); one neither placed nor
// known is ErrNotFound.
func (e *Engine) SetPolicy(ctx context.Context, p config.Project) (generation uint64, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	cur := e.snap
	if cur.File.Project(p.Name) != nil {
		return 0, &placement.Conflict{Err: fmt.Errorf("project %s is owned by the config file %s: change its policy there", p.Name, cur.File.Path)}
	}
	if err := planeSupports(cur.File, p); err != nil {
		return 0, err
	}
	_, placed := cur.State.Projects[p.Name]
	old, had := cur.Policies[p.Name]
	if !placed && !had {
		return 0, fmt.Errorf("project %s: %w", p.Name, ErrNotFound)
	}
	if had && SameProject(old, p) {
		return cur.Generation, nil
	}
	policies := withPolicy(cur.Policies, p)
	// The project keeps its place: only its entry of the merged config
	// changes (EffectiveWith would rebuild all of them).
	eff, ok := replacePolicy(cur.Config, p)
	if !ok {
		if eff, err = EffectiveWith(cur.File, cur.State, policies); err != nil {
			return 0, err
		}
	}
	compiled, err := cur.Policy.Update([]config.Project{*eff.Project(p.Name)}, nil)
	if err != nil {
		return 0, err
	}
	undo, err := e.applyPolicy(ctx, cur.Config, cur.Policy, eff, compiled, cur.State, []string{p.Name})
	if err != nil {
		return 0, err
	}
	if err := e.savePolicy(p); err != nil {
		undo()
		return 0, err
	}
	e.snap = &Snapshot{File: cur.File, Config: eff, State: cur.State, Policies: policies, Policy: compiled, Generation: cur.Generation + 1}
	e.publish(e.snap, Change{Kind: ChangePolicy, Project: p.Name, Projects: []string{p.Name}})
	return e.snap.Generation, nil
}

// planeSupports refuses a policy the data plane cannot carry out (Envoy has
// no audit mode, ...), as the config file's loader does.
func planeSupports(file *config.Config, p config.Project) error {
	if file.Dataplane != "envoy" {
		return nil
	}
	if is := p.EnvoyIssues(); len(is) > 0 {
		return &placement.Invalid{Field: "policy." + is[0].Field, Err: errors.New(is[0].Msg)}
	}
	return nil
}

// dropPolicy removes an unplaced API project's policy. The caller holds e.mu.
func (e *Engine) dropPolicy(ctx context.Context, name string) error {
	cur := e.snap
	policies := withoutPolicy(cur.Policies, name)
	eff, err := EffectiveWith(cur.File, cur.State, policies)
	if err != nil {
		return err
	}
	var changed []config.Project
	var removed []string
	if cp := eff.Project(name); cp != nil {
		changed = append(changed, *cp)
	} else {
		removed = append(removed, name)
	}
	pol, err := cur.Policy.Update(changed, removed)
	if err != nil {
		return err
	}
	if err := e.Store.RemovePolicy(name); err != nil {
		return err
	}
	e.snap = &Snapshot{File: cur.File, Config: eff, State: cur.State, Policies: policies, Policy: pol, Generation: cur.Generation + 1}
	e.publish(e.snap, Change{Kind: ChangeRemoved, Project: name, Projects: []string{name}})
	return nil
}

// LoadPolicies reads the API projects' policies from store, as the engine
// does at start; one that does not parse is left out and reported to bad
// (may be nil).
func LoadPolicies(store state.Store, bad func(name string, err error)) (map[string]config.Project, error) {
	raw, err := store.LoadPolicies()
	if err != nil {
		return nil, err
	}
	out := make(map[string]config.Project, len(raw))
	for name, b := range raw {
		p, err := config.ParsePolicy(store.PolicyPath(name), name, b)
		if err != nil {
			if bad != nil {
				bad(name, err)
			}
			continue
		}
		out[name] = p
	}
	return out, nil
}
