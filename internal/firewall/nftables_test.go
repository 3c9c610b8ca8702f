package firewall

import (
	"context"
	"flag"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"sigs.k8s.io/knftables"

	"github.com/vmegress/vmegress/internal/nettest"
	"github.com/vmegress/vmegress/internal/world"
)

var update = flag.Bool("update", false, "rewrite golden files")

var testState = State{
	VMCIDR:          netip.MustParsePrefix("172.31.0.0/16"),
	GuestInterfaces: []string{"tap-*", "fc-tap0"},
	TProxyPort:      15001,
	DNSPort:         15053,
	Mark:            0x1,
	UpstreamMark:    0x2,
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		os.MkdirAll("testdata", 0o755)
		os.WriteFile(path, []byte(got), 0o644)
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading golden file (run with -update to create): %v", err)
	}
	if diff := cmp.Diff(string(want), got); diff != "" {
		t.Errorf("%s (-want +got):\n%s", name, diff)
	}
}

// TestApplyFake checks the desired table through knftables' fake, and that a
// second Apply of the same state gives the same table.
func TestApplyFake(t *testing.T) {
	fake := knftables.NewFake(knftables.InetFamily, TableName)
	b := NewNFTables(fake)
	ctx := context.Background()
	if err := b.Apply(ctx, testState); err != nil {
		t.Fatal(err)
	}
	first := fake.Dump()
	golden(t, "fake-dump.nft", first)
	if err := b.Apply(ctx, testState); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(first, fake.Dump()); diff != "" {
		t.Errorf("second Apply changed the table (-first +second):\n%s", diff)
	}
	if ok, err := b.Installed(ctx); !ok || err != nil {
		t.Errorf("Installed after Apply = %v, %v", ok, err)
	}
	if err := b.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if got := fake.Dump(); got != "" {
		t.Errorf("after Cleanup the fake holds:\n%s", got)
	}
	if ok, err := b.Installed(ctx); ok || err != nil {
		t.Errorf("Installed after Cleanup = %v, %v", ok, err)
	}
}

// TestKernelRuleset applies the rendered table in a fresh netns and compares
// the kernel's listing with a golden file: the kernel is the judge.
func TestKernelRuleset(t *testing.T) {
	nettest.Privileged(t)
	ns := nettest.NewNS(t)
	ctx := context.Background()
	var b *NFTables
	err := world.InNS(ns, func() error {
		var err error
		b, err = NewHostNFTables()
		if err != nil {
			return err
		}
		return b.Apply(ctx, testState)
	})
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "kernel.nft", listTable(t, ns))

	// Expected renders the same in a scratch namespace of its own.
	want, err := Expected(ctx, KindNFTables, testState)
	if err != nil {
		t.Fatal(err)
	}
	if got := counterRE.ReplaceAllString(listTable(t, ns), "counter"); got != want {
		t.Errorf("Expected differs from the applied table:\n%s\nvs\n%s", want, got)
	}

	// A failing apply leaves the previous ruleset in force.
	before := listTable(t, ns)
	bad := testState
	bad.GuestInterfaces = []string{`tap-"; flush ruleset; "`}
	err = world.InNS(ns, func() error { return b.Apply(ctx, bad) })
	if err == nil {
		t.Fatal("apply of an invalid state succeeded")
	}
	if diff := cmp.Diff(before, listTable(t, ns)); diff != "" {
		t.Errorf("failed apply changed the ruleset (-before +after):\n%s", diff)
	}

	// Cleanup removes exactly the table, twice without error.
	for i := 0; i < 2; i++ {
		if err := world.InNS(ns, func() error { return b.Cleanup(ctx) }); err != nil {
			t.Fatalf("cleanup %d: %v", i+1, err)
		}
	}
	out, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "ruleset").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "" {
		t.Errorf("ruleset after cleanup: %v %q", err, out)
	}
}

func listTable(t *testing.T, ns string) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "table", "inet", TableName).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list table: %v: %s", err, out)
	}
	return string(out)
}

// TestUnadmitGuestsFake: UnadmitGuests deletes the named guests' timed
// elements of every admitted set and leaves the others'.
func TestUnadmitGuestsFake(t *testing.T) {
	fake := knftables.NewFake(knftables.InetFamily, TableName)
	b := NewNFTables(fake)
	ctx := context.Background()
	if err := b.Apply(ctx, testState); err != nil {
		t.Fatal(err)
	}
	g1, g2 := netip.MustParseAddr("172.31.0.2"), netip.MustParseAddr("172.31.0.6")
	addr := netip.MustParseAddr("198.18.1.22")
	if err := b.Admit(ctx, []Admitted{
		{Guest: g1, Addr: addr, Port: 22, TTL: time.Minute},
		{Guest: g1, Addr: addr, Port: 23, TTL: time.Minute, Deny: true},
		{Guest: g1, Addr: addr, TTL: time.Minute, Deny: true, AllPorts: true},
		{Guest: g2, Addr: addr, Port: 22, TTL: time.Minute},
	}); err != nil {
		t.Fatal(err)
	}
	if err := b.UnadmitGuests(ctx, []netip.Addr{g1}); err != nil {
		t.Fatal(err)
	}
	var left []string
	for _, set := range []string{setKTCP, setKTCPDeny, setKTCPDenyAll} {
		els, err := fake.ListElements(ctx, "set", set)
		if err != nil {
			t.Fatal(err)
		}
		for _, el := range els {
			left = append(left, set+": "+strings.Join(el.Key, " . "))
		}
	}
	if len(left) != 1 || !strings.HasPrefix(left[0], setKTCP+": "+g2.String()+" . ") {
		t.Errorf("after UnadmitGuests(%s) the admitted sets hold %q, want only %s's element", g1, left, g2)
	}
	if err := b.UnadmitGuests(ctx, []netip.Addr{g1}); err != nil {
		t.Errorf("a second UnadmitGuests: %v", err)
	}
}
