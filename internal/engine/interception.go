package engine

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/firewall"
	"github.com/vmegress/vmegress/internal/hostnet"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/state"
)

// Firewall is the backend the engine drives: apply, clean up, and read back.
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
	// NAT egress and inbound SSH need the kernel to route what the TAP
	// sends, and so do the flows the ruleset forwards for cidr rules.
	in.Guard.Exclude, in.Guard.ExcludeAddrs = Forwarding(cfg, st)
	if _, err := in.Guard.Apply(); err != nil {
		return fmt.Errorf("turning forwarding off on guest interfaces: %w", err)
	}
	return nil
}

// Install makes the host's interception match cfg. It replaces whatever a
// previous (possibly crashed) run left, in one atomic ruleset transaction.
// The ruleset goes first: with it in place and no routing, guest traffic is
// dropped, never forwarded.
func (in Interception) Install(ctx context.Context, cfg *config.Config, st *state.State, pol *policy.Policy) error {
	if err := in.Firewall.Apply(ctx, firewall.Desired(cfg, st, pol)); err != nil {
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
	pr := Routing(cfg)
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

// Forwarding returns the guest interfaces that need IPv4 forwarding on:
// by name (vmegress's TAPs) and by the host address they hold (interfaces
// made by someone else for a config subnet). NAT egress, inbound SSH and
// the flows the ruleset forwards for cidr rules need it; the routing lock
// and the ruleset decide what is forwarded.
func Forwarding(cfg *config.Config, st *state.State) (taps []string, hostAddrs []netip.Addr) {
	if st != nil {
		for _, p := range st.Projects {
			if p.Egress == state.EgressNAT || p.SSHPort != 0 {
				taps = append(taps, p.TAP)
			}
		}
	}
	for i := range cfg.Projects {
		cp := &cfg.Projects[i]
		if !cp.Subnet.IsValid() || !KernelPath(cfg) || !kernelForwards(cp) {
			continue
		}
		if p, ok := placed(st, cp.Name); ok {
			taps = append(taps, p.TAP)
		} else {
			hostAddrs = append(hostAddrs, cp.Subnet.Masked().Addr().Next())
		}
	}
	return taps, hostAddrs
}

// kernelForwards reports whether the ruleset may forward some of the
// project's flows itself (an IPv4 cidr allow rule or a tcp allow rule, not
// in audit mode): its
// guest interface then needs forwarding on. The ruleset decides which flows.
func kernelForwards(cp *config.Project) bool {
	if cp.Mode == "audit" {
		return false
	}
	for _, r := range cp.Allow {
		if r.Kind == config.KindCIDR && r.Prefix.Addr().Is4() || r.Kind == config.KindTCP {
			return true
		}
	}
	return false
}

func placed(st *state.State, name string) (state.Project, bool) {
	if st == nil {
		return state.Project{}, false
	}
	p, ok := st.Projects[name]
	return p, ok
}

// Routing is the policy routing for cfg: TPROXY's local delivery and the
// routing lock over the guest range (only packets the ruleset marked
// firewall.KernelMark are routed on from a guest address).
func Routing(cfg *config.Config) hostnet.PolicyRouting {
	pr := hostnet.PolicyRouting{Mark: cfg.Mark, Table: cfg.RouteTable}
	if KernelPath(cfg) {
		pr.Lock, pr.LockMark = cfg.VMCIDR, firewall.KernelMark
	}
	return pr
}

// KernelPath reports whether cfg's firewall backend carries out cidr rules
// and port refusals itself, and marks what it lets the kernel forward: both
// backends do (nftables with sets, iptables with ipsets).
func KernelPath(*config.Config) bool { return true }
