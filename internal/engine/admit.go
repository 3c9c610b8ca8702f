package engine

import (
	"context"
	"net/netip"
	"sync"
	"time"

	"github.com/vmegress/vmegress/internal/dest"
	"github.com/vmegress/vmegress/internal/firewall"
)

// admission is one resolver answer that admitted an address on a port
// for a project's guest (a tcp rule's name).
type admission struct {
	project, name string
	guest, addr   netip.Addr
	port          uint16
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
// into the ruleset, on every port where a tcp rule allows name and the
// kernel decides (policy.Kernel.TCP), until ttl plus dest.Grace: the guest's
// connections there are then forwarded by the kernel on either data plane.
// It returns once the ruleset holds them, so the answer may leave. Only an
// engine that installed the interception (the daemon) admits.
func (e *Engine) Admit(ctx context.Context, project, name string, addrs []netip.Addr, ttl time.Duration) error {
	snap := e.Snapshot()
	if !e.isInstalled() || snap == nil || len(addrs) == 0 {
		return nil
	}
	pr := snap.Policy.Project(project)
	if pr == nil || !pr.Subnet.IsValid() {
		return nil
	}
	k := pr.Kernel()
	if len(k.TCP) == 0 {
		return nil
	}
	guest := pr.Subnet.Masked().Addr().Next().Next()
	life := ttl + dest.Grace
	exp := time.Now().Add(life)
	var es []firewall.Admitted
	e.adm.mu.Lock()
	if e.adm.m == nil {
		e.adm.m = map[admission]time.Time{}
	}
	for _, port := range k.TCP {
		if _, ok := pr.TCPAllows(name, port); !ok {
			continue
		}
		for _, a := range addrs {
			a = a.Unmap()
			if !a.Is4() {
				continue
			}
			e.adm.m[admission{project, name, guest, a, port}] = exp
			es = append(es, firewall.Admitted{Guest: guest, Addr: a, Port: port, TTL: life})
		}
	}
	e.adm.mu.Unlock()
	if err := e.Interception.Firewall.Admit(ctx, es); err != nil {
		return err
	}
	return e.recheck(ctx, snap, project, name, es)
}

// recheck withdraws the elements es an Admit decided under snap put in
// the ruleset when a policy change was reconciled meanwhile (after snap)
// and no longer allows them. The change's reconcile withdrew only what was
// recorded and installed when it ran: the admission may have been recorded
// after it, or its elements installed after its withdrawal; either way they
// would stay until their TTL (one the name's owner chooses) plus grace.
func (e *Engine) recheck(ctx context.Context, snap *Snapshot, project, name string, es []firewall.Admitted) error {
	e.adm.mu.Lock()
	last := e.adm.last
	if last == nil || last.Generation <= snap.Generation {
		e.adm.mu.Unlock()
		return nil
	}
	var stale []firewall.Admitted
	for _, el := range es {
		a := admission{project, name, el.Guest, el.Addr, el.Port}
		if !admits(last, a) {
			delete(e.adm.m, a)
			stale = append(stale, firewall.Admitted{Guest: el.Guest, Addr: el.Addr, Port: el.Port})
		}
	}
	kept := map[firewall.Admitted]bool{} // another name still admits it
	for a := range e.adm.m {
		kept[firewall.Admitted{Guest: a.guest, Addr: a.addr, Port: a.port}] = true
	}
	e.adm.mu.Unlock()
	var out []firewall.Admitted
	for _, el := range stale {
		if !kept[el] {
			out = append(out, el)
		}
	}
	return e.Interception.Firewall.Unadmit(ctx, out)
}

// admits reports whether s's policy still admits a.
func admits(s *Snapshot, a admission) bool {
	pr := s.Policy.Project(a.project)
	if pr == nil || !pr.Subnet.IsValid() || pr.Subnet.Masked().Addr().Next().Next() != a.guest {
		return false
	}
	_, ok := pr.TCPAllows(a.name, a.port)
	return ok
}

func (e *Engine) isInstalled() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.installed
}

// reconcileAdmitted withdraws the admitted elements that s no longer
// allows (the project's policy, place or existence changed) and forgets
// expired ones. The caller holds e.mu.
func (e *Engine) reconcileAdmitted(ctx context.Context, s *Snapshot) {
	e.adm.mu.Lock()
	e.adm.last = s
	now := time.Now()
	type key struct {
		guest, addr netip.Addr
		port        uint16
	}
	keep, drop := map[key]bool{}, map[key]bool{}
	for a, exp := range e.adm.m {
		k := key{a.guest, a.addr, a.port}
		if now.After(exp) {
			delete(e.adm.m, a)
			continue
		}
		if admits(s, a) {
			keep[k] = true
		} else {
			drop[k] = true
			delete(e.adm.m, a)
		}
	}
	e.adm.mu.Unlock()
	var es []firewall.Admitted
	for k := range drop {
		if !keep[k] { // another name still admits it
			es = append(es, firewall.Admitted{Guest: k.guest, Addr: k.addr, Port: k.port})
		}
	}
	if err := e.Interception.Firewall.Unadmit(ctx, es); err != nil {
		e.log().Error("withdrawing resolved addresses the new policy does not allow", "err", err.Error())
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
			es = append(es, firewall.Admitted{Guest: a.guest, Addr: a.addr, Port: a.port, TTL: left})
		} else {
			delete(e.adm.m, a)
		}
	}
	e.adm.mu.Unlock()
	return e.Interception.Firewall.Admit(ctx, es)
}
