package engine

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vmegress/vmegress/internal/dest"
	"github.com/vmegress/vmegress/internal/firewall"
	"github.com/vmegress/vmegress/internal/policy"
)

// admission is one resolver answer that admitted an address on a port
// for a project's guest (a tcp rule's name).
type admission struct {
	project, name string
	guest, addr   netip.Addr
	port          uint16 // 0 with all
	deny, all     bool
}

func (a admission) element(ttl time.Duration) firewall.Admitted {
	return firewall.Admitted{Guest: a.guest, Addr: a.addr, Port: a.port, TTL: ttl, Deny: a.deny, AllPorts: a.all}
}

// allowed reports whether pr (the project's policy now) still makes a.
func (a admission) allowed(pr *policy.Project) bool {
	if pr == nil || !pr.Subnet.IsValid() || pr.Subnet.Masked().Addr().Next().Next() != a.guest {
		return false
	}
	if a.deny {
		_, ports, ok := pr.TCPDenies(a.name)
		return ok && (a.all == (ports == nil)) && (a.all || slices.Contains(ports, a.port))
	}
	_, ok := pr.TCPAllows(a.name, a.port)
	_, denied, isDenied := pr.TCPDenies(a.name)
	return ok && !(isDenied && (denied == nil || slices.Contains(denied, a.port)))
}

// admissions remembers what Admit put in the ruleset, so a policy change
// withdraws what the new policy no longer allows and a reinstalled ruleset
// gets it back. Guarded by its own lock: DNS answers do not wait for the
// engine's changes.
type admissions struct {
	mu sync.Mutex
	m  map[admission]time.Time // expiry
	// last is the snapshot the admissions were last reconciled with: an
	// Admit decided under an older one checks its elements again (a policy
	// change may have run between its decision and its elements).
	last *Snapshot
}

// Admit puts the addresses the resolver is about to hand project for name
// into the ruleset, until ttl plus dest.Grace: on every port where a tcp
// rule allows name (the guest's connections there are then forwarded by the
// kernel, on either data plane), and, when a tcp deny rule matches name, as
// refusals on the deny rule's ports (checked before any allow, as
// ConnectWith weighs them). It returns once the ruleset holds them, so the
// answer may leave. Only an engine that installed the interception (the
// daemon) admits.
func (e *Engine) Admit(ctx context.Context, project, name string, addrs []netip.Addr, ttl time.Duration) error {
	snap := e.Snapshot()
	if !e.isInstalled() || snap == nil || len(addrs) == 0 {
		return nil
	}
	pr := snap.Policy.Project(project)
	if pr == nil || !pr.Subnet.IsValid() || pr.Audit {
		return nil
	}
	want := admissionsFor(pr, name)
	if len(want) == 0 {
		return nil
	}
	life := ttl + dest.Grace
	exp := time.Now().Add(life)
	var es []firewall.Admitted
	var made []admission
	e.adm.mu.Lock()
	if e.adm.m == nil {
		e.adm.m = map[admission]time.Time{}
	}
	for _, a := range addrs {
		a = a.Unmap()
		if !a.Is4() {
			continue
		}
		for _, m := range want {
			m.addr = a
			e.adm.m[m] = exp
			made = append(made, m)
			es = append(es, m.element(life))
		}
	}
	e.adm.mu.Unlock()
	if err := e.Interception.Firewall.Admit(ctx, es); err != nil {
		return err
	}
	return e.recheck(ctx, snap, made)
}

// recheck withdraws the elements an Admit decided under snap (made) when a
// policy change was reconciled meanwhile (after snap) and no longer makes
// them. That change's reconcile withdrew only what was recorded and
// installed when it ran: the admission may have been recorded after it, or
// its elements installed after its withdrawal; either way they would stay
// until their TTL (one the name's owner chooses) plus grace.
func (e *Engine) recheck(ctx context.Context, snap *Snapshot, made []admission) error {
	e.adm.mu.Lock()
	last := e.adm.last
	if last == nil || last.Generation <= snap.Generation {
		e.adm.mu.Unlock()
		return nil
	}
	type key struct {
		guest, addr netip.Addr
		port        uint16
		deny, all   bool
	}
	keyOf := func(a admission) key { return key{a.guest, a.addr, a.port, a.deny, a.all} }
	var stale []admission
	for _, a := range made {
		if !a.allowed(last.Policy.Project(a.project)) {
			delete(e.adm.m, a)
			stale = append(stale, a)
		}
	}
	kept := map[key]bool{} // another name still makes it
	for a := range e.adm.m {
		kept[keyOf(a)] = true
	}
	e.adm.mu.Unlock()
	var out []firewall.Admitted
	for _, a := range stale {
		if !kept[keyOf(a)] {
			out = append(out, a.element(0))
		}
	}
	return e.Interception.Firewall.Unadmit(ctx, out)
}

