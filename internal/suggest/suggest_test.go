package suggest

import (
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
		{config.KindSNI, "*.github.com", nil},
		{config.KindSNI, "a.com", nil}, // a.com and b.com share "com": never *.com
		{config.KindSNI, "b.com", nil},
		{config.KindSNI, "example.com", []uint16{443, 8443}},
		{config.KindHTTP, "deb.debian.org", nil},
		{config.KindCIDR, "198.51.100.7/32", []uint16{22, 5432}},
	}
	got := o.Rules()
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b Rule) bool {
		return cmp.Equal(a.Kind, b.Kind) && a.Value == b.Value && cmp.Equal(a.Ports, b.Ports)
	})); diff != "" {
		t.Errorf("rules (-want +got):\n%s", diff)
	}
	y := YAML("alpha", got, o)
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
