package e2e

import (
	"bufio"
	"bytes"
	be "encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// The red-team suite against the early accept of an open kernel-forwarded
// flow's packets in prerouting (right after the reverse-path check, before
// the host-address, IP-option, 853 and DNS rules), the forward chain that
// tests the conntrack mark first, and the cuts of a CLI change made with no
// daemon running. Conntrack matches a packet to a flow by its header, in
// either direction, whatever interface it came in on: each test has a
// guest write into a flow that is not its own.

// flowSeqs returns, for an open echo connection c of a guest in ns to peer,
// the sequence number the guest sends next and the one the peer sends next
// (read from the echo of one line the guest writes; the line is consumed).
func flowSeqs(ns string, c net.Conn, r *bufio.Reader, peer netip.AddrPort) (guestNext, peerNext uint32, err error) {
	local := netip.MustParseAddrPort(c.LocalAddr().String())
	err = world.InNS(ns, func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_TCP)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		tv := syscall.NsecToTimeval(int64(3 * time.Second))
		syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv)
		go c.Write([]byte("x\n"))
		buf := make([]byte, 65536)
		for {
			n, _, err := syscall.Recvfrom(fd, buf, 0)
			if err != nil {
				return fmt.Errorf("reading the peer's echo: %w", err)
			}
			p := buf[:n]
			hl := int(p[0]&0x0f) * 4
			if n < hl+20 || netip.AddrFrom4([4]byte(p[12:16])) != peer.Addr() {
				continue
			}
			seg := p[hl:]
			if be.BigEndian.Uint16(seg[0:]) != peer.Port() || be.BigEndian.Uint16(seg[2:]) != local.Port() || seg[13]&tcpPSH == 0 {
				continue
			}
			thl := int(seg[12]>>4) * 4
			guestNext = be.BigEndian.Uint32(seg[8:])
			peerNext = be.BigEndian.Uint32(seg[4:]) + uint32(len(seg)-thl)
			return nil
		}
	})
	if err == nil {
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if line, rerr := r.ReadString('\n'); rerr != nil || line != "x\n" {
			err = fmt.Errorf("the echo: %q, %v", line, rerr)
		}
	}
	return guestNext, peerNext, err
}

// conntrack is the host namespace's conntrack table, TCP only.
func (e *env) conntrack() string {
	out, _ := world.Output(e.ctx, world.NS(e.w.Host, "grep", "tcp", "/proc/net/nf_conntrack")...)
	return out
}