// admissionsFor are the elements (address left zero) an answer for name
// makes for pr's guest: refusals where a tcp deny rule matches name, then
// admissions on the tcp allow rules' ports a deny does not cover.
func admissionsFor(pr *policy.Project, name string) []admission {
	guest := pr.Subnet.Masked().Addr().Next().Next()
	var out []admission
	_, denied, isDenied := pr.TCPDenies(name)
	if isDenied {
		if denied == nil {
			return []admission{{project: pr.Name, name: name, guest: guest, deny: true, all: true}}
		}
		for _, p := range denied {
			out = append(out, admission{project: pr.Name, name: name, guest: guest, port: p, deny: true})
		}
	}
	for _, port := range pr.Kernel().TCP {
		if _, ok := pr.TCPAllows(name, port); ok && !slices.Contains(denied, port) {
			out = append(out, admission{project: pr.Name, name: name, guest: guest, port: port})
		}
	}
	return out
}

func (e *Engine) isInstalled() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.installed
}

// reconcileAdmitted withdraws the admitted elements that s no longer
// makes (the project's policy, place or existence changed), forgets
// expired ones, and makes what the resolver's answers to projects (those
// the change touched) make under s. The caller holds e.mu.
func (e *Engine) reconcileAdmitted(ctx context.Context, s *Snapshot, projects []string) {
	e.adm.mu.Lock()
	e.adm.last = s
	if e.adm.m == nil {
		e.adm.m = map[admission]time.Time{}
	}
	now := time.Now()
	type key struct {
		guest, addr netip.Addr
		port        uint16
		deny, all   bool
	}
	keyOf := func(a admission) key { return key{a.guest, a.addr, a.port, a.deny, a.all} }
	keep, drop := map[key]bool{}, map[key]admission{}
	for a, exp := range e.adm.m {
		if now.After(exp) {
			delete(e.adm.m, a)
			continue
		}
		if a.allowed(s.Policy.Project(a.project)) {
			keep[keyOf(a)] = true
		} else {
			drop[keyOf(a)] = a
			delete(e.adm.m, a)
		}
	}
	// What the resolver has handed the changed projects makes, under their
	// new policies, elements that were not made before (a new tcp deny
	// rule bars addresses handed out earlier; a new tcp rule admits them).
	var add []firewall.Admitted
	if e.Answers != nil {
		for _, name := range projects {
			pr := s.Policy.Project(name)
			if pr == nil || !pr.Subnet.IsValid() || pr.Audit {
				continue
			}
			e.Answers.Each(name, func(addr netip.Addr, n string, exp time.Time) {
				if !addr.Is4() {
					return
				}
				for _, m := range admissionsFor(pr, n) {
					m.addr = addr
					if _, had := e.adm.m[m]; !had {
						e.adm.m[m] = exp
						add = append(add, m.element(exp.Sub(now)))
					}
				}
			})
		}
	}
	e.adm.mu.Unlock()
	var es []firewall.Admitted
	for k, a := range drop {
		if !keep[k] { // another name still makes it
			es = append(es, a.element(0))
		}
	}
	if err := e.Interception.Firewall.Unadmit(ctx, es); err != nil {
		e.log().Error("withdrawing resolved addresses the new policy does not allow", "err", err.Error())
	}
	if err := e.Interception.Firewall.Admit(ctx, add); err != nil {
		e.log().Error("admitting resolved addresses under the new policy", "err", err.Error())
	}
}

// readmit puts every unexpired admitted element back (after the whole
// ruleset was installed again). The caller holds e.mu.
func (e *Engine) readmit(ctx context.Context) error {
	e.adm.mu.Lock()
	now := time.Now()
	var es []firewall.Admitted
	for a, exp := range e.adm.m {
		if left := exp.Sub(now); left > 0 {
			es = append(es, a.element(left))
		} else {
			delete(e.adm.m, a)
		}
	}
	e.adm.mu.Unlock()
	return e.Interception.Firewall.Admit(ctx, es)
}

// SetAnswers gives the engine the resolver's record (see Engine.Answers),
// safe while the engine runs.
func (e *Engine) SetAnswers(a *dest.Answers) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.Answers = a
}
