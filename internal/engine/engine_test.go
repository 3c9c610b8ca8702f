package engine

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/ctflow"
	"github.com/vmegress/vmegress/internal/firewall"
	"github.com/vmegress/vmegress/internal/hostnet"
	"github.com/vmegress/vmegress/internal/placement"
	"github.com/vmegress/vmegress/internal/state"
)

// journal records the side effects in the order they happen.
type journal struct{ events []string }

func (j *journal) add(s string) { j.events = append(j.events, s) }

type fakeHost struct {
	j        *journal
	failTAP  bool
	prefixes []placement.HostPrefix
	taps     map[string]bool
}

func (h *fakeHost) CreateTAP(t hostnet.TAP, project string) (bool, error) {
	if h.failTAP {
		return false, errors.New("creating TAP: injected failure")
	}
	created := !h.taps[t.Name]
	h.taps[t.Name] = true
	h.j.add("tap+ " + t.Name)
	return created, nil
}

func (h *fakeHost) DeleteTAP(name, project string) error {
	delete(h.taps, name)
	h.j.add("tap- " + name)
	return nil
}

func (h *fakeHost) Prefixes(skip func(string) bool) ([]placement.HostPrefix, error) {
	return h.prefixes, nil
}

func (h *fakeHost) Links() (map[string]bool, error) {
	out := map[string]bool{}
	for n := range h.taps {
		out[n] = true
	}
	return out, nil
}

// TestOpenRestoresMissingTAPs: a daemon start re-creates the TAP of a placed
// project that has none (a crash between a removal's TAP deletion and its
// state write, or a reboot), and leaves the ones that exist alone.
func TestOpenRestoresMissingTAPs(t *testing.T) {
	dir := t.TempDir()
	st := &state.State{Projects: map[string]state.Project{
		"alpha": {Name: "alpha", TAP: "tap-alpha", Subnet: netip.MustParsePrefix("172.31.0.0/30"), MAC: state.MAC("alpha"), Egress: state.EgressProxy},
		"beta":  {Name: "beta", TAP: "tap-beta", Subnet: netip.MustParsePrefix("172.31.0.4/30"), MAC: state.MAC("beta"), Egress: state.EgressProxy},
	}}
	if err := (state.Store{Dir: dir}).Save(st); err != nil {
		t.Fatal(err)
	}
	j := &journal{}
	host := &fakeHost{j: j, taps: map[string]bool{"tap-beta": true}}
	e := &Engine{Store: state.Store{Dir: dir}, Interception: Interception{Firewall: &fakeFirewall{j: j}, Netlink: nullNetlink{}}, Host: host}
	if err := e.Open(context.Background(), testConfig(), true); err != nil {
		t.Fatal(err)
	}
	if want := []string{"apply", "tap+ tap-alpha"}; !slices.Equal(j.events, want) {
		t.Errorf("side effects %q, want %q (the ruleset first, then only the missing TAP)", j.events, want)
	}
}

// fakeFirewall is installed and records element updates.
type fakeFirewall struct {
	j          *journal
	failUpdate bool
	nat        []string
	unadmitted []netip.Addr // UnadmitGuests' guests, in order
}

func (f *fakeFirewall) Apply(ctx context.Context, s firewall.State) error {
	f.j.add("apply")
	f.nat = s.NATIfaces
	return nil
}

func (f *fakeFirewall) UpdateProjects(ctx context.Context, old, s firewall.State) error {
	if f.failUpdate {
		return errors.New("updating elements: injected failure")
	}
	f.j.add("fw " + strings.Join(old.NATIfaces, ",") + "->" + strings.Join(s.NATIfaces, ","))
	return nil
}
func (f *fakeFirewall) Cleanup(ctx context.Context) error                       { return nil }
func (f *fakeFirewall) Installed(ctx context.Context) (bool, error)             { return true, nil }
func (f *fakeFirewall) Snapshot(ctx context.Context) (string, error)            { return "", nil }
func (f *fakeFirewall) Counters(ctx context.Context) (map[string]uint64, error) { return nil, nil }
func (f *fakeFirewall) Describe() string                                        { return "fake" }

type fixture struct {
	j    *journal
	host *fakeHost
	fw   *fakeFirewall
	eng  *Engine
	dir  string
	seen []Change
}

