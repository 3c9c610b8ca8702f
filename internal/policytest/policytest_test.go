package policytest

import (
	"strings"
	"testing"

	"github.com/vmegress/vmegress/internal/config"
)

func TestGoodFile(t *testing.T) {
	f, err := Load("testdata/good.yaml")
	if err != nil {
		t.Fatal(err)
	}
	rs, err := Run(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 10 {
		t.Fatalf("%d results", len(rs))
	}
	if failed := Failed(rs); len(failed) > 0 {
		t.Errorf("failed:\n%s", Failures(rs))
	}
	if rs[1].Rule != "deny/sni:*.evil.example" || rs[5].Rule != "preset:pypi/sni:files.pythonhosted.org" || rs[8].Rule != "tcp:db.example ports 5433" {
		t.Errorf("rules: %q, %q, %q", rs[1].Rule, rs[5].Rule, rs[8].Rule)
	}
}

// TestBadFile: inline projects; the wrong expectations are reported with
// the rule that decided them, at their lines.
func TestBadFile(t *testing.T) {
	f, err := Load("testdata/bad.yaml")
	if err != nil {
		t.Fatal(err)
	}
	rs, err := Run(f)
	if err != nil {
		t.Fatal(err)
	}
	got := Failures(rs)
	lines := strings.Split(strings.TrimSpace(got), "\n")
	if len(lines) != 2 ||
		!strings.HasPrefix(lines[0], "testdata/bad.yaml:10: project alpha: connect pypi.org:443: want allow, got deny by rule deny/sni:pypi.org") ||
		!strings.HasPrefix(lines[1], "testdata/bad.yaml:11: project alpha: resolve example.com: want allow, got deny") {
		t.Errorf("failures:\n%s", got)
	}
	if tab := Table(rs); !strings.Contains(tab, "FAIL") || !strings.Contains(tab, "preset:pypi/sni:files.pythonhosted.org") {
		t.Errorf("table:\n%s", tab)
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{"expect:\n  - {project: a, connect: x.com, verdict: allow}\n", "not HOST:PORT"},
		{"expect:\n  - {project: a, connect: \"x.com:443\", verdict: maybe}\n", "verdict \"maybe\""},
		{"expect:\n  - {project: a, verdict: allow}\n", "one of connect or resolve"},
		{"exp: []\n", "unknown key \"exp\""},
		{"projects:\n  a:\n    allow:\n      - sni: \"a.*.com\"\nexpect: [{project: a, resolve: x.com, verdict: deny}]\n", "t.yaml:4:14"},
	} {
		_, err := Parse("t.yaml", []byte(tc.body))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v; want %q", tc.body, err, tc.want)
		}
	}
}

func TestDiff(t *testing.T) {
	old, err := config.Parse("old.yaml", []byte("projects:\n  a:\n    allow:\n      - sni: github.com\n      - sni: example.com\n  gone: {}\n"))
	if err != nil {
		t.Fatal(err)
	}
	new, err := config.Parse("new.yaml", []byte("projects:\n  a:\n    mode: audit\n    allow:\n      - sni: github.com\n      - preset: npm\n    deny:\n      - sni: evil.example\n  fresh: {}\n"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := Parse("x.yaml", []byte("expect:\n  - {project: a, connect: \"example.com:443\", verdict: allow}\n  - {project: a, connect: \"github.com:443\", verdict: allow}\n"))
	if err != nil {
		t.Fatal(err)
	}
	ds, cs, err := Diff(old, new, []*File{f})
	if err != nil {
		t.Fatal(err)
	}
	text := DiffText(ds, cs)
	for _, want := range []string{
		"project a (changed)\n  + allow preset:npm/sni:registry.npmjs.org\n  + deny sni:evil.example\n  - allow sni:example.com\n  ~ mode enforce -> audit\n",
		"project fresh (added)", "project gone (removed)",
		"x.yaml:2: project a: connect example.com:443: allow (sni:example.com) -> would_deny (no rule)",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("diff lacks %q:\n%s", want, text)
		}
	}
	if len(cs) != 1 {
		t.Errorf("%d changes; want 1 (github.com keeps its verdict)", len(cs))
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("expect:\n  - {project: a, connect: \"x.com:443\", verdict: allow}\n"))
	f.Add([]byte("projects:\n  a: {}\nexpect: [{project: a, resolve: x.com, verdict: deny}]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		ff, err := Parse("f.yaml", data)
		if err != nil || ff.Config == nil {
			return
		}
		Run(ff) // must not panic
	})
}
