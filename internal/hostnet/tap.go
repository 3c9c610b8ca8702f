package hostnet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmegress/vmegress/internal/config"
)

// TAP describes a project's TAP device on the host.
type TAP struct {
	Name string
	// Project owns the TAP: CreateTAP marks the device with OwnerAlias(Project)
	// and adopts only a TAP marked so; DeleteTAP deletes only such a TAP.
	Project string
	// HostIP/30 goes on the TAP; GuestIP and GuestMAC get a permanent
	// neighbour entry (a reused address never waits on a stale one).
	HostIP, GuestIP netip.Addr
	GuestMAC        string
	// Owner and Group may open the TAP (Firecracker's jailer user); nil: root.
	Owner, Group *uint32
	// Forwarding sets net.ipv4.conf.TAP.forwarding (on only for NAT egress
	// and inbound SSH).
	Forwarding bool
	// ProcSys is the sysctl root (zero: /proc/sys).
	ProcSys string
}

// aliasPrefix starts the alias (IFLA_IFALIAS) of every TAP vmegress creates.
const aliasPrefix = "vmegress:"

// OwnerAlias is the alias that marks a TAP as the one vmegress created for
// project.
func OwnerAlias(project string) string { return aliasPrefix + project }

// ErrNotOurs is wrapped by CreateTAP and DeleteTAP when the interface exists
// but is not a TAP vmegress created for the project: another guest's veth, a
// TAP marked for another project, or one nobody marked.
var ErrNotOurs = errors.New("not a TAP vmegress created for this project")

// ownership reports why link must not be adopted or deleted as project's
// TAP, or nil. hostIP, when valid, lets an unmarked TAP carrying the
// project's host address through: one a vmegress from before the marking
// created for this very placement.
func ownership(nl *netlink.Handle, link netlink.Link, project string, hostIP netip.Addr) error {
	name := link.Attrs().Name
	tun, ok := link.(*netlink.Tuntap)
	if !ok {
		return fmt.Errorf("interface %s is a %s, not a TAP: %w", name, link.Type(), ErrNotOurs)
	}
	if tun.Mode != 0 && tun.Mode != netlink.TUNTAP_MODE_TAP {
		return fmt.Errorf("interface %s is a TUN, not a TAP: %w", name, ErrNotOurs)
	}
	switch alias := link.Attrs().Alias; {
	case alias == OwnerAlias(project):
		return nil
	case strings.HasPrefix(alias, aliasPrefix):
		return fmt.Errorf("TAP %s belongs to project %s, not %s: %w", name, strings.TrimPrefix(alias, aliasPrefix), project, ErrNotOurs)
	case alias != "":
		return fmt.Errorf("TAP %s is marked %q, not %q: %w", name, alias, OwnerAlias(project), ErrNotOurs)
	}
	if hostIP.IsValid() {
		addrs, err := nl.AddrList(link, unix.AF_INET)
		if err != nil {
			return fmt.Errorf("listing the addresses of %s: %w", name, err)
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && ip == hostIP {
				return nil
			}
		}
	}
	return fmt.Errorf("TAP %s exists and vmegress did not create it for project %s (no alias %q): %w", name, project, OwnerAlias(project), ErrNotOurs)
}

