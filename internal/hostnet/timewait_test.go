package hostnet

import (
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// tcpTimeWait is TIME_WAIT as inet_diag reports it (include/net/tcp_states.h).
const tcpTimeWait = 6

// TestDestroyProxiedSockets: TIME_WAIT sockets whose peer is in the guest
// range and whose local address is not the host's are destroyed; others
// stay, and listeners are never touched. Also shows that this kernel
// destroys TIME_WAIT sockets (CONFIG_INET_DIAG_DESTROY, tcp_abort).
func TestDestroyProxiedSockets(t *testing.T) {
	_, ns := enterNS(t)
	nl := diagHandle(t, ns)
	// The "server" side closes first, so its sockets are the ones in
	// TIME_WAIT, as the proxy's downstream sockets are.
	l, err := net.Listen("tcp4", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	const conns = 20
	for range conns {
		c, err := net.Dial("tcp4", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
		buf := make([]byte, 1)
		c.Read(buf) // the FIN
		c.Close()
	}
	timeWait := func() int {
		socks, err := nl.SocketDiagTCP(unix.AF_INET)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, s := range socks {
			if s.State == tcpTimeWait && s.ID.SourcePort == uint16(l.Addr().(*net.TCPAddr).Port) {
				n++
			}
		}
		return n
	}
	if n := timeWait(); n != conns {
		t.Fatalf("%d sockets in TIME_WAIT, want %d", n, conns)
	}
	guests := netip.MustParsePrefix("127.0.0.1/32")
	hostIsServer := func(a netip.Addr) bool { return a == netip.MustParseAddr("127.0.0.2") }
	if n, err := DestroyProxiedSockets(nl, guests, hostIsServer); n != 0 || err != nil || timeWait() != conns {
		t.Errorf("with the local address the host's: destroyed %d, %v; %d left", n, err, timeWait())
	}
	if n, err := DestroyProxiedSockets(nl, netip.MustParsePrefix("10.0.0.0/8"), func(netip.Addr) bool { return false }); n != 0 || err != nil {
		t.Errorf("peers outside the guest range: destroyed %d, %v", n, err)
	}
	notLocal := func(netip.Addr) bool { return false }
	if n, err := DestroyProxiedSockets(nl, guests, notLocal); n != conns || err != nil {
		t.Errorf("destroyed %d, %v; want %d", n, err, conns)
	}
	if n := timeWait(); n != 0 {
		t.Errorf("%d sockets still in TIME_WAIT", n)
	}
	if c, err := net.Dial("tcp4", l.Addr().String()); err != nil {
		t.Errorf("the listener was touched: %v", err)
	} else {
		c.Close()
	}
}
