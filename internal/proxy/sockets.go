package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// ListenTransparent listens on addr with IP_TRANSPARENT, so TPROXY can hand it
// connections addressed to any destination (needs CAP_NET_ADMIN).
func ListenTransparent(ctx context.Context, addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(network, address string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
		}); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("setting IP_TRANSPARENT (needs CAP_NET_ADMIN): %w", serr)
		}
		return nil
	}}
	ln, err := lc.Listen(ctx, "tcp4", addr)
	if err != nil {
		return nil, fmt.Errorf("listening transparently on %s: %w", addr, err)
	}
	return ln, nil
}

// MarkControl returns a socket Control function that sets SO_MARK mark, so
// the host's interception and policy routing leave the socket alone.
func MarkControl(mark uint32) func(network, address string, rc syscall.RawConn) error {
	return func(network, address string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
		}); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("setting SO_MARK %#x (needs CAP_NET_ADMIN): %w", mark, serr)
		}
		return nil
	}
}

// MarkedDialer returns a dial function whose sockets carry SO_MARK mark.
func MarkedDialer(mark uint32, d net.Dialer) func(ctx context.Context, network, addr string) (net.Conn, error) {
	d.Control = MarkControl(mark)
	return d.DialContext
}

// KernelAddrChecker asks the kernel's routing (as `ip route get` does) whether
// an address is the host's own: local, broadcast or multicast routes.
type KernelAddrChecker struct {
	// Handle is the netlink handle of the host's network namespace.
	Handle *netlink.Handle
}

// IsHostAddr implements AddrChecker.
func (k KernelAddrChecker) IsHostAddr(a netip.Addr) (bool, error) {
	routes, err := k.Handle.RouteGet(a.AsSlice())
	if errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EHOSTUNREACH) {
		return false, nil // no route: not the host, and the dial will say so
	}
	if err != nil {
		return false, fmt.Errorf("looking up the route to %s: %w", a, err)
	}
	for _, r := range routes {
		switch r.Type {
		case unix.RTN_LOCAL, unix.RTN_BROADCAST, unix.RTN_MULTICAST, unix.RTN_ANYCAST:
			return true, nil
		}
	}
	return false, nil
}
