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