func newFixture(t *testing.T, cfg *config.Config) *fixture {
	t.Helper()
	j := &journal{}
	f := &fixture{j: j, host: &fakeHost{j: j, taps: map[string]bool{}}, fw: &fakeFirewall{j: j}, dir: t.TempDir()}
	f.eng = &Engine{Store: state.Store{Dir: f.dir}, Interception: Interception{Firewall: f.fw}, Host: f.host}
	f.eng.Consumers = append(f.eng.Consumers, func(s *Snapshot, ch Change) {
		// A consumer sees the change only once it is persisted.
		st, err := f.eng.Store.Load()
		if err != nil {
			t.Errorf("consumer: reading state: %v", err)
		}
		j.add("publish " + string(ch.Kind) + " " + ch.Project)
		if ch.Kind == ChangePlaced {
			if _, ok := st.Projects[ch.Project]; !ok {
				t.Errorf("consumer saw %s placed before the state held it", ch.Project)
			}
		}
		f.seen = append(f.seen, ch)
	})
	if err := f.eng.Open(context.Background(), cfg, false); err != nil {
		t.Fatal(err)
	}
	j.events, f.seen = nil, nil
	return f
}

func testConfig() *config.Config {
	cfg := config.Default()
	cfg.Projects = []config.Project{
		{Name: "alpha", Mode: "enforce", MaxConnections: 10, Allow: []config.Rule{{Kind: config.KindSNI, Name: "github.com"}}},
		{Name: "beta", Mode: "enforce", MaxConnections: 10, Allow: []config.Rule{{Kind: config.KindSNI, Name: "example.com"}}},
	}
	return cfg
}

func (f *fixture) stateFile(t *testing.T) string {
	b, err := os.ReadFile(filepath.Join(f.dir, state.FileName))
	if err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.ENOTDIR) {
		t.Fatal(err)
	}
	return string(b)
}

func TestPlaceOrder(t *testing.T) {
	f := newFixture(t, testConfig())
	p, changed, err := f.eng.Place(context.Background(), placement.Request{Name: "alpha", Egress: state.EgressNAT}, nil)
	if err != nil || !changed {
		t.Fatalf("place: %v, changed %v", err, changed)
	}
	want := []string{"tap+ tap-alpha", "fw ->tap-alpha", "publish placed alpha"}
	if !slices.Equal(f.j.events, want) {
		t.Errorf("order %q, want %q", f.j.events, want)
	}
	if p.Subnet != netip.MustParsePrefix("172.31.0.0/30") {
		t.Errorf("subnet %s", p.Subnet)
	}
	if pr := f.eng.Snapshot().Policy.ProjectFor(p.GuestIP()); pr == nil || pr.Name != "alpha" {
		t.Errorf("the policy does not place alpha's guest: %v", pr)
	}
	// The same placement again changes nothing and touches nothing.
	f.j.events = nil
	if _, changed, err := f.eng.Place(context.Background(), placement.Request{Name: "alpha", Egress: state.EgressNAT}, nil); err != nil || changed {
		t.Errorf("placing again: %v, changed %v", err, changed)
	}
	if len(f.j.events) != 0 {
		t.Errorf("placing again touched the host: %q", f.j.events)
	}
}

func TestPlaceFailuresLeaveNothing(t *testing.T) {
	for _, tc := range []struct {
		name   string
		break_ func(*fixture)
		want   []string // side effects, undo included
	}{
		{"tap fails", func(f *fixture) { f.host.failTAP = true }, nil},
		{"firewall fails", func(f *fixture) { f.fw.failUpdate = true }, []string{"tap+ tap-alpha", "tap- tap-alpha"}},
		{"state write fails", func(f *fixture) {
			// The state directory becomes a file: the atomic write cannot happen.
			os.RemoveAll(f.dir)
			os.WriteFile(f.dir, nil, 0o600)
		}, []string{"tap+ tap-alpha", "fw ->tap-alpha", "fw tap-alpha->", "tap- tap-alpha"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, testConfig())
			before := f.eng.Snapshot()
			tc.break_(f)
			if _, _, err := f.eng.Place(context.Background(), placement.Request{Name: "alpha", Egress: state.EgressNAT}, nil); err == nil {
				t.Fatal("place succeeded")
			}
			if !slices.Equal(f.j.events, tc.want) {
				t.Errorf("side effects %q, want %q", f.j.events, tc.want)
			}
			if f.eng.Snapshot() != before || len(f.seen) != 0 {
				t.Error("a failed placement changed the snapshot or was published")
			}
			if strings.Contains(f.stateFile(t), "alpha") {
				t.Error("a failed placement was recorded")
			}
		})
	}
}

