package suggest

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/vmegress/vmegress/internal/config"
)

const log = `{"time":"2026-11-25T10:00:00Z","msg":"connection","project":"alpha","dst":"1.2.3.4:443","sni":"api.github.com","verdict":"would_deny"}
{"time":"2026-11-25T10:00:01Z","msg":"connection","project":"alpha","dst":"1.2.3.5:443","sni":"codeload.github.com","verdict":"would_deny"}
{"time":"2026-11-25T10:00:02Z","msg":"connection","project":"alpha","dst":"1.2.3.6:443","sni":"example.com","verdict":"allow"}
{"time":"2026-11-25T10:00:03Z","msg":"connection","project":"alpha","dst":"1.2.3.6:8443","sni":"Example.com","verdict":"would_deny"}
{"time":"2026-11-25T10:00:04Z","msg":"connection","project":"alpha","dst":"9.9.9.9:80","host":"deb.debian.org","verdict":"would_deny"}
{"time":"2026-11-25T10:00:05Z","msg":"connection","project":"alpha","dst":"198.51.100.7:22","verdict":"would_deny"}
{"time":"2026-11-25T10:00:06Z","msg":"connection","project":"alpha","dst":"198.51.100.7:5432","verdict":"would_deny"}
{"time":"2026-11-25T10:00:07Z","msg":"dns","project":"alpha","name":"api.github.com","verdict":"would_deny"}
{"time":"2026-11-25T10:00:08Z","msg":"dns","project":"alpha","name":"telemetry.vendor.io","verdict":"would_deny"}
{"time":"2026-11-25T10:00:09Z","msg":"connection","project":"beta","dst":"1.2.3.4:443","sni":"beta-only.com","verdict":"allow"}
{"time":"2026-11-25T09:00:00Z","msg":"connection","project":"alpha","dst":"1.2.3.4:443","sni":"old.example.net","verdict":"allow"}
not json at all
{"time":"2026-11-25T10:00:10Z","msg":"connection","project":"alpha","dst":"1.2.3.4:443","sni":"a.com","verdict":"allow"}
{"time":"2026-11-25T10:00:11Z","msg":"connection","project":"alpha","dst":"1.2.3.4:443","sni":"b.com","verdict":"allow"}
`

func TestSuggest(t *testing.T) {
	since := time.Date(2026, 11, 25, 9, 30, 0, 0, time.UTC)
	o, err := Read(strings.NewReader(log), "alpha", since)
	if err != nil {
		t.Fatal(err)
	}
	want := []Rule{
		{Kind: config.KindSNI, Value: "*.github.com", Ports: nil},
		{Kind: config.KindSNI, Value: "a.com", Ports: nil}, // a.com and b.com share "com": never *.com
		{Kind: config.KindSNI, Value: "b.com", Ports: nil},
		{Kind: config.KindSNI, Value: "example.com", Ports: []uint16{443, 8443}},
		{Kind: config.KindHTTP, Value: "deb.debian.org", Ports: nil},
		{Kind: config.KindCIDR, Value: "198.51.100.7/32", Ports: []uint16{22, 5432}},
	}
	got := o.Suggest(Exclusions{GuestRange: config.DefaultVMCIDR}).Rules
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b Rule) bool {
		return cmp.Equal(a.Kind, b.Kind) && a.Value == b.Value && cmp.Equal(a.Ports, b.Ports)
	})); diff != "" {
		t.Errorf("rules (-want +got):\n%s", diff)
	}
	y := YAML("alpha", Suggestion{Rules: got}, o)
	// The suggestion is a valid config.
	cfg, err := config.Parse("s.yaml", []byte(y))
	if err != nil {
		t.Fatalf("suggested YAML does not load: %v\n%s", err, y)
	}
	if len(cfg.Projects[0].Allow) != len(want) {
		t.Errorf("loaded %d rules from:\n%s", len(cfg.Projects[0].Allow), y)
	}
	if !strings.Contains(y, "# resolved but never connected to: telemetry.vendor.io") || strings.Contains(y, "connected to: api.github.com") {
		t.Errorf("resolved-only names:\n%s", y)
	}
}

