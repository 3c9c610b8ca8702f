package dns

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/dest"
	"github.com/vmegress/vmegress/internal/policy"
)

// fakeUpstream answers from a table and records what it was asked.
type fakeUpstream struct {
	asked []string
	rrs   map[string][]string // "name. TYPE" -> RRs in zone-file syntax
}

func (f *fakeUpstream) ExchangeContext(_ context.Context, m *mdns.Msg, _ string) (*mdns.Msg, time.Duration, error) {
	q := m.Question[0]
	f.asked = append(f.asked, q.Name)
	r := new(mdns.Msg)
	r.SetReply(m)
	for _, s := range f.rrs[q.Name+" "+mdns.TypeToString[q.Qtype]] {
		rr, err := mdns.NewRR(s)
		if err != nil {
			panic(err)
		}
		r.Answer = append(r.Answer, rr)
	}
	return r, 0, nil
}

func newTestResolver(t testing.TB, up *fakeUpstream) (*Resolver, *dest.Answers) {
	t.Helper()
	cfg, err := config.Parse("t.yaml", []byte(`
projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: github.com
      - sni: "*.example.org"
      - cidr: 10.9.0.0/16
        ports: [443]
      - tcp: "*.git.example"
        ports: [22]
    deny:
      - tcp: bad.git.example
`))
	if err != nil {
		t.Fatal(err)
	}
	pol, err := policy.Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ans := &dest.Answers{}
	r := &Resolver{Upstreams: []string{"192.0.2.53:53"}, UDP: up, TCP: up, Answers: ans,
		GuestRange: cfg.VMCIDR, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	r.SetPolicy(pol)
	return r, ans
}

var alpha = netip.MustParseAddr("172.31.0.2")

func query(name string, qtype uint16) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	return m
}

func TestResolverRefusedNamesStayHome(t *testing.T) {
	up := &fakeUpstream{}
	r, _ := newTestResolver(t, up)
	for _, name := range []string{"example.com.", "github.com.evil.test.", "data.github.com.", "example.org."} {
		o := r.answer(context.Background(), alpha, query(name, mdns.TypeA))
		if o.resp.Rcode != mdns.RcodeNameError || o.verdict != "deny" {
			t.Errorf("%s: rcode %s, verdict %s", name, mdns.RcodeToString[o.resp.Rcode], o.verdict)
		}
	}
	if len(up.asked) != 0 {
		t.Errorf("refused names were sent upstream: %v", up.asked)
	}
	resp := r.answer(context.Background(), netip.MustParseAddr("172.31.9.2"), query("github.com.", mdns.TypeA)).resp
	if resp.Rcode != mdns.RcodeRefused {
		t.Errorf("source in no project: %s", mdns.RcodeToString[resp.Rcode])
	}
}

func TestResolverFiltersAnswers(t *testing.T) {
	up := &fakeUpstream{rrs: map[string][]string{
		"github.com. A": {"github.com. 60 IN A 140.82.112.3", "github.com. 60 IN A 10.0.0.1", "github.com. 60 IN A 127.0.0.1",
			"github.com. 60 IN A 169.254.169.254", "github.com. 60 IN A 172.31.0.6", "github.com. 60 IN A 10.9.1.1"},
		"github.com. AAAA":  {"github.com. 60 IN AAAA ::ffff:10.0.0.1", "github.com. 60 IN AAAA 2606:50c0::1"},
		"github.com. HTTPS": {`github.com. 60 IN HTTPS 1 . alpn="h2" ipv4hint="140.82.112.3,10.0.0.1" ech="AAj+DQAE3q2+7w=="`},
	}}
	r, ans := newTestResolver(t, up)
	resp := r.answer(context.Background(), alpha, query("GitHub.com.", mdns.TypeA)).resp
	var got []string
	for _, rr := range resp.Answer {
		got = append(got, rr.(*mdns.A).A.String())
	}
	// 140.82.112.3 is public; 10.9.1.1 is named by a cidr rule.
	if len(got) != 2 || got[0] != "140.82.112.3" || got[1] != "10.9.1.1" {
		t.Errorf("A answers %v", got)
	}
	if !ans.Vetted("alpha", "github.com", netip.MustParseAddr("140.82.112.3")) || ans.Vetted("alpha", "github.com", netip.MustParseAddr("10.0.0.1")) {
		t.Error("answers recorded wrongly")
	}
	resp = r.answer(context.Background(), alpha, query("github.com.", mdns.TypeAAAA)).resp
	if len(resp.Answer) != 1 || resp.Answer[0].(*mdns.AAAA).AAAA.String() != "2606:50c0::1" {
		t.Errorf("AAAA answers %v", resp.Answer)
	}
	resp = r.answer(context.Background(), alpha, query("github.com.", mdns.TypeHTTPS)).resp
	h := resp.Answer[0].(*mdns.HTTPS)
	for _, kv := range h.Value {
		switch v := kv.(type) {
		case *mdns.SVCBECHConfig:
			t.Error("ech survived")
		case *mdns.SVCBIPv4Hint:
			if len(v.Hint) != 1 || !v.Hint[0].Equal(net.ParseIP("140.82.112.3")) {
				t.Errorf("ipv4hint %v", v.Hint)
			}
		}
	}
}

