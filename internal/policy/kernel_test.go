package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/vmegress/vmegress/internal/config"
)

const kernelPolicy = `
projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: example.com
      - http: example.org
        ports: [8080]
      - cidr: 10.20.0.0/16
        ports: [5432, 6379]
      - cidr: 192.0.2.0/24
        ports: [22]
      - tcp: git.example
        ports: [2222]
      - cidr: 198.51.100.0/24
        ports: [2222]
    deny:
      - cidr: 10.20.30.0/24
        ports: [5432]
      - tcp: bad.example
        ports: [2222]
  audited:
    subnet: 172.31.0.4/30
    mode: audit
    allow:
      - cidr: 10.0.0.0/8
        ports: [22]
`

func TestKernel(t *testing.T) {
	p := mustCompile(t, kernelPolicy)
	k := p.Project("alpha").Kernel()
	if want := []uint16{443, 8080}; !slices.Equal(k.Proxied, want) {
		t.Errorf("proxied ports %v, want %v (only sni and http rules need the data plane)", k.Proxied, want)
	}
	if want := []uint16{2222}; !slices.Equal(k.TCP, want) {
		t.Errorf("tcp ports %v, want %v", k.TCP, want)
	}
	if rule, ports, ok := p.Project("alpha").TCPDenies("bad.example"); !ok || rule != "deny/tcp:bad.example ports 2222" || !slices.Equal(ports, []uint16{2222}) {
		t.Errorf("TCPDenies(bad.example) = %q, %v, %v", rule, ports, ok)
	}
	for _, tc := range []struct {
		dst     string
		verdict Verdict
		rule    string
		proxied bool
	}{
		{"10.20.1.1:5432", Allow, "cidr:10.20.0.0/16 ports 5432,6379", false},
		{"10.20.30.1:5432", Deny, "deny/cidr:10.20.30.0/24 ports 5432", false},
		{"10.20.30.1:6379", Allow, "cidr:10.20.0.0/16 ports 5432,6379", false},
		{"192.0.2.9:22", Allow, "cidr:192.0.2.0/24 ports 22", false},
		{"192.0.2.9:23", "", "", false},                                        // no rule on the port: reset at SYN
		{"203.0.113.1:22", "", "", false},                                      // a cidr port, outside the range
		{"203.0.113.1:443", "", "", true},                                      // sni port: the data plane reads
		{"198.51.100.7:2222", Allow, "cidr:198.51.100.0/24 ports 2222", false}, // unless a tcp deny element bars it
		{"203.0.113.1:8080", "", "", true},                                     // http port
		{"203.0.113.1:65535", "", "", false},                                   // nothing
		{"10.20.30.1:443", "", "", true},                                       // a port-scoped deny does not cover 443
	} {
		v, rule, proxied := k.Decide(netip.MustParseAddrPort(tc.dst))
		if v != tc.verdict || rule != tc.rule || proxied != tc.proxied {
			t.Errorf("%s: got (%q, %q, proxied %v), want (%q, %q, %v)", tc.dst, v, rule, proxied, tc.verdict, tc.rule, tc.proxied)
		}
	}
	if a := p.Project("audited").Kernel(); !a.Audit || a.Forward != nil || a.Deny != nil {
		t.Errorf("an audit project's kernel part is %+v, want everything to the data plane", a)
	}
}

