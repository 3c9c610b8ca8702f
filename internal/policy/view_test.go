package policy

import (
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/vmegress/vmegress/internal/config"
)

// TestPorts: the renderers' view groups rules by port and kind, one entry
// per pattern (the first rule naming it), sorted.
func TestPorts(t *testing.T) {
	cfg, err := config.Parse("t.yaml", []byte(`projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: b.example
      - sni: "*.a.example"
        ports: [443, 8080]
      - http: c.example
        ports: [8080]
      - http: c.example
        ports: [8080, 80]
      - cidr: 198.51.100.0/24
        ports: [22]
`))
	if err != nil {
		t.Fatal(err)
	}
	pol, err := Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, v := range pol.Project("alpha").Ports() {
		got = append(got, fmt.Sprintf("%d %v sni=%v http=%v cidrs=%v", v.Port, v.Inspect(), v.SNI, v.HTTP, v.CIDRs))
	}
	want := []string{
		"22 none sni=[] http=[] cidrs=[{198.51.100.0/24 cidr:198.51.100.0/24 ports 22}]",
		"80 http sni=[] http=[{c.example http:c.example ports 8080,80}] cidrs=[]",
		"443 tls sni=[{*.a.example sni:*.a.example ports 443,8080} {b.example sni:b.example}] http=[] cidrs=[]",
		"8080 tls-or-http sni=[{*.a.example sni:*.a.example ports 443,8080}] http=[{c.example http:c.example ports 8080}] cidrs=[]",
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("Ports (-want +got):\n%s", d)
	}
	if all := pol.All(); len(all) != 1 || all[0].Name != "alpha" {
		t.Errorf("All() = %v", all)
	}
}
