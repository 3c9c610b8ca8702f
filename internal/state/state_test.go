package state

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"
)

func TestAllocate(t *testing.T) {
	vm := netip.MustParsePrefix("172.31.0.0/16")
	var used []netip.Prefix
	for i := 0; i < 3; i++ {
		p, err := Allocate(vm, used)
		if err != nil {
			t.Fatal(err)
		}
		if want := netip.MustParsePrefix(fmt.Sprintf("172.31.0.%d/30", 4*i)); p != want {
			t.Errorf("allocation %d = %s, want %s", i, p, want)
		}
		used = append(used, p)
	}
	// A hole is reused; prefixes outside the range or larger than a /30 count
	// for the slots they cover.
	used = []netip.Prefix{netip.MustParsePrefix("172.31.0.4/30"), netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("172.31.0.0/30")}
	if p, err := Allocate(vm, used); err != nil || p != netip.MustParsePrefix("172.31.0.8/30") {
		t.Errorf("after two: %v, %v", p, err)
	}
	used = []netip.Prefix{netip.MustParsePrefix("172.31.0.0/29")}
	if p, err := Allocate(vm, used); err != nil || p != netip.MustParsePrefix("172.31.0.8/30") {
		t.Errorf("after a /29: %v, %v", p, err)
	}
	used = []netip.Prefix{netip.MustParsePrefix("172.31.0.0/30"), netip.MustParsePrefix("172.31.0.8/30")}
	if p, err := Allocate(vm, used); err != nil || p != netip.MustParsePrefix("172.31.0.4/30") {
		t.Errorf("with a hole: %v, %v", p, err)
	}
	small := netip.MustParsePrefix("10.0.0.0/29")
	used = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/30"), netip.MustParsePrefix("10.0.0.4/30")}
	if _, err := Allocate(small, used); err != ErrNoFreeSubnet {
		t.Errorf("full range: %v", err)
	}
	if _, err := Allocate(vm, []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}); err != ErrNoFreeSubnet {
		t.Errorf("everything used: %v", err)
	}
}

func TestNamesAndMAC(t *testing.T) {
	if TAPName("alpha") != "tap-alpha" {
		t.Error(TAPName("alpha"))
	}
	if n := TAPName("a-very-long-project-name"); len(n) > 15 || n == TAPName("a-very-long-project-nam2") {
		t.Errorf("long names: %q", n)
	}
	// Pinned: a project's MAC must not change across versions (its guest's
	// network config and neighbour entries depend on it).
	if MAC("alpha") != "02:ae:52:16:be:ec" || MAC("alpha") == MAC("beta") || MAC("beta")[:3] != "02:" {
		t.Errorf("MAC: %s %s", MAC("alpha"), MAC("beta"))
	}
}

// TestConcurrentUpdates: parallel allocations never collide.
func TestConcurrentUpdates(t *testing.T) {
	st := Store{Dir: t.TempDir()}
	vm := netip.MustParsePrefix("172.31.0.0/16")
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := st.Update(func(s *State) error {
				var used []netip.Prefix
				for _, p := range s.Projects {
					used = append(used, p.Subnet)
				}
				sub, err := Allocate(vm, used)
				if err != nil {
					return err
				}
				name := fmt.Sprintf("p%d", i)
				s.Projects[name] = Project{Name: name, TAP: TAPName(name), Subnet: sub, MAC: MAC(name), Egress: EgressProxy}
				return nil
			})
			if err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	s, err := st.Load()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[netip.Prefix]string{}
	for _, p := range s.Projects {
		if other, dup := seen[p.Subnet]; dup {
			t.Errorf("%s and %s share %s", p.Name, other, p.Subnet)
		}
		seen[p.Subnet] = p.Name
	}
	if len(s.Projects) != 20 {
		t.Errorf("%d projects recorded", len(s.Projects))
	}
}