// reviewLog is the security review's audit log (issue 12, item 6): denied
// connections to the metadata address, a private address, the host's own
// address on the guest side, and TLS to two names under a public suffix.
const reviewLog = `{"time":"2026-11-25T10:00:00Z","msg":"connection","project":"alpha","dst":"169.254.169.254:9999","verdict":"would_deny"}
{"time":"2026-11-25T10:00:01Z","msg":"connection","project":"alpha","dst":"10.99.0.5:5432","verdict":"would_deny"}
{"time":"2026-11-25T10:00:02Z","msg":"connection","project":"alpha","dst":"172.31.0.1:22","verdict":"would_deny"}
{"time":"2026-11-25T10:00:03Z","msg":"connection","project":"alpha","dst":"198.51.100.9:443","sni":"a.co.uk","verdict":"would_deny"}
{"time":"2026-11-25T10:00:04Z","msg":"connection","project":"alpha","dst":"198.51.100.10:443","sni":"b.co.uk","verdict":"would_deny"}
`

func TestSuggestNeverOpensDangerousDestinations(t *testing.T) {
	o, err := Read(strings.NewReader(reviewLog), "alpha", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	host := netip.MustParseAddr("172.31.0.1")
	s := o.Suggest(Exclusions{GuestRange: config.DefaultVMCIDR, HostAddrs: []netip.Addr{host}})
	wantRules := []Rule{
		{Kind: config.KindSNI, Value: "a.co.uk", Ports: nil},
		{Kind: config.KindSNI, Value: "b.co.uk", Ports: nil},
	}
	if diff := cmp.Diff(wantRules, s.Rules); diff != "" {
		t.Errorf("rules (-want +got):\n%s", diff)
	}
	wantOmitted := []Omission{
		{config.KindSNI, "*.co.uk", nil, "co.uk is a public suffix: a wildcard would cover every domain registered under it; the names stay exact"},
		{config.KindCIDR, "10.99.0.5/32", []uint16{5432}, "always denied: private (RFC 1918)"},
		{config.KindCIDR, "169.254.169.254/32", []uint16{9999}, "always denied: link-local (cloud metadata)"},
		{config.KindCIDR, "172.31.0.1/32", []uint16{22}, "an address of this host"},
	}
	if diff := cmp.Diff(wantOmitted, s.Omitted); diff != "" {
		t.Errorf("omitted (-want +got):\n%s", diff)
	}
	y := YAML("alpha", s, o)
	for _, want := range []string{
		"# not suggested: cidr 169.254.169.254/32 ports [9999]: always denied: link-local (cloud metadata)",
		"# not suggested: cidr 172.31.0.1/32 ports [22]: an address of this host",
		"# not suggested: sni *.co.uk: co.uk is a public suffix",
	} {
		if !strings.Contains(y, want) {
			t.Errorf("YAML lacks %q:\n%s", want, y)
		}
	}
	b, err := json.Marshal(NewReport("alpha", s, o))
	if err != nil {
		t.Fatal(err)
	}
	if want := `"omitted":[{"kind":"sni","value":"*.co.uk","reason":"co.uk is a public suffix`; !strings.Contains(string(b), want) ||
		!strings.Contains(string(b), `{"kind":"cidr","value":"169.254.169.254/32","ports":[9999],"reason":"always denied: link-local (cloud metadata)"}`) {
		t.Errorf("--json report lacks the omissions:\n%s", b)
	}
	cfg, err := config.Parse("s.yaml", []byte(y))
	if err != nil {
		t.Fatalf("suggested YAML does not load: %v\n%s", err, y)
	}
	for _, r := range cfg.Projects[0].Allow {
		if r.Kind == config.KindCIDR || strings.HasPrefix(r.Name, "*.") {
			t.Errorf("pasted suggestion holds %+v:\n%s", r, y)
		}
	}
}

func TestSuggestExclusions(t *testing.T) {
	ex := Exclusions{GuestRange: netip.MustParsePrefix("198.18.0.0/24"), HostAddrs: []netip.Addr{netip.MustParseAddr("203.0.113.7")}}
	for _, tc := range []struct {
		addr string
		want string // "" means suggested
	}{
		{"198.51.100.7", ""},
		{"203.0.113.7", "an address of this host"},
		{"::ffff:203.0.113.7", "an address of this host"},
		{"198.18.0.9", "in the guest range (vm_cidr 198.18.0.0/24)"},
		{"127.0.0.1", "always denied: loopback"},
		{"fd00::1", "always denied: unique local (private)"},
	} {
		if got := ex.why(netip.MustParseAddr(tc.addr)); got != tc.want {
			t.Errorf("why(%s) = %q, want %q", tc.addr, got, tc.want)
		}
	}
}

func TestSuggestWildcardsStayUnderARegistrableDomain(t *testing.T) {
	for _, tc := range []struct {
		names []string
		want  []string // rule values
	}{
		{[]string{"a.co.uk", "b.co.uk"}, []string{"a.co.uk", "b.co.uk"}},
		{[]string{"x.example.co.uk", "y.example.co.uk"}, []string{"*.example.co.uk"}},
		{[]string{"a.github.io", "b.github.io"}, []string{"a.github.io", "b.github.io"}}, // private-section suffix
		{[]string{"api.github.com", "www.github.com"}, []string{"*.github.com"}},
		{[]string{"a.com", "b.com"}, []string{"a.com", "b.com"}},
	} {
		names := map[string]map[uint16]bool{}
		for _, n := range tc.names {
			names[n] = map[uint16]bool{443: true}
		}
		rules, _ := nameRules(config.KindSNI, names, 443)
		var got []string
		for _, r := range rules {
			got = append(got, r.Value)
		}
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("%v (-want +got):\n%s", tc.names, diff)
		}
	}
}

