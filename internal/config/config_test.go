package config

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseValid(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte(`
vm_cidr: 172.31.0.0/16
guest_interfaces: ["tap-*", "fc-tap0"]
tproxy_port: 15001
mark: 0x10
route_table: 200
admin: 127.0.0.1:9999
projects:
  alpha:
    subnet: 172.31.0.4/30
    allow:
      - sni: GitHub.com.
      - sni: "*.GitHub.com"
      - sni: api.example.org
        ports: [443, 8443]
      - http: deb.debian.org
      - cidr: 198.51.100.7
        ports: [22, 25]
  beta:
    allow:
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Mark != 0x10 || cfg.RouteTable != 200 || cfg.TProxyPort != 15001 || cfg.UpstreamMark != DefaultUpstreamMark {
		t.Errorf("numbers: mark %#x table %d port %d upstream mark %#x", cfg.Mark, cfg.RouteTable, cfg.TProxyPort, cfg.UpstreamMark)
	}
	if cfg.Admin != netip.MustParseAddrPort("127.0.0.1:9999") {
		t.Errorf("admin %v", cfg.Admin)
	}
	if diff := cmp.Diff([]string{"tap-*", "fc-tap0"}, cfg.GuestInterfaces); diff != "" {
		t.Errorf("guest_interfaces (-want +got):\n%s", diff)
	}
	want := []Project{
		{Name: "alpha", Subnet: netip.MustParsePrefix("172.31.0.4/30"), Mode: "enforce", MaxConnections: DefaultMaxConnections, Pos: Position{9, 3},
			Allow: []Rule{
				{Kind: KindSNI, Name: "github.com", Pos: Position{12, 9}},
				{Kind: KindSNI, Name: "*.github.com", Pos: Position{13, 9}},
				{Kind: KindSNI, Name: "api.example.org", Ports: []uint16{443, 8443}, Pos: Position{14, 9}},
				{Kind: KindHTTP, Name: "deb.debian.org", Pos: Position{16, 9}},
				{Kind: KindCIDR, Prefix: netip.MustParsePrefix("198.51.100.7/32"), Ports: []uint16{22, 25}, Pos: Position{17, 9}},
			}},
		{Name: "beta", Mode: "enforce", MaxConnections: DefaultMaxConnections, Pos: Position{19, 3}},
	}
	if diff := cmp.Diff(want, cfg.Projects, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
		t.Errorf("projects (-want +got):\n%s", diff)
	}
}

func TestParseDefaults(t *testing.T) {
	cfg, err := Parse("c.yaml", []byte("projects: {}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(Default(), cfg, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
		cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b }),
		cmp.FilterPath(func(p cmp.Path) bool { return p.String() == "Path" }, cmp.Ignore())); diff != "" {
		t.Errorf("defaults (-want +got):\n%s", diff)
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name, yaml string
		want       []string
	}{
		{"unknown key", "vm_cidr: 172.31.0.0/16\nfirewal: nftables\n",
			[]string{`c.yaml:2:1: unknown key "firewal" in config`}},
		{"duplicate key", "mark: 1\nmark: 2\n",
			[]string{`c.yaml:2:1: duplicate key "mark" in config`}},
		{"bad cidr", "vm_cidr: 172.31.0.0/33\n",
			[]string{`c.yaml:1:10: vm_cidr: "172.31.0.0/33" is not an IPv4 CIDR such as 172.31.0.0/16`}},
		{"ipv6 vm_cidr", "vm_cidr: fd00::/64\n",
			[]string{`c.yaml:1:10: vm_cidr: "fd00::/64" is not an IPv4 CIDR such as 172.31.0.0/16`}},
		{"port out of range", "tproxy_port: 65536\n",
			[]string{`c.yaml:1:14: tproxy_port: port "65536" out of range (1-65535)`}},
		{"port zero", "dns_port: 0\n",
			[]string{`c.yaml:1:11: dns_port: port "0" out of range (1-65535)`}},
		{"mark zero", "mark: 0\n",
			[]string{`c.yaml:1:7: mark: "0" is not a number from 1 to 4294967295`}},
		{"mark equals upstream mark", "mark: 2\n",
			[]string{`c.yaml:1:7: upstream_mark 0x2 is the same as mark; the proxy's own sockets would be routed back to it`}},
		{"main table", "route_table: 254\n",
			[]string{`c.yaml:1:14: route_table 254 is a table the kernel uses (default, main or local); pick another`}},
		{"same ports", "tproxy_port: 53\ndns_port: 53\n",
			[]string{`c.yaml:2:11: dns_port 53 is the same as tproxy_port`}},
		{"bad enum", "upstream: direct\n",
			[]string{`c.yaml:1:11: upstream must be one of vetted, original_dst, not "direct"`}},
		{"audit on envoy", "dataplane: envoy\nprojects:\n  a:\n    mode: audit\n",
			[]string{`c.yaml:3:3: project "a": mode audit needs dataplane builtin`}},
		{"subnet not /30", "projects:\n  a:\n    subnet: 172.31.0.0/29\n",
			[]string{`c.yaml:3:13: subnet 172.31.0.0/29 must be a /30`}},
		{"subnet host bits", "projects:\n  a:\n    subnet: 172.31.0.2/30\n",
			[]string{`c.yaml:3:13: subnet: 172.31.0.2/30 has host bits set; did you mean 172.31.0.0/30?`}},
		{"subnet outside", "projects:\n  a:\n    subnet: 10.0.0.0/30\n",
			[]string{`c.yaml:3:13: subnet 10.0.0.0/30 of project "a" is outside vm_cidr 172.31.0.0/16`}},
		{"subnet overlap", "projects:\n  a:\n    subnet: 172.31.0.0/30\n  b:\n    subnet: 172.31.0.0/30\n",
			[]string{`c.yaml:5:13: subnet 172.31.0.0/30 of project "b" overlaps project "a" (line 3)`}},
		{"bad project name", "projects:\n  Alpha: {}\n",
			[]string{`c.yaml:2:3: project name "Alpha" must be 1-63 characters of a-z, 0-9, '-', '_', starting with a letter or digit`}},
		{"unknown project key", "projects:\n  a:\n    allowed: []\n",
			[]string{`c.yaml:3:5: unknown key "allowed" in project "a"`}},
		{"empty name", "projects:\n  a:\n    allow:\n      - sni: \"\"\n",
			[]string{`c.yaml:4:14: sni: name is empty`}},
		{"double dot", "projects:\n  a:\n    allow:\n      - sni: a..b\n",
			[]string{`c.yaml:4:14: sni: "a..b": empty label (two dots in a row?)`}},
		{"bad wildcard", "projects:\n  a:\n    allow:\n      - sni: \"**\"\n",
			[]string{`c.yaml:4:14: sni: "**": a wildcard is only allowed as a whole first label, as in *.example.com`}},
		{"inner wildcard", "projects:\n  a:\n    allow:\n      - sni: \"a.*.com\"\n",
			[]string{`c.yaml:4:14: sni: "a.*.com": a wildcard is only allowed as a whole first label, as in *.example.com`}},
		{"ip as sni", "projects:\n  a:\n    allow:\n      - sni: 198.51.100.1\n",
			[]string{`c.yaml:4:14: sni: "198.51.100.1" is an IP address, not a name (use a cidr rule for addresses)`}},
		{"bad char", "projects:\n  a:\n    allow:\n      - sni: ex ample.com\n",
			[]string{`c.yaml:4:14: sni: "ex ample.com": label "ex ample" has character ' ' (allowed: letters, digits, '-', '_')`}},
		{"hyphen label", "projects:\n  a:\n    allow:\n      - sni: -a.com\n",
			[]string{`c.yaml:4:14: sni: "-a.com": label "-a" starts or ends with '-'`}},
		{"rule port range", "projects:\n  a:\n    allow:\n      - sni: a.com\n        ports: [443, 99999]\n",
			[]string{`c.yaml:5:22: ports: port "99999" out of range (1-65535)`}},
		{"two kinds", "projects:\n  a:\n    allow:\n      - {sni: a.com, http: a.com}\n",
			[]string{`c.yaml:4:28: allow entry has both sni and http; use one rule kind per entry`}},
		{"no kind", "projects:\n  a:\n    allow:\n      - ports: [443]\n",
			[]string{`c.yaml:4:9: allow entry needs one of sni, http, https, tcp, cidr or preset`}},
		{"deny no kind", "projects:\n  a:\n    deny:\n      - ports: [443]\n",
			[]string{`c.yaml:4:9: deny entry needs one of sni, http, tcp, cidr or preset`}},
		{"unknown preset", "projects:\n  a:\n    allow:\n      - preset: pipy\n",
			[]string{`c.yaml:4:17: preset "pipy" does not exist (vmegress policy presets lists them: ` + strings.Join(PresetNames(), ", ") + `)`}},
		{"preset with ports", "projects:\n  a:\n    allow:\n      - preset: pypi\n        ports: [8443]\n",
			[]string{`c.yaml:5:9: unknown key "ports" in allow entry`}},
		{"rule not a mapping", "projects:\n  a:\n    allow:\n      - github.com\n",
			[]string{`c.yaml:4:9: allow entry must be a mapping such as {sni: example.com}`}},
		{"cidr without ports", "projects:\n  a:\n    allow:\n      - cidr: 198.51.100.0/24\n",
			[]string{`c.yaml:4:15: cidr rule 198.51.100.0/24 needs ports (a cidr rule is not inspected, so it must say where it applies)`}},
		{"cidr host bits", "projects:\n  a:\n    allow:\n      - cidr: 198.51.100.1/24\n        ports: [22]\n",
			[]string{`c.yaml:4:15: cidr: 198.51.100.1/24 has host bits set; did you mean 198.51.100.0/24?`}},
		{"smtp by name", "projects:\n  a:\n    allow:\n      - sni: mail.example.com\n        ports: [465, 25]\n",
			[]string{`c.yaml:4:14: sni rule mail.example.com: port 25 (SMTP) is never allowed by a name rule; use a cidr rule for a known mail relay`}},
		{"yaml syntax", "projects:\n  a: [\n",
			[]string{`c.yaml:2:1: invalid YAML: did not find expected node content`}},
		{"empty", "",
			[]string{`c.yaml:1:1: config is empty`}},
		{"several at once", "tproxy_port: x\nbogus: 1\n",
			[]string{`c.yaml:1:14: tproxy_port: port "x" out of range (1-65535)`, `c.yaml:2:1: unknown key "bogus" in config`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(tc.yaml))
			if err == nil {
				t.Fatal("no error")
			}
			if !IsInvalid(err) {
				t.Fatalf("error %v is not an invalid-config error", err)
			}
			if diff := cmp.Diff(tc.want, strings.Split(err.Error(), "\n")); diff != "" {
				t.Errorf("errors (-want +got):\n%s", diff)
			}
		})
	}
}

