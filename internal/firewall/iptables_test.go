package firewall

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/vmegress/vmegress/internal/nettest"
	"github.com/vmegress/vmegress/internal/policy"
)

// iptablesIn returns the iptables backend bound to network namespace ns:
// commands run under `ip netns exec`, the ipset handle is opened there.
func iptablesIn(t *testing.T, ns string) *IPTables {
	t.Helper()
	for _, bin := range []string{"iptables-restore", "ip6tables-restore"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s is needed: %v", bin, err)
		}
	}
	nsh, err := netns.GetFromName(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh, syscall.NETLINK_NETFILTER)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return &IPTables{
		Sets: h,
		Exec: func(ctx context.Context, stdin []byte, argv ...string) ([]byte, error) {
			return execStdin(ctx, stdin, append([]string{"ip", "netns", "exec", ns}, argv...)...)
		},
	}
}

var projectState = func() State {
	s := testState
	s.NATIfaces = []string{"tap-b"}
	s.NATGuests = []netip.Addr{netip.MustParseAddr("172.31.0.6")}
	s.SSH = []SSHForward{{HostPort: 2201, GuestIP: netip.MustParseAddr("172.31.0.2")}}
	return s
}()

func snapshot(t *testing.T, b *IPTables) string {
	t.Helper()
	s, err := b.Snapshot(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestIPTablesKernel applies the rules in a fresh netns: the kernel (through
// iptables-restore) is the judge of the golden listing, of idempotence, of
// element-wise project updates, of rollback and of cleanup.
func TestIPTablesKernel(t *testing.T) {
	nettest.Privileged(t)
	ns := nettest.NewNS(t)
	ctx := context.Background()
	b := iptablesIn(t, ns)

	if ok, err := b.Installed(ctx); ok || err != nil {
		t.Fatalf("Installed before Apply = %v, %v", ok, err)
	}
	if err := b.Apply(ctx, testState); err != nil {
		t.Fatal(err)
	}
	first := snapshot(t, b)
	golden(t, "kernel.iptables", first)
	if ok, err := b.Installed(ctx); !ok || err != nil {
		t.Errorf("Installed after Apply = %v, %v", ok, err)
	}

	// A second Apply changes nothing (no second jump rule).
	if err := b.Apply(ctx, testState); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(first, snapshot(t, b)); diff != "" {
		t.Errorf("second Apply changed the rules (-first +second):\n%s", diff)
	}

	// Expected renders the same in a scratch namespace of its own.
	want, err := Expected(ctx, KindIPTables, testState)
	if err != nil {
		t.Fatal(err)
	}
	if want != first {
		t.Errorf("Expected differs from the applied rules:\n%s\nvs\n%s", want, first)
	}

	// Projects element by element equal a whole Apply of the same state,
	// and the rule count does not grow with NAT projects.
	if err := b.UpdateProjects(ctx, testState, projectState); err != nil {
		t.Fatal(err)
	}
	updated := snapshot(t, b)
	if !strings.Contains(updated, "ipset vmegress-nat: 172.31.0.6\n") || !strings.Contains(updated, "--to-destination 172.31.0.2:22") {
		t.Errorf("UpdateProjects did not add the NAT guest and the SSH forward:\n%s", updated)
	}
	if err := b.Apply(ctx, projectState); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(updated, snapshot(t, b)); diff != "" {
		t.Errorf("UpdateProjects and Apply differ (-update +apply):\n%s", diff)
	}
	if got, want := strings.Count(updated, "\n-A "), strings.Count(first, "\n-A ")+1; got != want {
		t.Errorf("%d rules with one SSH forward and one NAT project, want %d (one per SSH forward, none per NAT project)", got, want)
	}
	if err := b.UpdateProjects(ctx, projectState, testState); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(first, snapshot(t, b)); diff != "" {
		t.Errorf("removing the projects element by element left (-want +got):\n%s", diff)
	}

	// A bad state is refused before anything changes.
	bad := testState
	bad.GuestInterfaces = []string{`tap-" -j ACCEPT`}
	if err := b.Apply(ctx, bad); err == nil {
		t.Error("apply of an invalid interface name succeeded")
	}
	if diff := cmp.Diff(first, snapshot(t, b)); diff != "" {
		t.Errorf("refused apply changed the rules (-before +after):\n%s", diff)
	}

	// A failure in a later table puts the earlier ones back: the previous
	// rules stay in force.
	failing := &IPTables{Sets: b.Sets, limits: b.limits}
	failing.Exec = func(ctx context.Context, stdin []byte, argv ...string) ([]byte, error) {
		if strings.HasPrefix(string(stdin), "*filter") {
			return nil, errors.New("injected failure")
		}
		return b.Exec(ctx, stdin, argv...)
	}
	if err := failing.Apply(ctx, projectState); err == nil || !strings.Contains(err.Error(), "injected failure") {
		t.Errorf("apply with a failing filter table: %v", err)
	}
	if diff := cmp.Diff(first, snapshot(t, b)); diff != "" {
		t.Errorf("failed apply left changes (-before +after):\n%s", diff)
	}

	// A rule put above a jump (an ACCEPT there would bypass vmegress) shows
	// in the snapshot, and Apply moves the jump back to the top.
	if out, err := exec.Command("ip", "netns", "exec", ns, "iptables", "-t", "filter", "-I", "FORWARD", "1", "-i", "tap-x", "-j", "ACCEPT").CombinedOutput(); err != nil {
		t.Fatalf("inserting a rule above vmegress's: %v: %s", err, out)
	}
	if snap := snapshot(t, b); snap == first || !strings.Contains(snap, "-A FORWARD -j VMEGRESS-FORWARD"+notFirst) {
		t.Errorf("a rule above the FORWARD jump did not change the snapshot:\n%s", snap)
	}
	if err := b.Apply(ctx, testState); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(first, snapshot(t, b)); diff != "" {
		t.Errorf("Apply did not put the jump first again (-want +got):\n%s", diff)
	}
	out, _ := exec.Command("ip", "netns", "exec", ns, "iptables", "-S", "FORWARD").CombinedOutput()
	if want := "-P FORWARD ACCEPT\n-A FORWARD -j VMEGRESS-FORWARD\n-A FORWARD -i tap-x -j ACCEPT\n"; string(out) != want {
		t.Errorf("FORWARD after Apply:\n%s\nwant:\n%s", out, want)
	}
	exec.Command("ip", "netns", "exec", ns, "iptables", "-D", "FORWARD", "-i", "tap-x", "-j", "ACCEPT").Run()

	counts, err := b.Counters(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{
		"prerouting: fail closed: no listener, or not TCP (UDP, QUIC, ICMP, other protocols)",
		"prerouting: guest IPv6 (and anything not IPv4) never leaves",
		"nat_prerouting: guest DNS goes to the allowlist resolver",
		"forward: no forwarding from guests: egress only via the proxy or a cidr rule's flows",
		"prerouting: no rule of the guest's project for this port: refused at the SYN",
		"prerouting: cidr allow rule: forwarded by the kernel, no data plane",
		"output: the proxy never dials the host's own addresses",
	} {
		if _, ok := counts[k]; !ok {
			t.Errorf("counter %q missing from %v", k, counts)
		}
	}

	// Cleanup removes every line and the set, twice without error.
	for i := 0; i < 2; i++ {
		if err := b.Cleanup(ctx); err != nil {
			t.Fatalf("cleanup %d: %v", i+1, err)
		}
	}
	for _, save := range []string{"iptables-save", "ip6tables-save"} {
		out, err := exec.Command("ip", "netns", "exec", ns, save).CombinedOutput()
		if err != nil || strings.Contains(string(out), "VMEGRESS") {
			t.Errorf("%s after cleanup: %v\n%s", save, err, out)
		}
	}
	if _, err := b.Sets.IpsetList(NATSet); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("ipset %s after cleanup: %v", NATSet, err)
	}
	if s := snapshot(t, b); s != "" {
		t.Errorf("snapshot after cleanup: %q", s)
	}
}

// iptablesQuote quotes a comment the way iptables-save prints it.
func iptablesQuote(s string) string {
	r := strings.NewReplacer(`\`, `\\`, `"`, `\"`, `'`, `\'`)
	return `"` + r.Replace(s) + `"`
}

// FuzzParseCounters: any comment iptables-save prints comes back as it was
// written, with its count, under the nftables backend's chain name.
func FuzzParseCounters(f *testing.F) {
	f.Add("anti-spoofing: source is one of the host's own addresses", uint64(7))
	f.Add(`a "quoted" \ thing`, uint64(0))
	f.Fuzz(func(t *testing.T, comment string, n uint64) {
		if comment == "" || strings.ContainsAny(comment, "\n\r") || !utf8.ValidString(comment) {
			return
		}
		line := fmt.Sprintf("[%d:100] -A VMEGRESS-GUEST -m comment --comment %s -j DROP", n, iptablesQuote(comment))
		got := parseCounters([]string{line, "[1:1] -A VMEGRESS-GUEST -j RETURN"})
		if len(got) != 1 || got["prerouting: "+comment] != n {
			t.Fatalf("parseCounters(%q) = %v", line, got)
		}
	})
}

// TestUplink: with an uplink named, direct NAT egress (forward, masquerade,
// replies) is tied to it on both backends; the kernel accepts both.
func TestUplink(t *testing.T) {
	s := projectState
	s.Uplink = "eth0"
	rules, err := RenderIPTables(s)
	if err != nil {
		t.Fatal(err)
	}
	all := strings.Join(rules["ip nat"], "\n") + "\n" + strings.Join(rules["ip filter"], "\n")
	for _, want := range []string{
		"-A VMEGRESS-NAT-POST -o eth0 -m set --match-set vmegress-nat src",
		"-A VMEGRESS-NAT-EGRESS -o eth0 -j ACCEPT",
		"-A VMEGRESS-FORWARD -i eth0 -m set --match-set vmegress-nat dst",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("no %q in:\n%s", want, all)
		}
	}
	bad := s
	bad.Uplink = "eth*"
	if _, err := RenderIPTables(bad); err == nil {
		t.Error("a pattern as uplink was accepted")
	}

	nettest.Privileged(t)
	for _, kind := range []string{KindNFTables, KindIPTables} {
		snap, err := Expected(context.Background(), kind, s)
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		want := `oifname "eth0" masquerade`
		if kind == KindIPTables {
			want = "-o eth0 -m set --match-set vmegress-nat src"
		}
		if !strings.Contains(snap, want) {
			t.Errorf("%s: no %q in the kernel's listing:\n%s", kind, want, snap)
		}
	}
}

// ipsetKeys lists a set's members as memberKey writes them, sorted.
func ipsetKeys(t *testing.T, b *IPTables, set string) string {
	t.Helper()
	_, keys, ok, err := b.listSet(set)
	if err != nil || !ok {
		t.Fatalf("listing ipset %s: %v (exists: %v)", set, err, ok)
	}
	return strings.Join(keys, " ")
}

// TestIPTablesKernelElements: the guests' kernel parts become ipset
// members (a deny on every port stored for the ports the guest forwards or
// proxies, a /0 as its two halves, which the kernel matches), UpdateProjects
// moves them member by member to what an Apply gives, a new
// max_connections value is ErrNewLimit until an Apply adds its rule, a
// limit no guest has any more loses its set, and the per-guest refusal
// counts do not show in the snapshot.
func TestIPTablesKernelElements(t *testing.T) {
	nettest.Privileged(t)
	ns := nettest.NewNS(t)
	ctx := context.Background()
	b := iptablesIn(t, ns)
	guest := func(k policy.Kernel) Guest { return Guest{Addr: netip.MustParseAddr("172.31.0.2"), Kernel: k} }
	s1 := testState
	s1.Guests = []Guest{guest(policy.Kernel{
		MaxConnections: 5,
		Forward:        []policy.KernelFlow{{Prefix: pfx("10.1.0.0/16"), Ports: []uint16{5432}}, {Prefix: pfx("10.1.2.0/24"), Ports: []uint16{5432, 22}}},
		Deny:           []policy.KernelFlow{{Prefix: pfx("10.1.9.0/24")}, {Prefix: pfx("10.1.9.9/32"), Ports: []uint16{22}}},
		Proxied:        []uint16{443},
	}), {Addr: netip.MustParseAddr("172.31.0.6"), Kernel: policy.Kernel{Audit: true}}}
	s2 := testState
	s2.Guests = []Guest{guest(policy.Kernel{
		MaxConnections: 5,
		Forward:        []policy.KernelFlow{{Prefix: pfx("0.0.0.0/0"), Ports: []uint16{5432}}},
		Proxied:        []uint16{80, 443},
	})}
	if err := b.Apply(ctx, s1); err != nil {
		t.Fatal(err)
	}
	want1 := map[string]string{
		ipsFwd:      "172.31.0.2,tcp:22,10.1.2.0/24 172.31.0.2,tcp:5432,10.1.0.0/16",
		ipsDeny:     "172.31.0.2,tcp:22,10.1.9.0/24 172.31.0.2,tcp:443,10.1.9.0/24 172.31.0.2,tcp:5432,10.1.9.0/24",
		ipsProxied:  "172.31.0.2,tcp:443",
		ipsAudit:    "172.31.0.6",
		ipsLimit(5): "172.31.0.2",
	}
	check := func(want map[string]string) {
		t.Helper()
		for set, w := range want {
			if got := ipsetKeys(t, b, set); got != w {
				t.Errorf("ipset %s holds %q, want %q", set, got, w)
			}
		}
	}
	check(want1)
	applied1 := snapshot(t, b)

	if err := b.UpdateProjects(ctx, s1, s2); err != nil {
		t.Fatal(err)
	}
	check(map[string]string{
		ipsFwd: "172.31.0.2,tcp:5432,0.0.0.0/1 172.31.0.2,tcp:5432,128.0.0.0/1", ipsDeny: "",
		ipsProxied: "172.31.0.2,tcp:443 172.31.0.2,tcp:80", ipsAudit: "", ipsLimit(5): "172.31.0.2",
	})
	// The kernel matches any destination through the two halves.
	for _, dst := range []string{"1.2.3.4", "200.1.1.1"} {
		ok, err := b.Sets.(*netlink.Handle).IpsetTest(ipsFwd, &netlink.IPSetEntry{IP: net.ParseIP("172.31.0.2"), Port: u16(5432), Protocol: u8(6), IP2: net.ParseIP(dst), CIDR2: 32})
		if err != nil || !ok {
			t.Errorf("%s:5432 not matched by the forward set: %v, %v", dst, ok, err)
		}
	}
	updated := snapshot(t, b)
	if err := b.Apply(ctx, s2); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(updated, snapshot(t, b)); diff != "" {
		t.Errorf("UpdateProjects and Apply differ (-update +apply):\n%s", diff)
	}
	if err := b.UpdateProjects(ctx, s2, s1); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(applied1, snapshot(t, b)); diff != "" {
		t.Errorf("back to s1 member by member differs from its Apply (-apply +update):\n%s", diff)
	}

	// A cap no rule counts needs the whole ruleset.
	s3 := s1
	s3.Guests = []Guest{guest(policy.Kernel{MaxConnections: 7, Proxied: []uint16{443}})}
	if err := b.UpdateProjects(ctx, s1, s3); !errors.Is(err, ErrNewLimit) {
		t.Fatalf("UpdateProjects to a new max_connections: %v, want ErrNewLimit", err)
	}
	if err := b.Apply(ctx, s3); err != nil {
		t.Fatal(err)
	}
	snap := snapshot(t, b)
	if !strings.Contains(snap, "--match-set vmegress-k-limit-7 src -m connlimit --connlimit-above 7 --connlimit-mask 32 --connlimit-saddr") ||
		!strings.Contains(snap, "ipset vmegress-k-limit-7: 172.31.0.2\n") || strings.Contains(snap, "limit-5") {
		t.Errorf("after Apply of a new cap:\n%s", snap)
	}
	if _, err := b.Sets.IpsetList(ipsLimit(5)); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("the set of a cap no guest has is still there: %v", err)
	}

	// Refusal counts change with traffic, not the snapshot.
	if err := b.Sets.IpsetAdd(ipsRefused, &netlink.IPSetEntry{IP: net.ParseIP("172.31.0.2")}); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(snap, snapshot(t, b)); diff != "" {
		t.Errorf("a refusal count changed the snapshot:\n%s", diff)
	}
	if err := b.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	all, err := b.Sets.IpsetListAll()
	if err != nil || len(all) != 0 {
		t.Errorf("ipsets after cleanup: %v, %v", all, err)
	}
}

// TestPhasedOps: element changes that let less through come first, so no
// moment between two states lets through what neither would.
func TestPhasedOps(t *testing.T) {
	g := netip.MustParseAddr("172.31.0.2")
	old := State{Guests: []Guest{{Addr: g, Kernel: policy.Kernel{
		Forward: []policy.KernelFlow{{Prefix: pfx("10.0.0.0/8"), Ports: []uint16{22}}},
		Deny:    []policy.KernelFlow{{Prefix: pfx("10.1.0.0/16"), Ports: []uint16{22}}},
	}}}}
	s := State{Guests: []Guest{{Addr: g, Kernel: policy.Kernel{
		MaxConnections: 2,
		Forward:        []policy.KernelFlow{{Prefix: pfx("10.1.0.0/16"), Ports: []uint16{22}}},
		Deny:           []policy.KernelFlow{{Prefix: pfx("10.1.2.0/24"), Ports: []uint16{22}}},
	}}}, NATGuests: []netip.Addr{netip.MustParseAddr("172.31.0.6")}}
	from, to := ipsMembers(old), ipsMembers(s)
	have := map[string][]string{}
	for set, ms := range from {
		for _, m := range ms {
			have[set] = append(have[set], m.key)
		}
	}
	var got []string
	for _, o := range diffOps(have, to, []string{NATSet, ipsDeny, ipsFwd, ipsLimit(2)}) {
		verb := "add"
		if o.del {
			verb = "del"
		}
		got = append(got, verb+" "+o.set+" "+o.m.key)
	}
	want := []string{
		"add vmegress-k-deny 172.31.0.2,tcp:22,10.1.2.0/24",
		"del vmegress-k-forward 172.31.0.2,tcp:22,10.0.0.0/8",
		"add vmegress-k-limit-2 172.31.0.2",
		"add vmegress-nat 172.31.0.6",
		"del vmegress-k-deny 172.31.0.2,tcp:22,10.1.0.0/16",
		"add vmegress-k-forward 172.31.0.2,tcp:22,10.1.0.0/16",
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("element changes (-want +got):\n%s", diff)
	}
}