// FuzzRead: any log reads without panicking, and whatever is suggested
// pastes into a config that loads and opens no excluded address.
func FuzzRead(f *testing.F) {
	f.Add(log)
	f.Add(reviewLog)
	f.Fuzz(func(t *testing.T, data string) {
		o, err := Read(strings.NewReader(data), "alpha", time.Time{})
		if err != nil {
			return
		}
		ex := Exclusions{GuestRange: config.DefaultVMCIDR}
		s := o.Suggest(ex)
		for _, r := range s.Rules {
			if r.Kind != config.KindCIDR {
				continue
			}
			if p := netip.MustParsePrefix(r.Value); ex.why(p.Addr()) != "" {
				t.Errorf("suggested %s", r.Value)
			}
		}
		y := YAML("alpha", s, o)
		if _, err := config.Parse("s.yaml", []byte(y)); err != nil && len(s.Rules) > 0 {
			t.Errorf("suggestion does not load: %v\n%s", err, y)
		}
	})
}

// TestSuggestHTTPS: terminated connections' request lines become https
// rules with the paths seen (folded into first-segment prefixes past
// MaxPaths); the name is not suggested as an sni rule too.
func TestSuggestHTTPS(t *testing.T) {
	var b strings.Builder
	b.WriteString(`{"time":"2026-11-25T10:00:00Z","msg":"connection","project":"alpha","dst":"1.2.3.4:443","sni":"api.example","verdict":"allow"}` + "\n")
	for _, p := range []string{"/v1/models", "/v1/chat/completions", "/v1/models", "/bad path"} {
		fmt.Fprintf(&b, `{"time":"2026-11-25T10:00:01Z","msg":"request","project":"alpha","dst":"1.2.3.4:443","sni":"api.example","method":"GET","path":%q,"verdict":"allow"}`+"\n", p)
	}
	for i := 0; i < MaxPaths+1; i++ {
		fmt.Fprintf(&b, `{"time":"2026-11-25T10:00:02Z","msg":"request","project":"alpha","dst":"5.6.7.8:443","sni":"big.example","method":"GET","path":"/files/%d"}`+"\n", i)
	}
	o, err := Read(strings.NewReader(b.String()), "alpha", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	s := o.Suggest(Exclusions{GuestRange: config.DefaultVMCIDR})
	want := []Rule{
		{Kind: config.KindHTTPS, Value: "api.example", Paths: []string{"/v1/chat/completions", "/v1/models"}},
		{Kind: config.KindHTTPS, Value: "big.example", Paths: []string{"/files/*"}},
	}
	if diff := cmp.Diff(want, s.Rules); diff != "" {
		t.Errorf("rules (-want +got):\n%s", diff)
	}
	y := YAML("alpha", s, o)
	cfg, err := config.Parse("s.yaml", []byte(y))
	if err != nil {
		t.Fatalf("the suggestion does not load: %v\n%s", err, y)
	}
	if r := cfg.Project("alpha").Allow[0]; r.Kind != config.KindHTTPS || len(r.Paths) != 2 {
		t.Errorf("loaded as %+v", r)
	}
}