func TestNormalizeName(t *testing.T) {
	for in, want := range map[string]string{
		"GitHub.COM":        "github.com",
		"github.com.":       "github.com",
		"*.Example.org.":    "*.example.org",
		"_dmarc.example.io": "_dmarc.example.io",
		"xn--bcher-kva.ch":  "xn--bcher-kva.ch",
		"localhost":         "localhost",
	} {
		got, err := NormalizeName(in)
		if err != nil || got != want {
			t.Errorf("NormalizeName(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", ".", "*.", "a..b", "*.*.a", "a*.b", "::1", "10.0.0.1", strings.Repeat("a", 64) + ".com", strings.Repeat("a.", 127) + "ab",
		// DNS presentation escapes and bytes outside the host name set: a
		// name is matched on what its labels are, never on escaped text.
		`secret\.github.com`, `secret\046github.com`, `a\\b.github.com`, "a b.github.com", "a\x00.github.com", "a/b.github.com",
		"github.com:443", "a@github.com", "github.com\n", "a\tb.github.com", "\u212aey.github.com", "b\xfcr.github.com", "\xff.github.com"} {
		if got, err := NormalizeName(in); err == nil {
			t.Errorf("NormalizeName(%q) = %q, want an error", in, got)
		}
		if got, err := HostName(in); err == nil {
			t.Errorf("HostName(%q) = %q, want an error", in, got)
		}
	}
	if got, err := HostName("WWW.GitHub.com."); err != nil || got != "www.github.com" {
		t.Errorf("HostName: %q, %v", got, err)
	}
	if got, err := HostName("*.github.com"); err == nil {
		t.Errorf("HostName accepted the pattern *.github.com as %q", got)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("vm_cidr: 172.31.0.0/16\nprojects:\n  a:\n    subnet: 172.31.0.0/30\n    allow:\n      - sni: a.com\n"))
	f.Add([]byte("projects:\n  a: [\n"))
	f.Add([]byte("projects:\n  a:\n    allow:\n      - tcp: \"*.a.com\"\n        ports: [22]\n    deny:\n      - tcp: b.a.com\n"))
	f.Add([]byte("mark: 0x1\nroute_table: 100\n"))
	f.Add([]byte("secrets_dir: /s\nupstream_ca_file: /c.pem\nprojects:\n  a:\n    allow:\n      - https: \"*.a.com\"\n        methods: [GET]\n        paths: [\"/v1/*\", /x]\n        inject: {Authorization: \"Bearer ${secret:k}\"}\n      - http: b.com\n        paths: [/]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse("f.yaml", data)
		if err != nil {
			if !IsInvalid(err) {
				t.Fatalf("error of the wrong type: %v", err)
			}
			if !strings.HasPrefix(err.Error(), "f.yaml:") {
				t.Fatalf("error without a position: %v", err)
			}
			return
		}
		// A valid config keeps its invariants.
		for _, p := range cfg.Projects {
			if p.Subnet.IsValid() && (p.Subnet.Bits() != 30 || !cfg.VMCIDR.Contains(p.Subnet.Addr())) {
				t.Fatalf("project %s: subnet %s accepted", p.Name, p.Subnet)
			}
			for _, r := range p.Allow {
				if n, err := NormalizeName(r.Name); err != nil || n != r.Name {
					t.Fatalf("rule name %q is not normalised (%q, %v)", r.Name, n, err)
				}
				if r.RequestRules() && r.Kind != KindHTTPS && r.Kind != KindHTTP {
					t.Fatalf("request rules on a %s rule", r.Kind)
				}
				for _, pt := range r.Paths {
					if ValidPath(pt) != nil {
						t.Fatalf("path %q accepted", pt)
					}
				}
				for _, h := range r.Inject {
					if strings.ContainsAny(h.Name+h.Value, "\r\n\x00") {
						t.Fatalf("inject %q: %q accepted", h.Name, h.Value)
					}
				}
			}
		}
		if cfg.Mark == cfg.UpstreamMark || cfg.Mark == 0 {
			t.Fatalf("marks accepted: %#x %#x", cfg.Mark, cfg.UpstreamMark)
		}
	})
}

func FuzzNormalizeName(f *testing.F) {
	for _, s := range []string{"github.com", "*.a.b", "A.B.", "", "*", "1.2.3.4", `a\.b.c`, "\u212a.c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := NormalizeName(s)
		if err != nil {
			return
		}
		again, err := NormalizeName(n)
		if err != nil || again != n {
			t.Fatalf("not idempotent: %q -> %q -> %q, %v", s, n, again, err)
		}
		if strings.ContainsAny(strings.TrimPrefix(n, "*."), "*") || n != strings.ToLower(n) {
			t.Fatalf("bad normal form %q", n)
		}
		// Only host name bytes and separating dots: no escape can make its
		// labels differ from its text split on '.'.
		for _, l := range strings.Split(strings.TrimPrefix(n, "*."), ".") {
			for i := 0; i < len(l); i++ {
				if !IsHostByte(l[i]) {
					t.Fatalf("%q -> %q: byte %q in a label", s, n, l[i])
				}
			}
		}
	})
}

// TestMarkKernelBit: mark and upstream_mark may not use the kernel path's bit.
func TestMarkKernelBit(t *testing.T) {
	for _, body := range []string{"mark: 0x400001\n", "upstream_mark: 0x400000\n"} {
		_, err := Parse("c.yaml", []byte(body))
		if err == nil || !strings.Contains(err.Error(), "c.yaml:1:") || !strings.Contains(err.Error(), "0x400000") {
			t.Errorf("%q: %v; want the key refused at its line", body, err)
		}
	}
}