func TestResolverCache(t *testing.T) {
	up := &fakeUpstream{rrs: map[string][]string{"github.com. A": {"github.com. 60 IN A 140.82.112.3", "github.com. 60 IN A 10.0.0.1"}}}
	r, ans := newTestResolver(t, up)
	now := time.Unix(1000, 0)
	r.Now = func() time.Time { return now }
	for i := 0; i < 3; i++ {
		resp := r.answer(context.Background(), alpha, query("github.com.", mdns.TypeA)).resp
		if len(resp.Answer) != 1 { // the private address is filtered from cached answers too
			t.Fatalf("answer %d: %v", i, resp.Answer)
		}
		now = now.Add(10 * time.Second)
	}
	if len(up.asked) != 1 {
		t.Errorf("upstream asked %d times within the TTL", len(up.asked))
	}
	resp := r.answer(context.Background(), alpha, query("github.com.", mdns.TypeA)).resp
	if ttl := resp.Answer[0].Header().Ttl; ttl != 30 {
		t.Errorf("cached TTL %d after 30s of 60", ttl)
	}
	if !ans.Vetted("alpha", "github.com", netip.MustParseAddr("140.82.112.3")) {
		t.Error("a cached answer was not recorded for vetting")
	}
	now = now.Add(31 * time.Second)
	r.answer(context.Background(), alpha, query("github.com.", mdns.TypeA))
	if len(up.asked) != 2 {
		t.Errorf("upstream asked %d times; want a refresh after the TTL", len(up.asked))
	}
}

// FuzzFilter feeds arbitrary upstream answers through the filter: no denied
// address may come out, whatever the records.
func FuzzFilter(f *testing.F) {
	m := new(mdns.Msg)
	m.SetQuestion("github.com.", mdns.TypeA)
	for _, s := range []string{"github.com. 60 IN A 10.0.0.1", "github.com. 60 IN A 140.82.112.3", "github.com. 60 IN AAAA ::ffff:127.0.0.1",
		`github.com. 60 IN HTTPS 1 . ipv4hint="127.0.0.1" ech="AAj+DQAE3q2+7w=="`} {
		rr, _ := mdns.NewRR(s)
		m.Answer = append(m.Answer, rr)
	}
	b, _ := m.Pack()
	f.Add(b)
	r, _ := newTestResolver(f, &fakeUpstream{})
	pr := r.policy.Load().Project("alpha")
	f.Fuzz(func(t *testing.T, data []byte) {
		var msg mdns.Msg
		if msg.Unpack(data) != nil {
			return
		}
		check := func(ip net.IP) {
			a, ok := netip.AddrFromSlice(ip)
			if ok && !r.allowedAddr(pr, a) {
				t.Fatalf("denied address %s passed the filter", a)
			}
		}
		for _, rr := range r.filter(pr, "github.com", msg.Answer) {
			switch v := rr.(type) {
			case *mdns.A:
				check(v.A)
			case *mdns.AAAA:
				check(v.AAAA)
			case *mdns.HTTPS:
				checkSVCB(t, v.Value, check)
			case *mdns.SVCB:
				checkSVCB(t, v.Value, check)
			}
		}
	})
}

func checkSVCB(t *testing.T, kvs []mdns.SVCBKeyValue, check func(net.IP)) {
	for _, kv := range kvs {
		switch v := kv.(type) {
		case *mdns.SVCBECHConfig:
			t.Fatal("ech passed the filter")
		case *mdns.SVCBIPv4Hint:
			for _, ip := range v.Hint {
				check(ip)
			}
		case *mdns.SVCBIPv6Hint:
			for _, ip := range v.Hint {
				check(ip)
			}
		}
	}
}

// wire packs and unpacks m, as a query arrives at the server.
func wire(t testing.TB, m *mdns.Msg) *mdns.Msg {
	t.Helper()
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	var out mdns.Msg
	if err := out.Unpack(b); err != nil {
		t.Fatal(err)
	}
	return &out
}

