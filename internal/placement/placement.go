// Package placement decides where a project sits on the host — its TAP name,
// its /30 of vm_cidr, its guest MAC, its SSH port — and describes the result
// for the guest (the kernel ip= argument, Firecracker's network-interfaces
// body). It is pure: the host's facts (addresses and routes already in use)
// come in as data, nothing is read or changed here.
package placement

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vmegress/vmegress/client"
	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/hostnet"
	"github.com/vmegress/vmegress/internal/state"
)

// Request is what a caller asks for one project; zero fields take defaults.
type Request struct {
	Name string
	// TAP is the interface name ("": tap-NAME, hashed when longer than 15).
	TAP string
	// Subnet is a fixed /30 (zero: the config's, else the next free one).
	Subnet       netip.Prefix
	Owner, Group *uint32
	SSHPort      uint16
	// Egress is state.EgressProxy (default) or state.EgressNAT.
	Egress string
}

// HostPrefix is an address or route the host holds outside vmegress's TAPs.
type HostPrefix struct {
	Prefix netip.Prefix
	// Where says what holds it, for messages ("address of docker0", "route via wg0").
	Where string
}

// Invalid is a request that can never succeed as written (exit 2, HTTP 400).
type Invalid struct {
	Field string
	Err   error
}

func (e *Invalid) Error() string { return e.Err.Error() }
func (e *Invalid) Unwrap() error { return e.Err }

// Conflict is a request that collides with something in use (exit 2, HTTP 409).
type Conflict struct{ Err error }

func (e *Conflict) Error() string { return e.Err.Error() }
func (e *Conflict) Unwrap() error { return e.Err }

func invalid(field, format string, args ...any) error {
	return &Invalid{Field: field, Err: fmt.Errorf(format, args...)}
}

func conflict(format string, args ...any) error { return &Conflict{Err: fmt.Errorf(format, args...)} }

// IsInvalid and IsConflict tell the two kinds of refusal apart.
func IsInvalid(err error) bool  { var e *Invalid; return errors.As(err, &e) }
func IsConflict(err error) bool { var e *Conflict; return errors.As(err, &e) }