// TestRedteamReorderReplyInjection: a flow the kernel forwards is matched
// by conntrack in its reply direction too (source: the peer; destination:
// the host's masquerading address). alpha's cidr rule covers the guest
// range, and alpha opens a flow to an address of it no guest holds yet
// (routed out of the uplink, so forwarded). Then that address's /30 is
// placed for project beta, and beta's guest, holding the address, sends
// the flow's reply (SYN-ACK, then data) from its own interface: its source
// passes the reverse-path check (it is beta's own address) and the packet
// carries the flow's mark. Nothing beta sends may reach alpha: guests never
// reach one another.
func TestRedteamReorderReplyInjection(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - cidr: 172.31.0.0/16
        ports: [22]
  beta:
    allow:
      - sni: github.com
      - cidr: 198.18.1.10/32   # any kernel path: beta's interface forwards
        ports: [443]
`)
	e.start()
	alpha := e.g
	target := netip.MustParseAddr("172.31.0.6") // beta's guest address, once placed
	const sport = 40123
	fromTarget := e.watch(alpha.NS, "from_beta", "ip saddr "+target.String())
	// alpha's SYN to the address nobody holds yet: a kernel flow, masqueraded.
	e.sendRaw(alpha.NS, rawTCP{src: alpha.GuestIP, dst: target, sport: sport, dport: 22, seq: 1000, flags: tcpSYN}.packet())
	e.settle(alpha)
	t.Logf("conntrack before beta is placed:\n%s", e.conntrack())

	beta, info := e.netUp("beta", "--subnet", "172.31.0.4/30")
	if beta.GuestIP != target {
		t.Fatalf("beta was placed at %v (%v), not %v", beta.GuestIP, info["guest_ip"], target)
	}
	t.Logf("conntrack after beta is placed:\n%s", e.conntrack())
	// beta answers as the flow's peer would: to the host's uplink address
	// (the masquerade kept the source port), from its own address.
	var pkts [][]byte
	for _, dst := range []netip.Addr{world.HostUplinkIP, alpha.GuestIP} {
		pkts = append(pkts,
			rawTCP{src: target, dst: dst, sport: 22, dport: sport, seq: 5000, ack: 1001, flags: tcpSYN | tcpACK}.packet(),
			rawTCP{src: target, dst: dst, sport: 22, dport: sport, seq: 5001, ack: 1001, flags: tcpACK | tcpPSH, payload: []byte("from beta\n")}.packet())
	}
	if os.Getenv("REDTEAM_TRACE") != "" {
		tr := filepath.Join(e.w.Dir, "trace.nft")
		os.WriteFile(tr, []byte("table ip rtdebug {\n chain p { type filter hook prerouting priority raw - 30; ip saddr "+target.String()+" meta nftrace set 1; }\n}\n"), 0o644)
		world.Run(e.ctx, world.NS(e.w.Host, "nft", "-f", tr)...)
		cmd := exec.Command("ip", "netns", "exec", e.w.Host, "nft", "monitor", "trace")
		var buf bytes.Buffer
		cmd.Stdout = &buf
		cmd.Start()
		defer func() {
			time.Sleep(500 * time.Millisecond)
			cmd.Process.Kill()
			cmd.Wait()
			t.Logf("trace:\n%s", buf.String())
		}()
		time.Sleep(300 * time.Millisecond)
	}
	e.sendRaw(beta.NS, pkts...)
	e.settle(beta)
	e.settle(alpha)
	if n := fromTarget(); n != 0 {
		t.Errorf("%d packets beta sent as the reply of alpha's kernel flow reached alpha", n)
	}
	t.Logf("conntrack at the end:\n%s", e.conntrack())
	e.noLeaks()
}

// TestRedteamReorderSpoofAndOptions: with alpha's kernel flow to the banner
// open, beta (another tenant) sends segments with alpha's source and the
// flow's exact 5-tuple and sequence numbers from its own interface, and
// alpha sends segments of its own flow with IP options (no-ops, a loose and
// a strict source route through the host's address, on to the attacker):
// the early accept must take none of them, and the flow lives on (the
// spoofed reset never reaches conntrack).
func TestRedteamReorderSpoofAndOptions(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, []world.GuestSpec{{Project: "alpha", Subnet: alphaSubnet}, {Project: "beta", Subnet: netip.MustParsePrefix("172.31.0.4/30")}}, `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - cidr: 198.18.1.22/32
        ports: [22]
  beta:
    subnet: 172.31.0.4/30
    allow:
      - cidr: 198.18.1.22/32
        ports: [2222]
`)
	if err := world.Run(e.ctx, world.NS(e.w.Host, "sysctl", "-qw", "net.ipv4.conf.all.accept_source_route=1")...); err != nil {
		t.Fatal(err)
	}
	e.start()
	alpha, beta := e.w.Guests[0], e.w.Guests[1]
	c, r, local, seq, ack := openBannerFlow(t, alpha)
	injected := e.watch(e.w.Inet, "injected", "ip daddr "+world.BannerIP.String()+" tcp flags & (rst | psh) != 0")
	toAttacker := e.watch(e.w.Inet, "to_attacker", "ip daddr "+world.AttackerIP.String())
	seg := func(src, dst netip.Addr, flags uint8, opts, payload []byte) []byte {
		return rawTCP{src: src, dst: dst, sport: local.Port(), dport: 22, seq: seq, ack: ack, flags: flags, ipOpts: opts, payload: payload}.packet()
	}
	// beta, as alpha.
	e.sendRaw(beta.NS, seg(alpha.GuestIP, world.BannerIP, tcpACK|tcpPSH, nil, []byte("beta\n")), seg(alpha.GuestIP, world.BannerIP, tcpRST, nil, nil))
	e.settle(beta)
	// alpha, with IP options.
	a := world.AttackerIP.As4()
	var pkts [][]byte
	for _, opts := range [][]byte{{1, 1, 1, 0}, {0x83, 7, 4, a[0], a[1], a[2], a[3], 0}, {0x89, 7, 4, a[0], a[1], a[2], a[3], 0}} {
		pkts = append(pkts, seg(alpha.GuestIP, world.BannerIP, tcpACK|tcpPSH, opts, []byte("opts\n")))
		pkts = append(pkts, seg(alpha.GuestIP, world.HostUplinkIP, tcpACK|tcpPSH, opts, []byte("srr\n")))
	}
	e.sendRaw(alpha.NS, pkts...)
	e.settle(alpha)
	if n := injected(); n != 0 {
		t.Errorf("%d spoofed or optioned segments of alpha's flow reached the banner", n)
	}
	if n := toAttacker(); n != 0 {
		t.Errorf("%d segments reached the attacker", n)
	}
	// The reverse-path check runs at raw priority, before conntrack: beta's
	// spoofed reset never reaches alpha's entry (it closed the flow in one
	// run of four when the check came after conntrack).
	if !alive(c, r) {
		t.Error("alpha's flow died: conntrack took beta's spoofed reset")
	}
	e.noLeaks()
}

// reuseSlash30 is TestRedteamReorderReuse's body: alpha (a cidr rule to the
// banner) opens a kernel flow from a /30, goes down, and beta (no rule for
// the banner) comes up on the same /30 with the same guest address and
// writes into alpha's flow with its exact tuple and sequence numbers.
func reuseSlash30(t *testing.T, daemon bool) {
	e := newWorldWith(t, nil, `projects:
  alpha:
    allow:
      - cidr: 198.18.1.22/32
        ports: [22]
  beta:
    allow:
      - sni: github.com
`)
	e.start()
	alpha, _ := e.netUp("alpha", "--subnet", "172.31.0.8/30")
	_, _, local, seq, ack := openBannerFlow(t, alpha)
	if !daemon {
		e.d.Kill()
	}
	if out, err := e.vmegress("--config", e.cfg, "net", "down", "alpha"); err != nil {
		t.Fatalf("net down alpha: %v\n%s", err, out)
	}
	beta, _ := e.netUp("beta", "--subnet", "172.31.0.8/30")
	if beta.GuestIP != alpha.GuestIP {
		t.Fatalf("beta at %v, alpha was at %v", beta.GuestIP, alpha.GuestIP)
	}
	t.Logf("conntrack after beta is up:\n%s", e.conntrack())
	injected := e.watch(e.w.Inet, "injected", "ip daddr "+world.BannerIP.String()+" tcp flags & psh != 0")
	// Beta's reset by its sequence number: the host itself may reset the
	// banner's side of the flow it revoked (from the flow's masqueraded
	// port, when the banner sends to it), which is no write of beta's.
	reset := e.watch(e.w.Inet, "resets", fmt.Sprintf("ip daddr %s tcp flags & rst != 0 tcp sequence %d", world.BannerIP, seq+5))
	echoed := e.watch(beta.NS, "echoed", "ip saddr "+world.BannerIP.String()+" tcp flags & psh != 0")
	e.sendRaw(beta.NS, rawTCP{src: beta.GuestIP, dst: world.BannerIP, sport: local.Port(), dport: 22, seq: seq, ack: ack, flags: tcpACK | tcpPSH, payload: []byte("beta\n")}.packet())
	time.Sleep(300 * time.Millisecond)
	e.sendRaw(beta.NS, rawTCP{src: beta.GuestIP, dst: world.BannerIP, sport: local.Port(), dport: 22, seq: seq + 5, ack: ack, flags: tcpRST}.packet())
	time.Sleep(300 * time.Millisecond)
	if n := injected(); n != 0 {
		t.Errorf("%d data segments beta wrote into alpha's old flow reached the banner", n)
	}
	if n := reset(); n != 0 {
		t.Errorf("%d resets beta wrote into alpha's old flow reached the banner", n)
	}
	if t.Failed() {
		t.Logf("conntrack at the end:\n%s", e.conntrack())
	}
	if n := echoed(); n != 0 {
		t.Errorf("beta got %d data segments of alpha's old flow", n)
	}
	e.noLeaks()
}

func TestRedteamReorderReuse(t *testing.T) {
	t.Parallel()
	t.Run("daemon", func(t *testing.T) { t.Parallel(); reuseSlash30(t, true) })
	t.Run("daemonless", func(t *testing.T) { t.Parallel(); reuseSlash30(t, false) })
}

// openBannerFlow opens g's kernel flow to the banner, reads the banner, and
// returns the connection, its reader, its local address and the sequence
// numbers the flow's next segment from g carries (flowSeqs).
func openBannerFlow(t *testing.T, g *world.Guest) (c net.Conn, r *bufio.Reader, local netip.AddrPort, seq, ack uint32) {
	t.Helper()
	banner := netip.AddrPortFrom(world.BannerIP, 22)
	c, err := dialGuest(g, banner.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r = bufio.NewReader(c)
	if line, err := r.ReadString('\n'); err != nil || line != world.Banner {
		t.Fatalf("banner: %q, %v", line, err)
	}
	if seq, ack, err = flowSeqs(g.NS, c, r, banner); err != nil {
		t.Fatal(err)
	}
	return c, r, netip.MustParseAddrPort(c.LocalAddr().String()), seq, ack
}
