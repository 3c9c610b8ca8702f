package engine

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmegress/vmegress/internal/hostnet"
	"github.com/vmegress/vmegress/internal/placement"
)

// NetlinkHost is Host over a netlink handle (the current network namespace).
type NetlinkHost struct {
	Handle *netlink.Handle
}

// CreateTAP creates or adopts the project's TAP.
func (h NetlinkHost) CreateTAP(t hostnet.TAP, project string) (bool, error) {
	_, err := h.Handle.LinkByName(t.Name)
	created := err != nil
	t.Project = project
	if err := hostnet.CreateTAP(h.Handle, t); err != nil {
		if errors.Is(err, hostnet.ErrNotOurs) {
			return false, &placement.Conflict{Err: err} // another's interface: refused, exit 2
		}
		return false, err
	}
	return created, nil
}

// DeleteTAP removes the project's TAP if vmegress created it for project
// (else hostnet.ErrNotOurs, and the interface stays).
func (h NetlinkHost) DeleteTAP(name, project string) error {
	return hostnet.DeleteTAP(h.Handle, name, project)
}

// Links names the interfaces of the namespace (one netlink dump).
func (h NetlinkHost) Links() (map[string]bool, error) {
	links, err := h.Handle.LinkList()
	if err != nil {
		return nil, fmt.Errorf("listing links: %w", err)
	}
	out := make(map[string]bool, len(links))
	for _, l := range links {
		out[l.Attrs().Name] = true
	}
	return out, nil
}

// Prefixes lists the IPv4 addresses and main-table routes of every
// interface skip does not name. Default routes are where traffic goes, not
// addresses in use, and are left out.
//
// Interface names come from the addresses' labels (an IPv4 address is
// labelled with its interface's name, or "name:alias"), not from a dump of
// every link: with thousands of TAPs that dump cost about 100 ms a call. A
// route on an interface without an IPv4 address is named "route".
func (h NetlinkHost) Prefixes(skip func(iface string) bool) ([]placement.HostPrefix, error) {
	var out []placement.HostPrefix
	addrs, err := h.Handle.AddrList(nil, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	names := make(map[int]string, len(addrs))
	for _, a := range addrs {
		name, _, _ := strings.Cut(a.Label, ":")
		if _, ok := names[a.LinkIndex]; !ok && name != "" {
			names[a.LinkIndex] = name
		}
	}
	for _, a := range addrs {
		name := names[a.LinkIndex]
		if skip(name) || a.IPNet == nil {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok || ip.IsLoopback() {
			continue
		}
		bits, _ := a.Mask.Size()
		out = append(out, placement.HostPrefix{Prefix: netip.PrefixFrom(ip, bits).Masked(), Where: "address of " + name})
	}
	routes, err := h.Handle.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		name := names[r.LinkIndex]
		if r.Dst == nil || skip(name) {
			continue
		}
		ip, ok := netip.AddrFromSlice(r.Dst.IP.To4())
		bits, _ := r.Dst.Mask.Size()
		if !ok || bits == 0 {
			continue
		}
		where := "route"
		if name != "" {
			where = "route via " + name
		}
		out = append(out, placement.HostPrefix{Prefix: netip.PrefixFrom(ip, bits).Masked(), Where: where})
	}
	return out, nil
}
