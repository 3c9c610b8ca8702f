package hostnet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TAP describes a project's TAP device on the host.
type TAP struct {
	Name string
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

// CreateTAP creates (or, if it exists, adopts) a persistent TAP and gives it
// its address, neighbour entry and forwarding setting, then sets it up.
func CreateTAP(nl *netlink.Handle, t TAP) error {
	link, err := nl.LinkByName(t.Name)
	if err != nil {
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
		if link, err = nl.LinkByName(t.Name); err != nil {
			return fmt.Errorf("finding TAP %s: %w", t.Name, err)
		}
	} else if link.Type() != "tuntap" {
		return fmt.Errorf("interface %s exists and is not a TAP (%s)", t.Name, link.Type())
	}
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

// DeleteTAP removes the TAP (its addresses, routes and neighbours go with
// it). A missing TAP is not an error.
func DeleteTAP(nl *netlink.Handle, name string) error {
	link, err := nl.LinkByName(name)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("finding %s: %w", name, err)
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