func TestPlaceRefusals(t *testing.T) {
	f := newFixture(t, testConfig())
	f.host.prefixes = []placement.HostPrefix{{Prefix: netip.MustParsePrefix("172.31.0.0/30"), Where: "address of spec-tap0"}}
	for _, tc := range []struct {
		req      placement.Request
		conflict bool
		want     string
	}{
		{placement.Request{Name: "a*"}, false, "project name"},
		{placement.Request{Name: "#x"}, false, "project name"},
		{placement.Request{Name: "../../etc"}, false, "project name"},
		{placement.Request{Name: "alpha", TAP: "tap-a/b"}, false, "TAP name"},
		{placement.Request{Name: "alpha", TAP: "eth0"}, false, "guest_interfaces"},
		{placement.Request{Name: "alpha", Subnet: netip.MustParsePrefix("10.0.0.0/30")}, false, "inside vm_cidr"},
		{placement.Request{Name: "alpha", Subnet: netip.MustParsePrefix("172.31.0.0/30")}, true, "spec-tap0"},
		{placement.Request{Name: "alpha", Egress: "open"}, false, "egress"},
	} {
		_, _, err := f.eng.Place(context.Background(), tc.req, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) || placement.IsConflict(err) != tc.conflict || placement.IsInvalid(err) == tc.conflict {
			t.Errorf("%+v: %v; want a %s naming %q", tc.req, err, map[bool]string{true: "conflict", false: "invalid request"}[tc.conflict], tc.want)
		}
	}
	if len(f.j.events) != 0 {
		t.Errorf("refused placements touched the host: %q", f.j.events)
	}
	// Allocation skips the host's /30.
	p, _, err := f.eng.Place(context.Background(), placement.Request{Name: "alpha"}, nil)
	if err != nil || p.Subnet != netip.MustParsePrefix("172.31.0.4/30") {
		t.Errorf("allocation next to a host network: %v, %v", p.Subnet, err)
	}
}

func TestRemoveOrder(t *testing.T) {
	f := newFixture(t, testConfig())
	if _, _, err := f.eng.Place(context.Background(), placement.Request{Name: "alpha", Egress: state.EgressNAT}, nil); err != nil {
		t.Fatal(err)
	}
	f.j.events = nil
	if _, found, err := f.eng.Remove(context.Background(), "alpha"); err != nil || !found {
		t.Fatalf("remove: %v %v", err, found)
	}
	want := []string{"fw tap-alpha->", "tap- tap-alpha", "publish removed alpha"}
	if !slices.Equal(f.j.events, want) {
		t.Errorf("order %q, want %q", f.j.events, want)
	}
	if strings.Contains(f.stateFile(t), "alpha") {
		t.Error("removed project still in the state")
	}
	// The config still names alpha: it stays in the policy, unplaced.
	if pr := f.eng.Snapshot().Policy.Project("alpha"); pr == nil || pr.Subnet.IsValid() {
		t.Errorf("alpha after remove: %+v", pr)
	}
}

