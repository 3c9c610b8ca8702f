package engine

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/firewall"
	"github.com/vmegress/vmegress/internal/state"
)

// admitFirewall holds k_tcp elements as a set; its Admit can be held
// half-way (entered is signalled, then it waits for release) so a test
// interleaves a policy change with a DNS answer's admission.
type admitFirewall struct {
	*fakeFirewall
	mu       sync.Mutex
	elems    map[firewall.Admitted]bool
	hold     bool
	entered  chan struct{}
	released chan struct{}
}

func key(a firewall.Admitted) firewall.Admitted { a.TTL = 0; return a }

func (f *admitFirewall) Admit(ctx context.Context, es []firewall.Admitted) error {
	f.mu.Lock()
	hold := f.hold
	f.hold = false
	f.mu.Unlock()
	if hold {
		close(f.entered)
		<-f.released
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, e := range es {
		f.elems[key(e)] = true
	}
	return nil
}

func (f *admitFirewall) Unadmit(ctx context.Context, es []firewall.Admitted) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, e := range es {
		delete(f.elems, key(e))
	}
	return nil
}

func (f *admitFirewall) has(a firewall.Admitted) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.elems[key(a)]
}

func tcpConfig(withRule bool) *config.Config {
	cfg := config.Default()
	p := config.Project{Name: "alpha", Mode: "enforce", Subnet: netip.MustParsePrefix("172.31.0.0/30"),
		Allow: []config.Rule{{Kind: config.KindSNI, Name: "github.com"}}}
	if withRule {
		p.Allow = append(p.Allow, config.Rule{Kind: config.KindTCP, Name: "*.test", Ports: []uint16{22}})
	}
	cfg.Projects = []config.Project{p}
	return cfg
}

// TestAdmitRacesPolicyChange: a DNS answer admitted under a policy whose
// tcp rule a concurrent change removes must not outlive the change. The
// answer's admission is held between the engine's bookkeeping and the
// ruleset; the change (dropping the rule) runs to its end meanwhile; when
// the admission goes on, the element must not stay in the ruleset (it
// would forward the guest to the address for the answer's TTL plus grace,
// a TTL the name's owner chooses).
func TestAdmitRacesPolicyChange(t *testing.T) {
	ctx := context.Background()
	fw := &admitFirewall{fakeFirewall: &fakeFirewall{j: &journal{}}, elems: map[firewall.Admitted]bool{},
		entered: make(chan struct{}), released: make(chan struct{})}
	e := &Engine{Store: state.Store{Dir: t.TempDir()}, Interception: Interception{Firewall: fw, Netlink: nullNetlink{}}, Host: &fakeHost{j: fw.j, taps: map[string]bool{}}}
	if err := e.Open(ctx, tcpConfig(true), true); err != nil {
		t.Fatal(err)
	}
	fw.mu.Lock()
	fw.hold = true
	fw.mu.Unlock()
	elem := firewall.Admitted{Guest: netip.MustParseAddr("172.31.0.2"), Addr: netip.MustParseAddr("198.18.1.22"), Port: 22}
	done := make(chan error, 1)
	go func() {
		done <- e.Admit(ctx, "alpha", "banner.test", []netip.Addr{elem.Addr}, time.Hour)
	}()
	<-fw.entered
	// The change runs to its end while the admission is held (admitting
	// takes no lock a change waits for), then the admission goes on.
	if _, err := e.SetConfig(ctx, tcpConfig(false)); err != nil {
		t.Fatal(err)
	}
	close(fw.released)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if fw.has(elem) {
		t.Errorf("the admitted element %v outlived the change that removed its tcp rule", elem)
	}
	// The new policy admits nothing for the name.
	if err := e.Admit(ctx, "alpha", "banner.test", []netip.Addr{elem.Addr}, time.Hour); err != nil {
		t.Fatal(err)
	}
	if fw.has(elem) {
		t.Errorf("admitted under a policy with no tcp rule")
	}
}
