package config

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestParsePolicy(t *testing.T) {
	pr, err := ParsePolicy("", "sbx-1", []byte(`{"mode":"audit","max_connections":5,"allow":[{"sni":"*.GitHub.com"},{"cidr":"198.51.100.0/24","ports":[5432]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if pr.Name != "sbx-1" || pr.Mode != "audit" || pr.MaxConnections != 5 || len(pr.Allow) != 2 || pr.Allow[0].Name != "*.github.com" {
		t.Errorf("parsed %+v", pr)
	}
	// The rendered document parses back to the same project.
	b, _ := json.Marshal(PolicyDocument(pr))
	again, err := ParsePolicy("", "sbx-1", b)
	if err != nil || again.Allow[1].Prefix != pr.Allow[1].Prefix || again.Mode != "audit" {
		t.Errorf("round trip: %+v, %v", again, err)
	}
	for _, tc := range []struct{ body, field, msg string }{
		{`{"allow":[{"sni":"a.com"},{"sni":"b.com"},{"cidr":"10.0.0.0/8","ports":[0]}]}`, "allow[2].ports[0]", "out of range"},
		{`{"allow":[{"sni":"a.com","http":"b.com"}]}`, "allow[0].http", "one rule kind"},
		{`{"allow":[{"cidr":"10.0.0.0/8"}]}`, "allow[0].cidr", "needs ports"},
		{`{"alow":[]}`, "alow", "unknown key"},
		{`{"mode":"open"}`, "mode", "must be one of"},
		{`{"subnet":"172.31.0.0/30"}`, "subnet", "placement"},
		{`{"allow":[{"sni":"bad..name"}]}`, "allow[0].sni", "sni"},
	} {
		_, err := ParsePolicy("", "sbx-1", []byte(tc.body))
		if err == nil || FirstField(err) != tc.field || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: %v (field %q); want field %q, message with %q", tc.body, err, FirstField(err), tc.field, tc.msg)
		}
	}
}

// FuzzParsePolicy: any body either parses to a project whose rendered
// document parses back to the same project, or is refused with issues that
// each carry a message; never a panic.
func FuzzParsePolicy(f *testing.F) {
	for _, s := range []string{
		`{"allow":[{"sni":"a.com"}]}`,
		`{"mode":"audit","max_connections":3,"allow":[{"cidr":"10.0.0.0/8","ports":[22]},{"http":"*.b.org","ports":[80,8080]}]}`,
		"allow:\n  - sni: x.y\n",
		`{"allow":[{"https":"a.com","methods":["GET"],"paths":["/v1/*"],"inject":{"X-Key":"${secret:k}"}}]}`,
		`{"allow":[{"sni":"a.com","http":"b"}]}`, `[]`, `{"subnet":"1.2.3.4/30"}`, "",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParsePolicy("", "p", data)
		if err != nil {
			ce, ok := err.(*Error)
			if !ok || len(ce.Issues) == 0 {
				t.Fatalf("error without issues: %v", err)
			}
			return
		}
		b, err := json.Marshal(PolicyDocument(p))
		if err != nil {
			t.Fatal(err)
		}
		again, err := ParsePolicy("", "p", b)
		if err != nil {
			t.Fatalf("the rendered policy %s does not parse: %v", b, err)
		}
		if again.Mode != p.Mode || again.MaxConnections != p.MaxConnections || len(again.Allow) != len(p.Allow) {
			t.Fatalf("round trip changed the policy: %+v -> %+v", p, again)
		}
		for i := range p.Allow {
			if again.Allow[i].String() != p.Allow[i].String() {
				t.Fatalf("rule %d: %s -> %s", i, p.Allow[i], again.Allow[i])
			}
		}
	})
}
