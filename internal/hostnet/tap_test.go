package hostnet

import (
	"errors"
	"net/netip"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/vmegress/vmegress/internal/nettest"
)

// enterNS moves the test's goroutine, locked to its OS thread, into a fresh
// netns until the test ends (TUNSETIFF and /proc/sys act on the calling
// thread's namespace) and returns a netlink handle there and its name.
func enterNS(t *testing.T) (*netlink.Handle, string) {
	t.Helper()
	nettest.Privileged(t)
	name := nettest.NewNS(t)
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := netns.Set(h); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		netns.Set(orig) // the thread stays locked: the runtime discards it
		orig.Close()
		h.Close()
	})
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nl.Close)
	return nl, name
}

func ipIn(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns, "ip"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %v: %v: %s", args, err, out)
	}
	return string(out)
}

func exists(nl *netlink.Handle, name string) bool {
	_, err := nl.LinkByName(name)
	return err == nil
}

func tapFor(name, project string, host string) TAP {
	hostIP := netip.MustParseAddr(host)
	return TAP{Name: name, Project: project, HostIP: hostIP, GuestIP: hostIP.Next(), GuestMAC: "02:00:00:00:00:01"}
}

// TestTAPOwnership (issue 12, item 10): vmegress marks the TAPs it creates,
// adopts only its own for the same project, and deletes nothing else.
func TestTAPOwnership(t *testing.T) {
	nl, ns := enterNS(t)

	if err := CreateTAP(nl, tapFor("tap-a", "a", "172.31.0.1")); err != nil {
		t.Fatal(err)
	}
	link, err := nl.LinkByName("tap-a")
	if err != nil {
		t.Fatal(err)
	}
	if link.Attrs().Alias != "vmegress:a" || link.Type() != "tuntap" {
		t.Errorf("created TAP: alias %q, type %s", link.Attrs().Alias, link.Type())
	}
	if err := CreateTAP(nl, tapFor("tap-a", "a", "172.31.0.1")); err != nil {
		t.Errorf("net up again (same project): %v", err)
	}
	if err := CreateTAP(nl, tapFor("tap-a", "b", "172.31.0.5")); !errors.Is(err, ErrNotOurs) || !strings.Contains(err.Error(), "belongs to project a") {
		t.Errorf("another project adopting tap-a: %v", err)
	}
	if err := DeleteTAP(nl, "tap-a", "b"); !errors.Is(err, ErrNotOurs) || !exists(nl, "tap-a") {
		t.Errorf("project b deleting a's TAP: %v (exists: %v)", err, exists(nl, "tap-a"))
	}

	// Another guest's veth (the review's tap-rtv-a): never adopted, never deleted.
	ipIn(t, ns, "link", "add", "tap-rtv-a", "type", "veth", "peer", "name", "rtv-b")
	if err := CreateTAP(nl, tapFor("tap-rtv-a", "t2", "172.31.0.9")); !errors.Is(err, ErrNotOurs) || !strings.Contains(err.Error(), "veth") {
		t.Errorf("adopting a veth: %v", err)
	}
	if err := DeleteTAP(nl, "tap-rtv-a", "t2"); !errors.Is(err, ErrNotOurs) || !exists(nl, "tap-rtv-a") {
		t.Errorf("deleting a veth: %v (exists: %v)", err, exists(nl, "tap-rtv-a"))
	}
	if out := ipIn(t, ns, "-4", "addr", "show", "dev", "tap-rtv-a"); strings.Contains(out, "172.31.0.9") {
		t.Errorf("the refused veth got an address:\n%s", out)
	}

	// A TAP someone else made (no alias): not adopted, not deleted ...
	ipIn(t, ns, "tuntap", "add", "dev", "tap-fc", "mode", "tap")
	if err := CreateTAP(nl, tapFor("tap-fc", "c", "172.31.0.13")); !errors.Is(err, ErrNotOurs) {
		t.Errorf("adopting an unmarked TAP: %v", err)
	}
	if err := DeleteTAP(nl, "tap-fc", "c"); !errors.Is(err, ErrNotOurs) || !exists(nl, "tap-fc") {
		t.Errorf("deleting an unmarked TAP: %v", err)
	}
	// ... unless it carries the project's host address: an older vmegress
	// made it for this placement; net up adopts and marks it.
	ipIn(t, ns, "addr", "add", "172.31.0.13/30", "dev", "tap-fc")
	if err := CreateTAP(nl, tapFor("tap-fc", "c", "172.31.0.13")); err != nil {
		t.Errorf("adopting an unmarked TAP with the project's address: %v", err)
	}
	if err := DeleteTAP(nl, "tap-fc", "c"); err != nil || exists(nl, "tap-fc") {
		t.Errorf("deleting the adopted TAP: %v", err)
	}

	// A TUN is not a TAP.
	ipIn(t, ns, "tuntap", "add", "dev", "tun-x", "mode", "tun")
	ipIn(t, ns, "link", "set", "tun-x", "alias", "vmegress:x")
	if err := DeleteTAP(nl, "tun-x", "x"); !errors.Is(err, ErrNotOurs) || !exists(nl, "tun-x") {
		t.Errorf("deleting a TUN: %v", err)
	}

	if err := DeleteTAP(nl, "tap-a", "a"); err != nil || exists(nl, "tap-a") {
		t.Errorf("deleting a's own TAP: %v", err)
	}
	if err := DeleteTAP(nl, "tap-a", "a"); err != nil {
		t.Errorf("deleting a missing TAP: %v", err)
	}
}

// TestCreateTAPRollsBack: a TAP created by a call that then fails is gone.
func TestCreateTAPRollsBack(t *testing.T) {
	nl, _ := enterNS(t)
	bad := tapFor("tap-r", "r", "172.31.0.1")
	bad.GuestMAC = "not a mac"
	if err := CreateTAP(nl, bad); err == nil {
		t.Fatal("CreateTAP with a bad MAC succeeded")
	}
	if exists(nl, "tap-r") {
		t.Error("the failed CreateTAP left tap-r behind")
	}
	for _, name := range []string{"../../etc", "tap a", "tap-a*", ".."} {
		if err := CreateTAP(nl, tapFor(name, "r", "172.31.0.1")); err == nil || exists(nl, name) {
			t.Errorf("CreateTAP(%q): %v", name, err)
		}
	}
}
