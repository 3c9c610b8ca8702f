package placement

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/state"
)

func TestPlaceAllocatesAroundUsed(t *testing.T) {
	cfg := config.Default()
	cfg.Projects = []config.Project{{Name: "fixed", Subnet: netip.MustParsePrefix("172.31.0.4/30")}}
	st := &state.State{Projects: map[string]state.Project{
		"old": {Name: "old", TAP: "tap-old", Subnet: netip.MustParsePrefix("172.31.0.8/30")},
	}}
	host := []HostPrefix{{Prefix: netip.MustParsePrefix("172.31.0.0/30"), Where: "address of spec-tap0"}}
	p, err := Place(cfg, st, host, Request{Name: "new"})
	if err != nil {
		t.Fatal(err)
	}
	if p.Subnet != netip.MustParsePrefix("172.31.0.12/30") || p.TAP != "tap-new" || p.MAC != state.MAC("new") || p.Egress != state.EgressProxy {
		t.Errorf("placed %+v", p)
	}
	// The config's subnet is the project's.
	if p, err := Place(cfg, st, host, Request{Name: "fixed"}); err != nil || p.Subnet != netip.MustParsePrefix("172.31.0.4/30") {
		t.Errorf("fixed: %+v, %v", p, err)
	}
	// A placed project keeps its /30; moving it is a conflict.
	if _, err := Place(cfg, st, nil, Request{Name: "old", Subnet: netip.MustParsePrefix("172.31.0.16/30")}); !IsConflict(err) {
		t.Errorf("moving a placed project: %v", err)
	}
	for _, tc := range []struct {
		req  Request
		want string
	}{
		{Request{Name: "x", TAP: "tap-old"}, "already project old's"},
		{Request{Name: "x", Subnet: netip.MustParsePrefix("172.31.0.8/30")}, "already project old's"},
		{Request{Name: "x", Subnet: netip.MustParsePrefix("172.31.0.0/30")}, "spec-tap0"},
	} {
		if _, err := Place(cfg, st, host, tc.req); !IsConflict(err) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v; want a conflict naming %q", tc.req, err, tc.want)
		}
	}
}

func TestDescribe(t *testing.T) {
	p := state.Project{Name: "alpha", TAP: "tap-alpha", Subnet: netip.MustParsePrefix("172.31.0.0/30"), MAC: "02:ae:52:16:be:ec", Egress: state.EgressProxy}
	in := Describe(p, Nameserver(p, []string{"192.0.2.53:53"}))
	if in.KernelIP != "ip=172.31.0.2::172.31.0.1:255.255.255.252::eth0:off:172.31.0.1" {
		t.Errorf("kernel ip= %s", in.KernelIP)
	}
	if string(in.Firecraker) != `{"guest_mac":"02:ae:52:16:be:ec","host_dev_name":"tap-alpha","iface_id":"eth0"}` {
		t.Errorf("firecracker body %s", in.Firecraker)
	}
	p.Egress = state.EgressNAT
	if ns := Nameserver(p, []string{"192.0.2.53:53"}); ns != "192.0.2.53" {
		t.Errorf("NAT nameserver %s", ns)
	}
}
