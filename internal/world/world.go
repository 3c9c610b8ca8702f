// Package world builds a throwaway network in namespaces for the demo and the
// end-to-end tests: a "host" namespace (where vmegress runs), one namespace
// per guest behind a veth whose host end is named like a TAP, and an "inet"
// namespace (the fake internet) with real TLS servers for github.com,
// www.github.com and example.com and an "attacker" that logs everything that
// reaches it. Nothing is done in the caller's own network namespace.
package world

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Addresses of the world. The fake internet uses the benchmarking range
// 198.18.0.0/15 (RFC 2544) and the IPv6 documentation range.
var (
	HostUplinkIP = netip.MustParseAddr("198.18.0.1") // host side of the host-inet link
	InetLinkIP   = netip.MustParseAddr("198.18.0.2") // inet side
	GitHubIP     = netip.MustParseAddr("198.18.1.10")
	WWWGitHubIP  = netip.MustParseAddr("198.18.1.11")
	ExampleIP    = netip.MustParseAddr("198.18.1.12")
	AttackerIP   = netip.MustParseAddr("198.18.1.66")
	BannerIP     = netip.MustParseAddr("198.18.1.22") // a server-first (SSH-like) service on port 22
	DNSIP        = netip.MustParseAddr("198.18.1.53") // the fake internet's DNS server
	PrivateIP    = netip.MustParseAddr("10.0.0.5")
	MetadataIP   = netip.MustParseAddr("169.254.169.254")
	// GuestNameserver is what guests' resolv.conf names: nothing is there;
	// vmegress intercepts DNS to any address.
	GuestNameserver = netip.MustParseAddr("203.0.113.53")
	InetIP6         = netip.MustParseAddr("2001:db8:2::66")
)

// Names served by the fake internet's DNS server and their addresses. The
// last three point where a guest must never get: rebinding attempts.
var Names = map[string]netip.Addr{
	"github.com":     GitHubIP,
	"www.github.com": WWWGitHubIP,
	"example.com":    ExampleIP,
	"attacker.test":  AttackerIP,
	"banner.test":    BannerIP,
	"lenient.test":   LenientIP,
	"private.test":   PrivateIP,
	"loop.test":      netip.MustParseAddr("127.0.0.1"),
	"meta.test":      MetadataIP,
}

// Guest is one guest namespace.
type Guest struct {
	Name    string // project name
	NS      string // namespace
	TAP     string // host-side interface, named like a TAP
	HostIP  netip.Addr
	GuestIP netip.Addr
	Subnet  netip.Prefix
	HostIP6 netip.Addr
	IP6     netip.Addr
}

// World is a set of namespaces and the fake internet's servers.
type World struct {
	ID     string
	Host   string // namespace names
	Inet   string
	Dir    string // certificates, configs, logs
	CAFile string
	Guests []*Guest
	Log    *AccessLog // what reached the fake internet's servers

	search string // Options.Search

	mu        sync.Mutex
	closers   []func()
	nsCreated []string
}

// Options for New.
type Options struct {
	// Prefix names the namespaces (default "vmeg"); a random suffix is added.
	Prefix string
	// Guests are project names with their /30s, in order.
	Guests []GuestSpec
	// Search, when set, is a search domain in the host's resolv.conf (with
	// ndots:5, so every name is tried under it first), and the fake
	// internet's DNS server answers every name under it with AttackerIP:
	// a resolver that applies search domains dials the attacker.
	Search string
}

// GuestSpec asks for one guest.
type GuestSpec struct {
	Project string
	Subnet  netip.Prefix
}