func TestSetConfigRecompilesOnlyChanged(t *testing.T) {
	f := newFixture(t, testConfig())
	for _, n := range []string{"alpha", "beta"} {
		if _, _, err := f.eng.Place(context.Background(), placement.Request{Name: n}, nil); err != nil {
			t.Fatal(err)
		}
	}
	old := f.eng.Snapshot().Policy
	cfg := testConfig()
	cfg.Projects[1].Allow = append(cfg.Projects[1].Allow, config.Rule{Kind: config.KindSNI, Name: "example.org"})
	changed, err := f.eng.SetConfig(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(changed, []string{"beta"}) {
		t.Errorf("changed %v, want [beta]", changed)
	}
	pol := f.eng.Snapshot().Policy
	if pol.Project("alpha") != old.Project("alpha") {
		t.Error("alpha was recompiled although it did not change")
	}
	if pol.Project("beta") == old.Project("beta") || !pol.Project("beta").AllowsName("example.org") {
		t.Error("beta was not recompiled")
	}
	// An invalid change leaves the snapshot in force.
	bad := testConfig()
	bad.TProxyPort++
	before := f.eng.Snapshot()
	if _, err := f.eng.SetConfig(context.Background(), bad); err == nil || f.eng.Snapshot() != before {
		t.Errorf("a restart-only change was applied: %v", err)
	}
}

// TestIncrementalMergeMatchesFull: the incremental paths (one policy
// replaced; projects compared by position) give what a full merge and a
// by-name comparison give.
func TestIncrementalMergeMatchesFull(t *testing.T) {
	cfg := testConfig()
	st := &state.State{Projects: map[string]state.Project{
		"alpha": {Name: "alpha", TAP: "tap-alpha", Subnet: netip.MustParsePrefix("172.31.0.0/30")},
		"zed":   {Name: "zed", TAP: "tap-zed", Subnet: netip.MustParsePrefix("172.31.0.8/30")},
		"api1":  {Name: "api1", TAP: "tap-api1", Subnet: netip.MustParsePrefix("172.31.0.4/30")},
	}}
	api := map[string]config.Project{
		"api1":  {Name: "api1", Mode: "enforce", Allow: []config.Rule{{Kind: config.KindSNI, Name: "a.example"}}},
		"later": {Name: "later", Mode: "enforce"},
	}
	eff, err := EffectiveWith(cfg, st, api)
	if err != nil {
		t.Fatal(err)
	}
	netipEq := cmp.Options{cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
		cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })}
	for _, p := range []config.Project{
		{Name: "api1", Mode: "audit", Allow: []config.Rule{{Kind: config.KindHTTP, Name: "b.example"}}},
		{Name: "later", Mode: "enforce", Allow: []config.Rule{{Kind: config.KindSNI, Name: "c.example"}}},
		{Name: "zed", Mode: "enforce", MaxConnections: 3},
	} {
		got, ok := replacePolicy(eff, p)
		want, err := EffectiveWith(cfg, st, withPolicy(api, p))
		if !ok || err != nil {
			t.Fatalf("%s: ok %v, err %v", p.Name, ok, err)
		}
		if d := cmp.Diff(want, got, netipEq); d != "" {
			t.Errorf("replacing %s's policy (-full +incremental):\n%s", p.Name, d)
		}
		if eff.Project(p.Name).Mode == p.Mode && p.Mode == "audit" {
			t.Error("replacePolicy changed its input")
		}
	}
	// Placements: new (sorted in), moved, one with an unplaced API policy;
	// a file project falls back.
	for _, pl := range []state.Project{
		{Name: "aaa", Subnet: netip.MustParsePrefix("172.31.0.12/30")},
		{Name: "mmm", Subnet: netip.MustParsePrefix("172.31.0.16/30")},
		{Name: "zzz", Subnet: netip.MustParsePrefix("172.31.0.20/30")},
		{Name: "api1", Subnet: netip.MustParsePrefix("172.31.0.24/30")},
		{Name: "later", Subnet: netip.MustParsePrefix("172.31.0.28/30")},
	} {
		var pol *config.Project
		if q, ok := api[pl.Name]; ok {
			pol = &q
		}
		got, ok, err := withPlaced(cfg, eff, pl.Name, pl.Subnet, pol)
		want, werr := EffectiveWith(cfg, st.With(pl), api)
		if !ok || err != nil || werr != nil {
			t.Fatalf("placing %s: ok %v, err %v, %v", pl.Name, ok, err, werr)
		}
		if d := cmp.Diff(want, got, netipEq); d != "" {
			t.Errorf("placing %s (-full +incremental):\n%s", pl.Name, d)
		}
	}
	if _, _, err := withPlaced(cfg, eff, "dup", netip.MustParsePrefix("172.31.0.4/30"), nil); err == nil {
		t.Error("withPlaced took a subnet api1 holds")
	}
	if _, ok, _ := withPlaced(cfg, eff, "alpha", netip.MustParsePrefix("172.31.0.32/30"), nil); ok {
		t.Error("withPlaced placed a project the file names")
	}
	// Removal through the engine gives the full merge too.
	f := newFixture(t, testConfig())
	for _, n := range []string{"api2", "api3", "alpha"} {
		pol := &config.Project{Name: n, Mode: "enforce", Allow: []config.Rule{{Kind: config.KindSNI, Name: n + ".example"}}}
		if n == "alpha" {
			pol = nil
		}
		if _, _, err := f.eng.Place(context.Background(), placement.Request{Name: n}, pol); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []string{"api2", "alpha"} {
		if _, _, err := f.eng.Remove(context.Background(), n); err != nil {
			t.Fatal(err)
		}
		s := f.eng.Snapshot()
		want, err := EffectiveWith(s.File, s.State, s.Policies)
		if err != nil {
			t.Fatal(err)
		}
		if d := cmp.Diff(want, s.Config, netipEq); d != "" {
			t.Errorf("after removing %s (-full +engine):\n%s", n, d)
		}
	}
	if _, ok := replacePolicy(eff, config.Project{Name: "nobody"}); ok {
		t.Error("replacePolicy of a project the merge lacks")
	}
	// diffProjects, in order and shuffled.
	a := []config.Project{{Name: "a"}, {Name: "b", Mode: "enforce"}, {Name: "c"}, {Name: "d"}}
	b := []config.Project{{Name: "a"}, {Name: "b", Mode: "audit"}, {Name: "d"}, {Name: "e"}, {Name: "c"}}
	changed, removed := diffProjects(a, b)
	var names []string
	for _, p := range changed {
		names = append(names, p.Name)
	}
	if !slices.Equal(names, []string{"b", "e"}) || len(removed) != 0 {
		t.Errorf("changed %v removed %v, want [b e] []", names, removed)
	}
	if changed, removed = diffProjects(b, a[:2]); len(changed) != 1 || !slices.Equal(removed, []string{"c", "d", "e"}) {
		t.Errorf("changed %v removed %v, want [b] [c d e]", changed, removed)
	}
}

