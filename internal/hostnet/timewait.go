package hostnet

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DestroyProxiedSockets destroys (SOCK_DESTROY, as `ss -K` does) the IPv4
// TCP sockets whose peer is in guests and whose local address is not one of
// the host's (isLocal): what a transparent proxy leaves of the guests'
// connections once it has stopped, its local address being the server the
// guest asked for — sockets in TIME_WAIT, and orphans still closing. Once
// the host forwards guests' traffic instead (restore-NAT), a SYN reusing
// such a 4-tuple meets the socket (early demux attaches it) and is dropped
// instead of forwarded. Listening sockets are never touched. It returns how
// many it destroyed; call it only when no proxy runs.
func DestroyProxiedSockets(nl *netlink.Handle, guests netip.Prefix, isLocal func(netip.Addr) bool) (int, error) {
	socks, err := nl.SocketDiagTCP(unix.AF_INET)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return 0, fmt.Errorf("listing TCP sockets: %w", err)
	}
	n := 0
	var errs []error
	for _, s := range socks {
		if s.State == tcpListen {
			continue
		}
		local, _ := netip.AddrFromSlice(s.ID.Source.To4())
		peer, _ := netip.AddrFromSlice(s.ID.Destination.To4())
		if !guests.Contains(peer) || isLocal(local) {
			continue
		}
		err := nl.SocketDestroy(&net.TCPAddr{IP: s.ID.Source, Port: int(s.ID.SourcePort)},
			&net.TCPAddr{IP: s.ID.Destination, Port: int(s.ID.DestinationPort)})
		if errors.Is(err, unix.ENOENT) {
			continue // gone meanwhile
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("destroying %s:%d -> %s:%d: %w", local, s.ID.SourcePort, peer, s.ID.DestinationPort, err))
			if len(errs) == 3 { // the same cause each time: stop early
				break
			}
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// LocalAddrs returns a test of whether an address is one of the host's: an
// address of any interface of nl's namespace, or loopback.
func LocalAddrs(nl *netlink.Handle) (func(netip.Addr) bool, error) {
	addrs, err := nl.AddrList(nil, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("listing the host's addresses: %w", err)
	}
	set := map[netip.Addr]bool{}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok {
			set[ip] = true
		}
	}
	return func(a netip.Addr) bool { return a.IsLoopback() || set[a.Unmap()] }, nil
}
