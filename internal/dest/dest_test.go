package dest

import (
	"net/netip"
	"testing"
	"time"
)

func TestAlwaysDenied(t *testing.T) {
	for _, s := range []string{
		"127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.0.1", "172.31.255.1", "192.168.1.1",
		"169.254.169.254", "100.64.0.1", "100.127.255.255", "224.0.0.1", "255.255.255.255",
		"0.0.0.0", "::", "::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1",
		"64:ff9b::a00:1", "2002:7f00:1::", "2001:0:7f00:1::", "fd00::1", "fe80::1", "ff02::1",
	} {
		if AlwaysDenied(netip.MustParseAddr(s)) == "" {
			t.Errorf("%s is not denied", s)
		}
	}
	for _, s := range []string{"198.18.1.10", "8.8.8.8", "140.82.112.3", "100.128.0.1", "172.32.0.1", "2606:4700::1111", "2001:db8::1"} {
		if why := AlwaysDenied(netip.MustParseAddr(s)); why != "" {
			t.Errorf("%s is denied: %s", s, why)
		}
	}
}

func TestAnswers(t *testing.T) {
	now := time.Unix(1000, 0)
	a := &Answers{Now: func() time.Time { return now }}
	ip := netip.MustParseAddr("198.18.1.10")
	a.Record("alpha", "github.com", ip, 60*time.Second)
	if !a.Vetted("alpha", "github.com", ip) {
		t.Error("fresh answer not vetted")
	}
	if !a.Vetted("alpha", "github.com", netip.MustParseAddr("::ffff:198.18.1.10")) {
		t.Error("IPv4-mapped form not vetted")
	}
	for _, c := range []struct{ project, name, addr string }{
		{"beta", "github.com", "198.18.1.10"},
		{"alpha", "example.com", "198.18.1.10"},
		{"alpha", "github.com", "198.18.1.11"},
	} {
		if a.Vetted(c.project, c.name, netip.MustParseAddr(c.addr)) {
			t.Errorf("vetted %+v", c)
		}
	}
	now = now.Add(60*time.Second + Grace)
	if !a.Vetted("alpha", "github.com", ip) {
		t.Error("expired within grace")
	}
	now = now.Add(time.Second)
	if a.Vetted("alpha", "github.com", ip) {
		t.Error("vetted after TTL and grace")
	}
	for i := 0; i < MaxPerProject+10; i++ {
		a.Record("alpha", "n", netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), time.Minute)
	}
	if n := a.m["alpha"].n; n > MaxPerProject {
		t.Errorf("%d answers kept, cap %d", n, MaxPerProject)
	}
	total := 0
	for _, names := range a.m["alpha"].byAddr {
		total += len(names)
	}
	if total != a.m["alpha"].n {
		t.Errorf("count %d, %d answers held", a.m["alpha"].n, total)
	}
}

// TestAnswerNames: Names lists the unexpired names an address was given
// to a project for, and only that project's.
func TestAnswerNames(t *testing.T) {
	now := time.Unix(1000, 0)
	a := &Answers{Now: func() time.Time { return now }}
	ip := netip.MustParseAddr("198.18.1.22")
	a.Record("alpha", "github.com", ip, 60*time.Second)
	a.Record("alpha", "ssh.github.com", ip, 10*time.Second)
	a.Record("beta", "evil.example", ip, 60*time.Second)
	if got := a.Names("alpha", netip.MustParseAddr("::ffff:198.18.1.22")); len(got) != 2 || got[0] != "github.com" || got[1] != "ssh.github.com" {
		t.Errorf("names %q; want github.com, ssh.github.com", got)
	}
	now = now.Add(10*time.Second + Grace + time.Second)
	if got := a.Names("alpha", ip); len(got) != 1 || got[0] != "github.com" {
		t.Errorf("after ssh.github.com's TTL and grace: %q; want github.com", got)
	}
	if got := a.Names("gamma", ip); got != nil {
		t.Errorf("another project: %q", got)
	}
	if got := a.Names("alpha", netip.MustParseAddr("198.18.1.23")); got != nil {
		t.Errorf("another address: %q", got)
	}
}
