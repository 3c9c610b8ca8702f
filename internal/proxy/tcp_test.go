package proxy

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/dest"
	"github.com/vmegress/vmegress/internal/policy"
)

// TestTCPRuleDecision: the proxy decides a tcp rule by what the resolver
// handed the project (dest.Answers) and keeps those names in the entry; a
// policy change decides the connection again with them, so the answer
// expiring meanwhile does not revoke it, but a policy that no longer
// allows the name does.
func TestTCPRuleDecision(t *testing.T) {
	now := time.Unix(1000, 0)
	ans := &dest.Answers{Now: func() time.Time { return now }}
	p := &Proxy{Answers: ans}
	pol := testPolicy(t, "      - tcp: banner.test\n        ports: [22]\n")
	src := netip.MustParseAddrPort("127.0.0.1:40000")
	dst := netip.MustParseAddrPort("198.18.1.22:22")

	e := &entry{src: src, dst: dst}
	if d, _ := pol.ConnectWith(src.Addr(), dst, p.resolvedFor(e)); d.Verdict != policy.Deny {
		t.Errorf("before any answer: %+v; want deny", d)
	}
	ans.Record("alpha", "banner.test", dst.Addr(), time.Minute)
	e = &entry{src: src, dst: dst}
	d, in := pol.ConnectWith(src.Addr(), dst, p.resolvedFor(e))
	if d.Verdict != policy.Allow || in != policy.InspectNone || d.Rule != "tcp:banner.test ports 22" || !slices.Equal(e.resolved, []string{"banner.test"}) {
		t.Fatalf("after the answer: %+v, inspect %s, resolved %q", d, in, e.resolved)
	}
	now = now.Add(time.Hour) // the answer has expired
	if d := redecide(pol, e); d.Verdict != policy.Allow {
		t.Errorf("redecided after the answer expired: %+v; want allow (the connection keeps its names)", d)
	}
	other := testPolicy(t, "      - tcp: other.test\n        ports: [22]\n")
	if d := redecide(other, e); d.Verdict != policy.Deny {
		t.Errorf("redecided under a policy without the rule: %+v; want deny", d)
	}
}
