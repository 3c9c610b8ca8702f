package hostnet

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/vmegress/vmegress/internal/nettest"
	"github.com/vmegress/vmegress/internal/world"
)

// fakeSys makes a sysctl tree with the given forwarding values.
func fakeSys(t *testing.T, values map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for ifname, v := range values {
		dir := filepath.Join(root, "net/ipv4/conf", ifname)
		os.MkdirAll(dir, 0o755)
		os.WriteFile(filepath.Join(dir, "forwarding"), []byte(v+"\n"), 0o644)
	}
	return root
}

func readSys(t *testing.T, root, ifname string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "net/ipv4/conf", ifname, "forwarding"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestGuardApplyRestore: forwarding goes off on matching interfaces (on for
// excluded ones), the old values are recorded before and put back by
// Restore; reading by file and by a Forwarding func behave alike.
func TestGuardApplyRestore(t *testing.T) {
	for _, viaFunc := range []bool{false, true} {
		root := fakeSys(t, map[string]string{"tap-a": "1", "tap-b": "0", "tap-nat": "0", "eth0": "1"})
		g := ForwardingGuard{
			Patterns:  []string{"tap-*"},
			Exclude:   []string{"tap-nat"},
			StateFile: filepath.Join(t.TempDir(), "forwarding.json"),
			ProcSys:   root,
			Links:     func() ([]string, error) { return []string{"lo", "eth0", "tap-a", "tap-b", "tap-nat"}, nil },
		}
		if viaFunc {
			g.Forwarding = func() (map[string]string, error) {
				out := map[string]string{}
				for _, n := range []string{"eth0", "tap-a", "tap-b", "tap-nat"} {
					out[n] = readSys(t, root, n)
				}
				return out, nil
			}
		}
		changed, err := g.Apply()
		if err != nil || !reflect.DeepEqual(changed, []string{"tap-a"}) {
			t.Errorf("Apply (func %v) = %v, %v; want [tap-a]", viaFunc, changed, err)
		}
		for ifname, want := range map[string]string{"tap-a": "0", "tap-b": "0", "tap-nat": "1", "eth0": "1"} {
			if got := readSys(t, root, ifname); got != want {
				t.Errorf("%s forwarding = %s, want %s", ifname, got, want)
			}
		}
		var saved map[string]string
		b, _ := os.ReadFile(g.StateFile)
		if json.Unmarshal(b, &saved); !reflect.DeepEqual(saved, map[string]string{"tap-a": "1"}) {
			t.Errorf("recorded %v, want tap-a=1", saved)
		}
		if changed, _ := g.Apply(); len(changed) != 0 {
			t.Errorf("a second Apply changed %v", changed)
		}
		if err := g.Restore(); err != nil {
			t.Fatal(err)
		}
		if got := readSys(t, root, "tap-a"); got != "1" {
			t.Errorf("after Restore tap-a forwarding = %s, want 1", got)
		}
	}
}

// TestLinkForwarding: the netconf dump agrees with the sysctl files, in a
// namespace of the test's own.
func TestLinkForwarding(t *testing.T) {
	nettest.Privileged(t)
	ns := nettest.NewNS(t)
	for _, argv := range [][]string{
		{"ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"},
		{"sysctl", "-qw", "net.ipv4.conf.d0.forwarding=1"},
		{"sysctl", "-qw", "net.ipv4.conf.d1.forwarding=0"},
	} {
		if out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, argv...)...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", argv, err, out)
		}
	}
	var got map[string]string
	err := world.InNS(ns, func() error {
		h, err := netlink.NewHandle()
		if err != nil {
			return err
		}
		defer h.Close()
		got, err = LinkForwarding(h)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, ifname := range []string{"lo", "d0", "d1"} {
		out, err := exec.Command("ip", "netns", "exec", ns, "cat", "/proc/sys/net/ipv4/conf/"+ifname+"/forwarding").Output()
		if err != nil {
			t.Fatal(err)
		}
		if want := strings.TrimSpace(string(out)); got[ifname] != want {
			t.Errorf("%s: netconf says %q, the sysctl %q (all: %v)", ifname, got[ifname], want, got)
		}
	}
	if got["d0"] != "1" || got["d1"] != "0" {
		t.Errorf("d0/d1 = %q/%q, want 1/0", got["d0"], got["d1"])
	}
}