// Place returns the project req asks for, given the config, the projects
// already placed and the host's own prefixes. A project already placed keeps
// its /30 and MAC; asking to move it is a conflict.
func Place(cfg *config.Config, st *state.State, host []HostPrefix, req Request) (state.Project, error) {
	name := req.Name
	if err := config.ValidProjectName(name); err != nil {
		return state.Project{}, invalid("name", "%v", err)
	}
	egress := req.Egress
	if egress == "" {
		egress = state.EgressProxy
	}
	if egress != state.EgressProxy && egress != state.EgressNAT {
		return state.Project{}, invalid("egress", "egress must be proxy or nat, not %q", egress)
	}
	tap := req.TAP
	if tap == "" {
		tap = state.TAPName(name)
	}
	if err := config.ValidTAPName(tap); err != nil {
		return state.Project{}, invalid("tap", "%v", err)
	}
	if !hostnet.Matches(cfg.GuestInterfaces, tap) {
		// An interface the ruleset does not treat as a guest's would be
		// routed like any other: refuse rather than leave it open.
		return state.Project{}, invalid("tap", "TAP name %q does not match guest_interfaces %v, so its traffic would not be intercepted", tap, cfg.GuestInterfaces)
	}
	want := req.Subnet
	if want.IsValid() && (!want.Addr().Is4() || want.Bits() != 30 || want != want.Masked() || !cfg.VMCIDR.Contains(want.Addr())) {
		return state.Project{}, invalid("subnet", "subnet %s must be a /30 network inside vm_cidr %s", want, cfg.VMCIDR)
	}
	if cp := cfg.Project(name); cp != nil && cp.Subnet.IsValid() {
		if want.IsValid() && want != cp.Subnet {
			return state.Project{}, invalid("subnet", "subnet %s disagrees with project %s's subnet %s in the config", want, name, cp.Subnet)
		}
		want = cp.Subnet
	}
	used := make([]netip.Prefix, 0, len(cfg.Projects)+len(st.Projects)+len(host))
	for _, p := range cfg.Projects {
		if p.Subnet.IsValid() && p.Name != name {
			used = append(used, p.Subnet)
		}
	}
	for _, p := range st.Projects {
		if p.Name == name {
			continue
		}
		used = append(used, p.Subnet)
		if p.TAP == tap {
			return state.Project{}, conflict("TAP %s is already project %s's", tap, p.Name)
		}
		if req.SSHPort != 0 && p.SSHPort == req.SSHPort {
			return state.Project{}, conflict("ssh port %d is already project %s's", req.SSHPort, p.Name)
		}
		if want.IsValid() && p.Subnet == want {
			return state.Project{}, conflict("subnet %s is already project %s's", want, p.Name)
		}
	}
	p, exists := st.Projects[name]
	if exists && want.IsValid() && p.Subnet != want {
		return state.Project{}, conflict("project %s is already up at %s; take it down first to move it", name, p.Subnet)
	}
	if !exists {
		sub := want
		if sub.IsValid() {
			if slices.ContainsFunc(used, sub.Overlaps) {
				return state.Project{}, conflict("subnet %s is already in use", sub)
			}
			if h, ok := HostOverlap(host, sub); ok {
				return state.Project{}, conflict("subnet %s overlaps %s (%s) on the host", sub, h.Prefix, h.Where)
			}
		} else {
			for _, h := range host {
				used = append(used, h.Prefix)
			}
			var err error
			if sub, err = state.Allocate(cfg.VMCIDR, used); err != nil {
				return state.Project{}, conflict("allocating a /30 for %s: %w", name, err)
			}
		}
		p = state.Project{Name: name, Subnet: sub, MAC: state.MAC(name)}
	}
	p.TAP, p.Egress, p.SSHPort = tap, egress, req.SSHPort
	p.Owner, p.Group = req.Owner, req.Group
	return p, nil
}

// HostOverlap returns the first host prefix overlapping sub. A route that
// holds the whole vm_cidr or more (a default route, 0.0.0.0/0) is not
// counted: it is where traffic goes, not an address in use.
func HostOverlap(host []HostPrefix, sub netip.Prefix) (HostPrefix, bool) {
	for _, h := range host {
		if h.Prefix.Overlaps(sub) {
			return h, true
		}
	}
	return HostPrefix{}, false
}

// Describe is the guest's view of p: addresses, the kernel ip= argument and
// the body of Firecracker's PUT /network-interfaces/eth0.
func Describe(p state.Project, nameserver string) client.Placement {
	mask := net.IP(net.CIDRMask(30, 32)).String()
	fc, _ := json.Marshal(map[string]string{"iface_id": "eth0", "host_dev_name": p.TAP, "guest_mac": p.MAC})
	return client.Placement{
		Project: p.Name, TAP: p.TAP, HostIP: p.HostIP().String(), GuestIP: p.GuestIP().String(), Netmask: mask,
		Subnet: p.Subnet.String(), MAC: p.MAC, Egress: p.Egress, SSHPort: p.SSHPort, Nameserver: nameserver,
		// ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>
		KernelIP:   fmt.Sprintf("ip=%s::%s:%s::eth0:off:%s", p.GuestIP(), p.HostIP(), mask, nameserver),
		Firecraker: fc,
	}
}

// Nameserver is what the guest should put in resolv.conf: for proxied
// egress any address works (vmegress answers), the host's TAP address is the
// natural one; direct NAT egress needs a real resolver (the first upstream).
func Nameserver(p state.Project, upstreams []string) string {
	if p.Egress == state.EgressNAT && len(upstreams) > 0 {
		if ap, err := netip.ParseAddrPort(upstreams[0]); err == nil {
			return ap.Addr().String()
		}
	}
	return p.HostIP().String()
}