// nullNetlink is policy routing that accepts everything and holds nothing.
type nullNetlink struct{}

func (nullNetlink) RuleListFiltered(int, *netlink.Rule, uint64) ([]netlink.Rule, error) {
	return nil, nil
}
func (nullNetlink) RuleAdd(*netlink.Rule) error { return nil }
func (nullNetlink) RuleDel(*netlink.Rule) error { return nil }
func (nullNetlink) RouteListFiltered(int, *netlink.Route, uint64) ([]netlink.Route, error) {
	return nil, nil
}
func (nullNetlink) RouteReplace(*netlink.Route) error { return nil }
func (nullNetlink) RouteDel(*netlink.Route) error     { return nil }
func (nullNetlink) LinkByName(string) (netlink.Link, error) {
	return &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Name: "lo", Index: 1}}, nil
}

func (f *fakeFirewall) Admit(context.Context, []firewall.Admitted) error   { return nil }
func (f *fakeFirewall) Unadmit(context.Context, []firewall.Admitted) error { return nil }
func (f *fakeFirewall) UnadmitGuests(_ context.Context, guests []netip.Addr) error {
	f.unadmitted = append(f.unadmitted, guests...)
	return nil
}

// cutter records Revoke's verdicts on the flows it is given.
type cutter struct {
	flows []ctflow.Flow
	cut   []ctflow.Flow
}

func (c *cutter) Revoke(keep func(ctflow.Flow) bool) (int, error) {
	c.cut = nil
	for _, f := range c.flows {
		if !keep(f) {
			c.cut = append(c.cut, f)
		}
	}
	return len(c.cut), nil
}

