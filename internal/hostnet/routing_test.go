package hostnet

import (
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/vmegress/vmegress/internal/nettest"
)

func show(t *testing.T, ns string) string {
	t.Helper()
	var b strings.Builder
	for _, argv := range [][]string{{"ip", "rule"}, {"ip", "route", "show", "table", "all"}} {
		out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, argv...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v: %s", argv, err, out)
		}
		b.Write(out)
	}
	return b.String()
}

// TestPolicyRouting runs against the kernel in a throwaway netns.
func TestPolicyRouting(t *testing.T) {
	nettest.Privileged(t)
	ns := nettest.NewNS(t)
	h, err := netns.GetFromName(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()

	before := show(t, ns)
	pr := PolicyRouting{Mark: 0x1, Table: 100}
	if ok, err := pr.Installed(nl); ok || err != nil {
		t.Fatalf("Installed before Ensure = %v, %v", ok, err)
	}
	if err := pr.Ensure(nl); err != nil {
		t.Fatal(err)
	}
	first := show(t, ns)
	for _, want := range []string{"9000:\tfrom all fwmark 0x1 lookup 100 proto 118", "local default dev lo table 100 proto 118 scope host"} {
		if !strings.Contains(first, want) {
			t.Errorf("after Ensure, no %q in:\n%s", want, first)
		}
	}
	if ok, err := pr.Installed(nl); !ok || err != nil {
		t.Errorf("Installed after Ensure = %v, %v", ok, err)
	}
	if err := pr.Ensure(nl); err != nil {
		t.Fatal(err)
	}
	if again := show(t, ns); again != first {
		t.Errorf("second Ensure changed routing:\n%s\nvs\n%s", first, again)
	}
	// A changed mark and table replace the old rule; Remove takes out both
	// generations without being told the old ones.
	moved := PolicyRouting{Mark: 0x4, Table: 200}
	if err := moved.Ensure(nl); err != nil {
		t.Fatal(err)
	}
	if s := show(t, ns); strings.Contains(s, "fwmark 0x1") || !strings.Contains(s, "fwmark 0x4 lookup 200") {
		t.Errorf("after a mark change:\n%s", s)
	}
	// A rule vmegress did not add survives.
	if out, err := exec.Command("ip", "netns", "exec", ns, "ip", "rule", "add", "fwmark", "0x1", "lookup", "100", "pref", "9100").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for i := 0; i < 2; i++ {
		if err := (PolicyRouting{}).Remove(nl); err != nil {
			t.Fatal(err)
		}
	}
	after := show(t, ns)
	if !strings.Contains(after, "9100:\tfrom all fwmark 0x1 lookup 100") {
		t.Errorf("Remove took a rule it did not add:\n%s", after)
	}
	if strings.Contains(after, "proto 118") {
		t.Errorf("Remove left vmegress entries:\n%s", after)
	}
	exec.Command("ip", "netns", "exec", ns, "ip", "rule", "del", "pref", "9100").Run()
	if s := show(t, ns); s != before {
		t.Errorf("not back to the start:\n%s\nvs\n%s", before, s)
	}
}

// TestRoutingLock: with Lock, packets from the guest range are routed on
// only when marked; the host's own and local delivery are unaffected.
func TestRoutingLock(t *testing.T) {
	nettest.Privileged(t)
	ns := nettest.NewNS(t)
	h, err := netns.GetFromName(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	pr := PolicyRouting{Mark: 0x1, Table: 100, Lock: netip.MustParsePrefix("172.31.0.0/16"), LockMark: 0x400000}
	if err := pr.Ensure(nl); err != nil {
		t.Fatal(err)
	}
	first := show(t, ns)
	for _, want := range []string{
		"9001:\tfrom all fwmark 0x400000/0x400000 lookup main proto 118",
		"9002:\tfrom 172.31.0.0/16 iif lo lookup main proto 118",
		"9003:\tfrom 172.31.0.0/16 blackhole proto 118",
	} {
		if !strings.Contains(first, want) {
			t.Errorf("after Ensure, no %q in:\n%s", want, first)
		}
	}
	if ok, err := pr.Installed(nl); !ok || err != nil {
		t.Errorf("Installed after Ensure = %v, %v\n%s", ok, err, first)
	}
	if err := pr.Ensure(nl); err != nil {
		t.Fatal(err)
	}
	if again := show(t, ns); again != first {
		t.Errorf("second Ensure changed routing:\n%s\nvs\n%s", first, again)
	}
	// Taking the blackhole out is drift.
	if out, err := exec.Command("ip", "netns", "exec", ns, "ip", "rule", "del", "pref", "9003").CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if ok, _ := pr.Installed(nl); ok {
		t.Error("Installed without the blackhole rule")
	}
}
