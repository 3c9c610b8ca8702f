package envoy

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestActiveByProject: the chains' gauges (as Envoy 1.40 answers
// /stats?format=json) sum by project; other stats are skipped.
func TestActiveByProject(t *testing.T) {
	body := `{"stats":[
		{"name":"connection_limit.alpha/tls/443.active_connections","value":2},
		{"name":"connection_limit.alpha/http/80.active_connections","value":1},
		{"name":"connection_limit.beta/tls/443.active_connections","value":0},
		{"name":"connection_limit.alpha/tls/443.limited_connections","value":7},
		{"name":"connection_limit.nochain.active_connections","value":5},
		{"name":"listener.downstream_cx_active","value":9}]}`
	got, err := activeByProject([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(map[string]float64{"alpha": 3, "beta": 0}, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if _, err := activeByProject([]byte("no json")); err == nil {
		t.Error("a garbled answer read without error")
	}
}

func FuzzActiveByProject(f *testing.F) {
	f.Add([]byte(`{"stats":[{"name":"connection_limit.alpha/tls/443.active_connections","value":2}]}`))
	f.Add([]byte(`{"stats":[{"name":"connection_limit./.active_connections","value":-1}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := activeByProject(b)
		if err != nil {
			return
		}
		for p := range m {
			if p == "" {
				t.Errorf("an empty project from %q", b)
			}
		}
	})
}