// TestKernelAgreesWithConnect: on random policies and destinations, what
// the kernel settles (deny, forward, reset at SYN) is exactly what
// ConnectWith decides, whatever the resolver handed out; only what the
// kernel hands to the data plane is left to it.
func TestKernelAgreesWithConnect(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	prefixes := []string{"10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "0.0.0.0/0", "192.0.2.0/24"}
	names := []string{"a.example", "*.example", "b.example"}
	ports := []uint16{22, 80, 443, 5432}
	src := netip.MustParseAddr("172.31.0.2")
	for i := 0; i < 300; i++ {
		cp := config.Project{Name: "p", Subnet: netip.MustParsePrefix("172.31.0.0/30")}
		pick := func() []uint16 {
			var out []uint16
			for _, pt := range ports {
				if rng.IntN(3) == 0 {
					out = append(out, pt)
				}
			}
			if len(out) == 0 {
				out = []uint16{ports[rng.IntN(len(ports))]}
			}
			return out
		}
		for n := rng.IntN(5); n > 0; n-- {
			r := config.Rule{Ports: pick()}
			switch rng.IntN(4) {
			case 0:
				r.Kind, r.Prefix = config.KindCIDR, netip.MustParsePrefix(prefixes[rng.IntN(len(prefixes))])
			case 1:
				r.Kind, r.Name = config.KindSNI, names[rng.IntN(len(names))]
			case 2:
				r.Kind, r.Name = config.KindHTTP, names[rng.IntN(len(names))]
			default:
				r.Kind, r.Name = config.KindTCP, names[rng.IntN(len(names))]
			}
			cp.Allow = append(cp.Allow, r)
		}
		for n := rng.IntN(3); n > 0; n-- {
			r := config.Rule{}
			if rng.IntN(2) == 0 {
				r.Ports = pick()
			}
			if rng.IntN(2) == 0 {
				r.Kind, r.Prefix = config.KindCIDR, netip.MustParsePrefix(prefixes[rng.IntN(len(prefixes))])
			} else {
				r.Kind, r.Name = config.KindTCP, names[rng.IntN(len(names))]
			}
			cp.Deny = append(cp.Deny, r)
		}
		pol, err := Compile(&config.Config{Projects: []config.Project{cp}})
		if err != nil {
			t.Fatal(err)
		}
		k := pol.Project("p").Kernel()
		for j := 0; j < 30; j++ {
			a := netip.AddrFrom4([4]byte{[]byte{10, 192}[rng.IntN(2)], byte(rng.IntN(3)), byte(rng.IntN(3)), byte(rng.IntN(4))})
			if a.As4()[0] == 192 {
				a = netip.AddrFrom4([4]byte{192, 0, 2, byte(rng.IntN(4))})
			}
			dst := netip.AddrPortFrom(a, ports[rng.IntN(len(ports))])
			kv, krule, proxied := k.Decide(dst)
			for _, resolved := range []Resolved{nil, func(string, netip.Addr) []string { return []string{"a.example", "b.example"} }} {
				d, in := pol.ConnectWith(src, dst, resolved)
				where := fmt.Sprintf("policy %+v deny %+v, dst %s (resolved %v)", cp.Allow, cp.Deny, dst, resolved != nil)
				// The timed elements the resolver's answers would have made.
				var names []string
				if resolved != nil {
					names = resolved("p", dst.Addr())
				}
				denied, admitted := false, false
				pr := pol.Project("p")
				for _, n := range names {
					if _, ports, ok := pr.TCPDenies(n); ok && (ports == nil || slices.Contains(ports, dst.Port())) {
						denied = true
					}
					if _, ok := pr.TCPAllows(n, dst.Port()); ok && slices.Contains(k.TCP, dst.Port()) {
						admitted = true
					}
				}
				// The ruleset's order: cidr deny, tcp deny elements, cidr
				// allow, tcp allow elements, the data plane, reset.
				switch {
				case kv == Deny:
					if d.Verdict != Deny || d.Rule != krule || in != InspectNone {
						t.Fatalf("%s: kernel denies by %s, ConnectWith %s by %s (inspect %d)", where, krule, d.Verdict, d.Rule, in)
					}
				case denied:
					if d.Verdict != Deny || in != InspectNone {
						t.Fatalf("%s: a tcp deny element refuses it, ConnectWith %s by %s (inspect %d)", where, d.Verdict, d.Rule, in)
					}
				case kv == Allow:
					if d.Verdict != Allow || d.Rule != krule || in != InspectNone {
						t.Fatalf("%s: kernel forwards by %s, ConnectWith %s by %s (inspect %d)", where, krule, d.Verdict, d.Rule, in)
					}
				case admitted:
					if d.Verdict != Allow || in != InspectNone {
						t.Fatalf("%s: an element admits it, ConnectWith says %s by %s", where, d.Verdict, d.Rule)
					}
				case !proxied:
					if d.Verdict != Deny || in != InspectNone {
						t.Fatalf("%s: kernel resets at SYN, ConnectWith says %s by %s (inspect %d)", where, d.Verdict, d.Rule, in)
					}
				}
			}
		}
	}
}