// CreateTAP creates a persistent TAP marked as t.Project's (its alias), or
// adopts an existing TAP vmegress created for t.Project, and gives it its
// address, neighbour entry and forwarding setting, then sets it up. Any
// other existing interface of that name is refused (ErrNotOurs) and left
// untouched. A TAP it created is deleted again when a later step fails.
func CreateTAP(nl *netlink.Handle, t TAP) (err error) {
	if err := config.ValidTAPName(t.Name); err != nil {
		return err
	}
	link, err := nl.LinkByName(t.Name)
	if err == nil {
		if err := ownership(nl, link, t.Project, t.HostIP); err != nil {
			return err
		}
	} else {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return fmt.Errorf("finding %s: %w", t.Name, err)
		}
		tap := &netlink.Tuntap{
			LinkAttrs: netlink.LinkAttrs{Name: t.Name},
			Mode:      netlink.TUNTAP_MODE_TAP,
			// What Firecracker asks for when it opens the device.
			Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR,
		}
		if t.Owner != nil {
			tap.Owner = *t.Owner
		}
		if t.Group != nil {
			tap.Group = *t.Group
		}
		if err := nl.LinkAdd(tap); err != nil {
			return fmt.Errorf("creating TAP %s: %w", t.Name, err)
		}
		defer func() {
			if err != nil {
				// Best effort: the error returned is the one that matters.
				if l, lerr := nl.LinkByName(t.Name); lerr == nil {
					nl.LinkDel(l)
				}
			}
		}()
		if link, err = nl.LinkByName(t.Name); err != nil {
			return fmt.Errorf("finding TAP %s: %w", t.Name, err)
		}
	}
	if link.Attrs().Alias != OwnerAlias(t.Project) {
		if err := nl.LinkSetAlias(link, OwnerAlias(t.Project)); err != nil {
			return fmt.Errorf("marking %s as project %s's TAP: %w", t.Name, t.Project, err)
		}
	}
	return configureTAP(nl, link, t)
}

// configureTAP gives link (t's device) its forwarding setting, address and
// neighbour entry and sets it up.
func configureTAP(nl *netlink.Handle, link netlink.Link, t TAP) error {
	fwd := "0"
	if t.Forwarding {
		fwd = "1"
	}
	root := t.ProcSys
	if root == "" {
		root = "/proc/sys"
	}
	// Before the link is up: no moment of forwarding by default.
	if err := os.WriteFile(filepath.Join(root, "net/ipv4/conf", t.Name, "forwarding"), []byte(fwd), 0o644); err != nil {
		return fmt.Errorf("setting forwarding on %s: %w", t.Name, err)
	}
	// Guests are IPv4: no IPv6 on the TAP at all.
	os.WriteFile(filepath.Join(root, "net/ipv6/conf", t.Name, "disable_ipv6"), []byte("1"), 0o644)
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: t.HostIP.AsSlice(), Mask: net.CIDRMask(30, 32)}}
	if err := nl.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("adding %s/30 to %s: %w", t.HostIP, t.Name, err)
	}
	if err := nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("setting %s up: %w", t.Name, err)
	}
	if t.GuestMAC != "" {
		mac, err := net.ParseMAC(t.GuestMAC)
		if err != nil {
			return fmt.Errorf("guest MAC %q: %w", t.GuestMAC, err)
		}
		neigh := &netlink.Neigh{LinkIndex: link.Attrs().Index, Family: unix.AF_INET, State: netlink.NUD_PERMANENT,
			IP: t.GuestIP.AsSlice(), HardwareAddr: mac}
		if err := nl.NeighSet(neigh); err != nil {
			return fmt.Errorf("adding the guest's neighbour entry on %s: %w", t.Name, err)
		}
	}
	return nil
}

// DeleteTAP removes project's TAP (its addresses, routes and neighbours go
// with it) if it is one vmegress created for project; any other interface
// of that name is left untouched and ErrNotOurs returned. A missing TAP is
// not an error.
func DeleteTAP(nl *netlink.Handle, name, project string) error {
	link, err := nl.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("finding %s: %w", name, err)
	}
	// No address evidence here: only a marked TAP is deleted.
	if err := ownership(nl, link, project, netip.Addr{}); err != nil {
		return fmt.Errorf("not deleting %s: %w", name, err)
	}
	if err := nl.LinkDel(link); err != nil {
		return fmt.Errorf("deleting %s: %w", name, err)
	}
	return nil
}

// EnableForwarding turns net.ipv4.conf.IFACE.forwarding on (restore-NAT:
// the spec's direct NAT egress needs the kernel to route what the TAP
// sends). A missing interface is not an error. procSys "" is /proc/sys.
func EnableForwarding(procSys, iface string) error {
	if procSys == "" {
		procSys = "/proc/sys"
	}
	err := os.WriteFile(filepath.Join(procSys, "net/ipv4/conf", iface, "forwarding"), []byte("1"), 0o644)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("turning forwarding on for %s: %w", iface, err)
	}
	return nil
}
