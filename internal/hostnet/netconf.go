package hostnet

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Attributes of an RTM_NEWNETCONF message (linux/netconf.h).
const (
	netconfaIfindex    = 1 // NETCONFA_IFINDEX: int32; -1 is "all", -2 "default"
	netconfaForwarding = 2 // NETCONFA_FORWARDING: int32
)

// netconfMsg is struct netconfmsg: one family byte (padded by the kernel's
// alignment to four).
type netconfMsg struct{ family uint8 }

func (m netconfMsg) Len() int { return 4 }

func (m netconfMsg) Serialize() []byte { return []byte{m.family, 0, 0, 0} }

// LinkForwarding returns net.ipv4.conf.<if>.forwarding of every interface
// by name, from one link dump and one netconf dump (RTM_GETNETCONF) over
// netlink, instead of one sysctl file read per interface: at thousands of
// TAPs the guard's once-a-second check stays cheap.
func LinkForwarding(h *netlink.Handle) (map[string]string, error) {
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("listing interfaces: %w", err)
	}
	names := make(map[int32]string, len(links))
	for _, l := range links {
		names[int32(l.Attrs().Index)] = l.Attrs().Name
	}
	req := nl.NewNetlinkRequest(unix.RTM_GETNETCONF, unix.NLM_F_DUMP)
	req.AddData(netconfMsg{family: unix.AF_INET})
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWNETCONF)
	if err != nil {
		return nil, fmt.Errorf("dumping IPv4 netconf: %w", err)
	}
	out := make(map[string]string, len(links))
	for _, m := range msgs {
		if len(m) < 4 {
			continue
		}
		attrs, err := nl.ParseRouteAttr(m[4:])
		if err != nil {
			return nil, fmt.Errorf("parsing netconf: %w", err)
		}
		var (
			index     int32
			fwd       int32
			hasI, has bool
		)
		for _, a := range attrs {
			if len(a.Value) < 4 {
				continue
			}
			v := int32(binary.NativeEndian.Uint32(a.Value))
			switch a.Attr.Type {
			case netconfaIfindex:
				index, hasI = v, true
			case netconfaForwarding:
				fwd, has = v, true
			}
		}
		if name, ok := names[index]; ok && hasI && has {
			out[name] = fmt.Sprint(fwd)
		}
	}
	return out, nil
}

// AddrLinks returns the interface name of every IPv4 address of the host,
// from one address dump (the name from the address's label).
func AddrLinks(h *netlink.Handle) (map[netip.Addr]string, error) {
	addrs, err := h.AddrList(nil, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("listing addresses: %w", err)
	}
	out := make(map[netip.Addr]string, len(addrs))
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		name, _, _ := strings.Cut(a.Label, ":")
		if ok && name != "" {
			out[ip] = name
		}
	}
	return out, nil
}