// TestResolverDecidesOnWireLabels: a label holding '.' (shown "\." in
// presentation form) or any byte outside host names is refused and never
// sent upstream, though its presentation text ends in an allowed suffix.
func TestResolverDecidesOnWireLabels(t *testing.T) {
	up := &fakeUpstream{}
	r, _ := newTestResolver(t, up)
	for _, name := range []string{
		`secret\.example.org.`,    // labels [secret.example, org]: not under example.org
		`SECRET\046example.org.`,  // the same, escaped as a decimal
		`a\.b.www.example.org.`,   // a dot inside a deeper label
		`a\\b.example.org.`,       // a backslash byte
		`a\032b.example.org.`,     // a space
		`a\000.example.org.`,      // NUL
		`b\195\188r.example.org.`, // UTF-8 bytes
		`*.example.org.`,          // a wildcard is a pattern, not a name
		`-a.example.org.`,         // a label may not start with '-'
	} {
		o := r.answer(context.Background(), alpha, wire(t, query(name, mdns.TypeA)))
		if o.resp.Rcode != mdns.RcodeNameError || o.verdict != "deny" || !strings.Contains(o.reason, "not a valid host name") {
			t.Errorf("%s: rcode %s, verdict %s, reason %q", name, mdns.RcodeToString[o.resp.Rcode], o.verdict, o.reason)
		}
	}
	if len(up.asked) != 0 {
		t.Errorf("names with hostile labels were sent upstream: %q", up.asked)
	}
	o := r.answer(context.Background(), alpha, wire(t, query("WWW.Example.ORG.", mdns.TypeA)))
	if o.verdict != "allow" || len(up.asked) != 1 || up.asked[0] != "www.example.org." {
		t.Errorf("a valid name: verdict %s, asked %q", o.verdict, up.asked)
	}
}

func TestQueryName(t *testing.T) {
	for in, want := range map[string]string{"GitHub.com.": "github.com", "_dmarc.github.com": "_dmarc.github.com", `www\.github.com.`: "", `a\046b.c.`: "", ".": ""} {
		got, err := QueryName(in)
		if got != want || (err == nil) != (want != "") {
			t.Errorf("QueryName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if got, err := WireLabels(`secret\.github.com.`); err != nil || len(got) != 2 || got[0] != "secret.github" {
		t.Errorf("WireLabels: %q, %v", got, err)
	}
}

// FuzzAnswer feeds arbitrary queries to the resolver: whatever it sends
// upstream is a host name the project allows, whose wire labels are its
// text split on '.'.
func FuzzAnswer(f *testing.F) {
	for _, name := range []string{`secret\.example.org.`, "www.example.org.", "github.com.", `a\000.github.com.`} {
		b, _ := query(name, mdns.TypeA).Pack()
		f.Add(b)
	}
	up := &fakeUpstream{}
	r, _ := newTestResolver(f, up)
	pr := r.policy.Load().Project("alpha")
	f.Fuzz(func(t *testing.T, data []byte) {
		var req mdns.Msg
		if req.Unpack(data) != nil {
			return
		}
		up.asked = up.asked[:0]
		r.answer(context.Background(), alpha, &req)
		for _, asked := range up.asked {
			labels, err := WireLabels(asked)
			text := strings.Split(strings.TrimSuffix(asked, "."), ".")
			if err != nil || !slices.Equal(labels, text) {
				t.Fatalf("sent %q: wire labels %q, text labels %q, %v", asked, labels, text, err)
			}
			if n, err := config.HostName(asked); err != nil || !pr.AllowsName(n) {
				t.Fatalf("sent %q upstream (%q, %v)", asked, n, err)
			}
		}
	})
}

// TestResolverTCPNames: names a tcp rule allows are forwarded and their
// addresses recorded for the project (what the data plane decides tcp
// rules by); a name a tcp deny matches is NXDOMAIN, never sent.
func TestResolverTCPNames(t *testing.T) {
	up := &fakeUpstream{rrs: map[string][]string{
		"ssh.git.example. A": {"ssh.git.example. 60 IN A 198.18.1.22"},
	}}
	r, ans := newTestResolver(t, up)
	o := r.answer(context.Background(), alpha, query("ssh.git.example.", mdns.TypeA))
	if o.resp.Rcode != mdns.RcodeSuccess || len(o.resp.Answer) != 1 {
		t.Fatalf("ssh.git.example: %v", o.resp)
	}
	if got := ans.Names("alpha", netip.MustParseAddr("198.18.1.22")); !slices.Equal(got, []string{"ssh.git.example"}) {
		t.Errorf("recorded %q; want ssh.git.example", got)
	}
	o = r.answer(context.Background(), alpha, query("bad.git.example.", mdns.TypeA))
	if o.resp.Rcode != mdns.RcodeNameError || !strings.Contains(o.reason, "deny/tcp:bad.git.example") && !strings.Contains(o.reason, "tcp:bad.git.example") {
		t.Errorf("bad.git.example: rcode %d, reason %q; want NXDOMAIN naming the deny rule", o.resp.Rcode, o.reason)
	}
	if slices.Contains(up.asked, "bad.git.example.") {
		t.Error("a denied name was sent upstream")
	}
}