// New builds the world. On error, whatever was built is removed.
func New(ctx context.Context, opts Options) (*World, error) {
	if opts.Prefix == "" {
		opts.Prefix = "vmeg"
	}
	var b [3]byte
	rand.Read(b[:])
	id := opts.Prefix + hex.EncodeToString(b[:])
	dir, err := os.MkdirTemp("", id+"-")
	if err != nil {
		return nil, fmt.Errorf("creating world directory: %w", err)
	}
	w := &World{ID: id, Host: id + "-host", Inet: id + "-inet", Dir: dir, Log: &AccessLog{}, search: opts.Search}
	if err := w.build(ctx, opts); err != nil {
		w.Close()
		return nil, err
	}
	return w, nil
}

// Close removes every namespace and file of the world; safe to call twice.
func (w *World) Close() {
	w.mu.Lock()
	closers := w.closers
	w.closers = nil
	nss := w.nsCreated
	w.nsCreated = nil
	w.mu.Unlock()
	for i := len(closers) - 1; i >= 0; i-- {
		closers[i]()
	}
	for _, ns := range nss {
		killNS(ns)
		exec.Command("ip", "netns", "del", ns).Run()
		os.RemoveAll(filepath.Join("/etc/netns", ns))
	}
	if w.Dir != "" && os.Getenv("VMEGRESS_KEEP_WORLD") == "" {
		os.RemoveAll(w.Dir)
	}
}

// killNS kills every process left in namespace ns.
func killNS(ns string) {
	out, _ := exec.Command("ip", "netns", "pids", ns).Output()
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			if p, err := os.FindProcess(pid); err == nil {
				p.Kill()
			}
		}
	}
}

func (w *World) onClose(f func()) {
	w.mu.Lock()
	w.closers = append(w.closers, f)
	w.mu.Unlock()
}

// Run runs argv and returns an error holding its output if it fails.
func Run(ctx context.Context, argv ...string) error {
	_, err := Output(ctx, argv...)
	return err
}

