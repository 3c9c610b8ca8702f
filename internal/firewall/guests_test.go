package firewall

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/nettest"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/world"
)

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// TestKernelElements: the guests' kernel parts become set elements, and
// UpdateProjects moves them element by element, also when a range grows
// over one it held (nftables refuses overlapping intervals: the outer one
// is kept, the inner one goes first).
func TestKernelElements(t *testing.T) {
	nettest.Privileged(t)
	ns := nettest.NewNS(t)
	ctx := context.Background()
	guest := func(k policy.Kernel) Guest { return Guest{Addr: netip.MustParseAddr("172.31.0.2"), Kernel: k} }
	s1 := testState
	s1.Guests = []Guest{guest(policy.Kernel{
		Forward: []policy.KernelFlow{{Prefix: pfx("10.1.0.0/16"), Ports: []uint16{5432}}, {Prefix: pfx("10.1.2.0/24"), Ports: []uint16{5432, 22}}},
		Deny:    []policy.KernelFlow{{Prefix: pfx("10.1.9.0/24")}, {Prefix: pfx("10.1.9.9/32"), Ports: []uint16{22}}},
		Proxied: []uint16{443},
	}), {Addr: netip.MustParseAddr("172.31.0.6"), Kernel: policy.Kernel{Audit: true}}}
	s2 := testState
	s2.Guests = []Guest{guest(policy.Kernel{
		Forward: []policy.KernelFlow{{Prefix: pfx("10.0.0.0/8"), Ports: []uint16{5432}}},
		Proxied: []uint16{80, 443},
	})}
	var b *NFTables
	err := world.InNS(ns, func() error {
		var err error
		if b, err = NewHostNFTables(); err != nil {
			return err
		}
		return b.Apply(ctx, s1)
	})
	if err != nil {
		t.Fatal(err)
	}
	want1 := map[string]string{
		setKFwd:     "172.31.0.2 . 10.1.2.0/24 . 22, 172.31.0.2 . 10.1.0.0/16 . 5432",
		setKDeny:    "172.31.0.2 . 10.1.9.9 . 22",
		setKDenyAll: "172.31.0.2 . 10.1.9.0/24",
		setKProxy:   "172.31.0.2 . 443",
		setKAudit:   "172.31.0.6",
	}
	checkSets(t, ns, want1)
	if err := world.InNS(ns, func() error { return b.UpdateProjects(ctx, s1, s2) }); err != nil {
		t.Fatal(err)
	}
	checkSets(t, ns, map[string]string{setKFwd: "172.31.0.2 . 10.0.0.0/8 . 5432", setKDeny: "", setKDenyAll: "", setKProxy: "172.31.0.2 . 80, 172.31.0.2 . 443", setKAudit: ""})
	// And back: the state is what an Apply of s1 gives.
	if err := world.InNS(ns, func() error { return b.UpdateProjects(ctx, s2, s1) }); err != nil {
		t.Fatal(err)
	}
	checkSets(t, ns, want1)
}

func checkSets(t *testing.T, ns string, want map[string]string) {
	t.Helper()
	for set, w := range want {
		out, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "set", "inet", TableName, set).CombinedOutput()
		if err != nil {
			t.Fatalf("nft list set %s: %v: %s", set, err, out)
		}
		got := ""
		if _, el, ok := strings.Cut(string(out), "elements = {"); ok {
			el, _, _ = strings.Cut(el, "}")
			got = strings.Join(strings.Fields(strings.ReplaceAll(el, ",", " ,")), " ")
			got = strings.ReplaceAll(got, " ,", ",")
		}
		if got != w {
			t.Errorf("set %s holds %q, want %q", set, got, w)
		}
	}
}

// TestAdmit: timed k_tcp elements come and go without touching the
// snapshot (they change with DNS answers, not with the desired state).
func TestAdmit(t *testing.T) {
	nettest.Privileged(t)
	ns := nettest.NewNS(t)
	ctx := context.Background()
	g, a := netip.MustParseAddr("172.31.0.2"), netip.MustParseAddr("198.18.1.22")
	es := []Admitted{{Guest: g, Addr: a, Port: 22, TTL: 90 * time.Second}}
	err := world.InNS(ns, func() error {
		b, err := NewHostNFTables()
		if err != nil {
			return err
		}
		if err := b.Apply(ctx, testState); err != nil {
			return err
		}
		before, err := b.Snapshot(ctx)
		if err != nil {
			return err
		}
		if err := b.Admit(ctx, es); err != nil {
			return err
		}
		if err := b.Admit(ctx, es); err != nil {
			return fmt.Errorf("admitting twice: %w", err)
		}
		out, _ := exec.Command("nft", "list", "set", "inet", TableName, setKTCP).CombinedOutput()
		if !strings.Contains(string(out), "172.31.0.2 . 198.18.1.22 . 22 timeout 1m30s expires") {
			t.Errorf("no timed element after Admit:\n%s", out)
		}
		if after, _ := b.Snapshot(ctx); after != before {
			t.Errorf("Admit changed the snapshot")
		}
		if err := b.Unadmit(ctx, es); err != nil {
			return err
		}
		if err := b.Unadmit(ctx, es); err != nil {
			return fmt.Errorf("withdrawing twice: %w", err)
		}
		out, _ = exec.Command("nft", "list", "set", "inet", TableName, setKTCP).CombinedOutput()
		if strings.Contains(string(out), "198.18.1.22") {
			t.Errorf("element left after Unadmit:\n%s", out)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