// TestDaemonlessChangeSettles: the CLI's engine, changing the interception
// a stopped daemon left, does what the daemon would after the change: the
// changed guest's resolver admissions are withdrawn (no resolver vouches
// for them) and its kernel flows the new policy refuses are cut; another
// guest's flows, and flows the new policy allows, stay.
func TestDaemonlessChangeSettles(t *testing.T) {
	f := newFixture(t, testConfig())
	c := &cutter{}
	f.eng.Flows = c
	ctx := context.Background()
	cidr := func(prefix string) config.Project {
		return config.Project{Name: "gamma", Mode: "enforce", Allow: []config.Rule{{Kind: config.KindCIDR, Prefix: netip.MustParsePrefix(prefix), Ports: []uint16{22}}}}
	}
	first := cidr("198.18.1.0/24")
	p, _, err := f.eng.Place(ctx, placement.Request{Name: "gamma"}, &first)
	if err != nil {
		t.Fatal(err)
	}
	guest := p.GuestIP()
	if !slices.Contains(f.fw.unadmitted, guest) {
		t.Errorf("placing gamma withdrew admissions of %v, want its guest %s among them", f.fw.unadmitted, guest)
	}
	other := netip.MustParseAddr("172.31.9.2")
	c.flows = []ctflow.Flow{
		{Src: netip.AddrPortFrom(guest, 40000), Dst: netip.MustParseAddrPort("198.18.1.22:22")},
		{Src: netip.AddrPortFrom(guest, 40001), Dst: netip.MustParseAddrPort("198.18.2.22:22")},
		{Src: netip.AddrPortFrom(other, 40002), Dst: netip.MustParseAddrPort("198.18.1.22:22")},
	}
	f.fw.unadmitted = nil
	if _, err := f.eng.SetPolicy(ctx, cidr("198.18.2.0/24")); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(f.fw.unadmitted, []netip.Addr{guest}) {
		t.Errorf("the policy change withdrew admissions of %v, want [%s]", f.fw.unadmitted, guest)
	}
	if len(c.cut) != 1 || c.cut[0] != c.flows[0] {
		t.Errorf("cut %v, want only the flow to 198.18.1.22:22 (its rule is gone)", c.cut)
	}

	// on_policy_change: keep leaves open flows.
	f.eng.snap.Config.OnPolicyChange = "keep"
	c.cut = nil
	if _, err := f.eng.SetPolicy(ctx, cidr("198.18.3.0/24")); err != nil {
		t.Fatal(err)
	}
	if len(c.cut) != 0 {
		t.Errorf("with on_policy_change keep, cut %v", c.cut)
	}

	// Removing the project withdraws its guest's admissions: the /30's
	// next project inherits none.
	f.eng.snap.Config.OnPolicyChange = "drop"
	f.fw.unadmitted = nil
	if _, _, err := f.eng.Remove(ctx, "gamma"); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(f.fw.unadmitted, []netip.Addr{guest}) {
		t.Errorf("removing gamma withdrew admissions of %v, want [%s]", f.fw.unadmitted, guest)
	}
	if len(c.cut) != 2 || c.cut[0] != c.flows[0] || c.cut[1] != c.flows[1] {
		t.Errorf("removing gamma cut %v, want both of its flows", c.cut)
	}
}

// TestStartCutsWhatPolicyRefuses: a start that installs the interception
// cuts the kernel-forwarded flows left open from before it that the policy
// does not allow (a config edited while no daemon ran), keeps those it
// allows and those on a port where a tcp rule may still allow their name,
// and cuts nothing with on_policy_change keep.
func TestStartCutsWhatPolicyRefuses(t *testing.T) {
	cfg := testConfig()
	cfg.Projects[0].Subnet = netip.MustParsePrefix("172.31.0.0/30")
	cfg.Projects[0].Allow = append(cfg.Projects[0].Allow,
		config.Rule{Kind: config.KindCIDR, Prefix: netip.MustParsePrefix("198.18.1.0/24"), Ports: []uint16{22}},
		config.Rule{Kind: config.KindTCP, Name: "*.test", Ports: []uint16{2222}})
	guest := netip.MustParseAddr("172.31.0.2")
	flows := []ctflow.Flow{
		{Src: netip.AddrPortFrom(guest, 40000), Dst: netip.MustParseAddrPort("198.18.1.22:22")},            // cidr rule: kept
		{Src: netip.AddrPortFrom(guest, 40001), Dst: netip.MustParseAddrPort("198.18.2.22:22")},            // no rule: cut
		{Src: netip.AddrPortFrom(guest, 40002), Dst: netip.MustParseAddrPort("198.18.2.22:2222")},          // tcp rule's port: kept
		{Src: netip.MustParseAddrPort("172.31.0.6:40003"), Dst: netip.MustParseAddrPort("198.18.1.22:22")}, // in no project: cut
	}
	for _, keep := range []bool{false, true} {
		c := &cutter{flows: flows}
		cfg.OnPolicyChange = map[bool]string{false: "drop", true: "keep"}[keep]
		e := &Engine{Store: state.Store{Dir: t.TempDir()}, Interception: Interception{Firewall: &fakeFirewall{j: &journal{}}, Netlink: nullNetlink{}},
			Host: &fakeHost{j: &journal{}, taps: map[string]bool{}}, Flows: c}
		if err := e.Open(context.Background(), cfg, true); err != nil {
			t.Fatal(err)
		}
		want := []ctflow.Flow{flows[1], flows[3]}
		if keep {
			want = nil
		}
		if !slices.Equal(c.cut, want) {
			t.Errorf("on_policy_change %s: cut %v, want %v", cfg.OnPolicyChange, c.cut, want)
		}
	}
}