// Output runs argv (with LC_ALL=C) and returns its stdout.
func Output(ctx context.Context, argv ...string) (string, error) {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("running %q: %w: %s%s", strings.Join(argv, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

// NS returns argv prefixed to run in namespace ns.
func NS(ns string, argv ...string) []string {
	return append([]string{"ip", "netns", "exec", ns}, argv...)
}

func (w *World) addNS(ctx context.Context, ns string) error {
	if err := Run(ctx, "ip", "netns", "add", ns); err != nil {
		return err
	}
	w.mu.Lock()
	w.nsCreated = append(w.nsCreated, ns)
	w.mu.Unlock()
	// No duplicate address detection: link-local addresses appear the moment
	// a link is up, so the routing tables do not change later on their own.
	for _, k := range []string{"default", "all"} {
		if err := Run(ctx, NS(ns, "sysctl", "-qw", "net.ipv6.conf."+k+".accept_dad=0")...); err != nil {
			return err
		}
	}
	return Run(ctx, NS(ns, "ip", "link", "set", "lo", "up")...)
}

func (w *World) build(ctx context.Context, opts Options) error {
	for _, ns := range []string{w.Host, w.Inet} {
		if err := w.addNS(ctx, ns); err != nil {
			return err
		}
	}
	// The host's resolver is the fake internet's DNS server (vmegress's
	// default upstream is the host's resolv.conf).
	resolv := "nameserver " + DNSIP.String() + "\n"
	if opts.Search != "" {
		resolv += "search " + opts.Search + "\noptions ndots:5\n"
	}
	if err := writeEtc(w.Host, "127.0.0.1 localhost\n", resolv); err != nil {
		return err
	}
	steps := [][]string{
		{"ip", "link", "add", "up0", "netns", w.Host, "type", "veth", "peer", "name", "eth0", "netns", w.Inet},
		NS(w.Host, "ip", "addr", "add", HostUplinkIP.String()+"/24", "dev", "up0"),
		NS(w.Host, "ip", "addr", "add", "2001:db8:0::1/64", "dev", "up0", "nodad"),
		NS(w.Host, "ip", "link", "set", "up0", "up"),
		NS(w.Host, "ip", "route", "add", "default", "via", InetLinkIP.String()),
		NS(w.Host, "ip", "-6", "route", "add", "default", "via", "2001:db8:0::2"),
		// The host forwards, as a microVM host does (spec step 1): the tests
		// prove that guests still get nothing past the host but the proxy.
		NS(w.Host, "sysctl", "-qw", "net.ipv4.ip_forward=1"),
		NS(w.Host, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"),
		NS(w.Inet, "ip", "addr", "add", InetLinkIP.String()+"/24", "dev", "eth0"),
		NS(w.Inet, "ip", "addr", "add", "2001:db8:0::2/64", "dev", "eth0", "nodad"),
		NS(w.Inet, "ip", "addr", "add", InetIP6.String()+"/64", "dev", "lo", "nodad"),
		NS(w.Inet, "ip", "link", "set", "eth0", "up"),
		// Routes back to the guests: if the host ever forwarded guest
		// traffic, it would work end to end (so a leak would be seen).
		NS(w.Inet, "ip", "route", "add", "172.31.0.0/16", "via", HostUplinkIP.String()),
		NS(w.Inet, "ip", "-6", "route", "add", "2001:db8:1::/48", "via", "2001:db8:0::1"),
	}
	// The private and metadata addresses are reachable in the fake internet
	// too, each with a logging listener: if the proxy ever dialled them, the
	// attacker log would show it.
	for _, a := range append(namesAddrs(), DNSIP, PrivateIP, MetadataIP) {
		steps = append(steps, NS(w.Inet, "ip", "addr", "add", a.String()+"/32", "dev", "lo"))
	}
	for _, s := range steps {
		if err := Run(ctx, s...); err != nil {
			return fmt.Errorf("building world: %w", err)
		}
	}
	for i, gs := range opts.Guests {
		if err := w.addGuest(ctx, i, gs); err != nil {
			return err
		}
	}
	if err := w.startProbe(ctx); err != nil {
		return err
	}
	return w.startServers()
}

func (w *World) addGuest(ctx context.Context, i int, gs GuestSpec) error {
	if gs.Subnet.Bits() != 30 {
		return fmt.Errorf("guest %s: subnet %s is not a /30", gs.Project, gs.Subnet)
	}
	base := gs.Subnet.Masked().Addr()
	g := &Guest{
		Name:    gs.Project,
		NS:      fmt.Sprintf("%s-vm%d", w.ID, i),
		TAP:     fmt.Sprintf("tap-%.11s", gs.Project),
		HostIP:  base.Next(),
		GuestIP: base.Next().Next(),
		Subnet:  gs.Subnet.Masked(),
		HostIP6: netip.MustParseAddr(fmt.Sprintf("2001:db8:1:%x::1", i)),
		IP6:     netip.MustParseAddr(fmt.Sprintf("2001:db8:1:%x::2", i)),
	}
	if err := w.addNS(ctx, g.NS); err != nil {
		return err
	}
	steps := [][]string{
		{"ip", "link", "add", g.TAP, "netns", w.Host, "type", "veth", "peer", "name", "eth0", "netns", g.NS},
		NS(w.Host, "ip", "addr", "add", g.HostIP.String()+"/30", "dev", g.TAP),
		NS(w.Host, "ip", "addr", "add", g.HostIP6.String()+"/64", "dev", g.TAP, "nodad"),
		NS(w.Host, "ip", "link", "set", g.TAP, "up"),
		NS(g.NS, "ip", "addr", "add", g.GuestIP.String()+"/30", "dev", "eth0"),
		NS(g.NS, "ip", "addr", "add", g.IP6.String()+"/64", "dev", "eth0", "nodad"),
		NS(g.NS, "ip", "link", "set", "eth0", "up"),
		NS(g.NS, "ip", "route", "add", "default", "via", g.HostIP.String()),
		NS(g.NS, "ip", "-6", "route", "add", "default", "via", g.HostIP6.String()),
	}
	for _, s := range steps {
		if err := Run(ctx, s...); err != nil {
			return fmt.Errorf("building guest %s: %w", g.Name, err)
		}
	}
	// `ip netns exec` bind-mounts /etc/netns/NS/* over /etc: the guest has
	// no host names and a nameserver address where nothing listens.
	if err := writeEtc(g.NS, "127.0.0.1 localhost\n", "nameserver "+GuestNameserver.String()+"\n"); err != nil {
		return err
	}
	w.Guests = append(w.Guests, g)
	return nil
}

// writeEtc writes the hosts and resolv.conf that `ip netns exec NS` shows.
func writeEtc(ns, hosts, resolv string) error {
	etc := filepath.Join("/etc/netns", ns)
	if err := os.MkdirAll(etc, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", etc, err)
	}
	if err := os.WriteFile(filepath.Join(etc, "hosts"), []byte(hosts), 0o644); err != nil {
		return fmt.Errorf("writing hosts for %s: %w", ns, err)
	}
	if err := os.WriteFile(filepath.Join(etc, "resolv.conf"), []byte(resolv), 0o644); err != nil {
		return fmt.Errorf("writing resolv.conf for %s: %w", ns, err)
	}
	return nil
}

func namesAddrs() []netip.Addr {
	seen := map[netip.Addr]bool{}
	var out []netip.Addr
	for _, a := range Names {
		if !seen[a] && AlwaysPublic(a) {
			seen[a] = true
			out = append(out, a)
		}
	}
	return out
}

// AlwaysPublic reports whether a is one of the fake internet's own
// addresses (198.18.0.0/15), as opposed to the private or loopback
// addresses some test names resolve to.
func AlwaysPublic(a netip.Addr) bool { return netip.MustParsePrefix("198.18.0.0/15").Contains(a) }

// Guest returns the guest of a project.
func (w *World) Guest(project string) *Guest {
	for _, g := range w.Guests {
		if g.Name == project {
			return g
		}
	}
	return nil
}

// InNS runs f on an OS thread switched into namespace ns. Sockets f opens
// stay in ns after it returns.
func InNS(ns string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// The thread is not unlocked: if switching back failed, it must die
		// with this goroutine rather than serve others in the wrong netns.
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("getting current netns: %w", err)
			return
		}
		defer orig.Close()
		h, err := netns.GetFromName(ns)
		if err != nil {
			errc <- fmt.Errorf("opening netns %s: %w", ns, err)
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			errc <- fmt.Errorf("entering netns %s: %w", ns, err)
			return
		}
		ferr := f()
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("leaving netns %s: %w", ns, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// ListenIn opens a listener (network "tcp"/"tcp4"/"tcp6") in namespace ns.
func ListenIn(ns, network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := InNS(ns, func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// ListenPacketIn opens a UDP socket in namespace ns.
func ListenPacketIn(ns, network, addr string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := InNS(ns, func() error {
		var err error
		pc, err = net.ListenPacket(network, addr)
		return err
	})
	return pc, err
}

// Ipsets lists the names and members of the ipsets in network namespace ns,
// sorted ("name: member member").
func Ipsets(ns string) ([]string, error) {
	h, err := netns.GetFromName(ns)
	if err != nil {
		return nil, fmt.Errorf("opening netns %s: %w", ns, err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h, syscall.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("opening netlink in %s: %w", ns, err)
	}
	defer nl.Close()
	sets, err := nl.IpsetListAll()
	if err != nil {
		return nil, fmt.Errorf("listing ipsets in %s: %w", ns, err)
	}
	var out []string
	for _, s := range sets {
		var members []string
		for _, e := range s.Entries {
			members = append(members, e.IP.String())
		}
		sort.Strings(members)
		out = append(out, s.SetName+": "+strings.Join(members, " "))
	}
	sort.Strings(out)
	return out, nil
}
