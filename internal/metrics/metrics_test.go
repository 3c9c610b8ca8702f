package metrics

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
)

// dump renders reg's series of the families named as sorted
// "name{labels} value" lines.
func dump(t *testing.T, reg *prometheus.Registry, names ...string) string {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, f := range fams {
		want := len(names) == 0
		for _, n := range names {
			want = want || f.GetName() == n
		}
		if !want {
			continue
		}
		for _, m := range f.GetMetric() {
			var ls []string
			for _, l := range m.GetLabel() {
				ls = append(ls, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			v := m.GetCounter().GetValue() + m.GetGauge().GetValue()
			out = append(out, fmt.Sprintf("%s{%s} %g", f.GetName(), strings.Join(ls, ","), v))
		}
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}

// TestAccessLineLikeBuiltin: Envoy's access-log lines fill the same series,
// with the same labels, as the builtin proxy's calls for the same traffic.
func TestAccessLineLikeBuiltin(t *testing.T) {
	envoyReg, builtinReg := prometheus.NewRegistry(), prometheus.NewRegistry()
	em, bm := New(envoyReg), New(builtinReg)

	// As Envoy writes them (json_format: numbers typed, "-"/null for none).
	lines := []string{
		`{"msg":"connection","project":"alpha","verdict":"allow","rule":"sni (alpha/tls/443)","sni":"www.github.com","dst":"198.18.0.10:443","bytes_up":517,"bytes_down":4000,"dataplane":"envoy"}`,
		`{"msg":"connection","project":"alpha","verdict":"deny","rule":"","sni":"Example.COM.","dst":"198.18.0.20:443","bytes_up":0,"bytes_down":0,"dataplane":"envoy"}`,
		`{"msg":"connection","project":"alpha","verdict":"deny","host":"example.com:8080","status":403,"dst":"198.18.0.20:8080","bytes_up":"80","bytes_down":"-"}`,
		`{"msg":"connection","project":"alpha","verdict":"deny","sni":null,"dst":"198.18.1.22:22"}`,
		`{"msg":"connection","project":"","verdict":"deny","sni":"-","dst":"198.18.1.22:443"}`,
		`{"msg":"dns","project":"alpha","verdict":"deny","name":"example.com"}`,
		`{"msg":"connection","project":"alpha","verdict":"deny","sni":"a b\u0000c","dst":"198.18.0.20:443"}`,
		`{"something":"else"}`,
	}
	for _, l := range lines {
		var e map[string]any
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			t.Fatal(err)
		}
		em.AccessLine(e)
	}
	// The builtin proxy's calls for the same connections.
	for _, c := range []struct {
		project, verdict, name string
		port                   uint16
		up, down               int64
	}{
		{"alpha", "allow", "www.github.com", 443, 517, 4000},
		{"alpha", "deny", "example.com", 443, 0, 0},
		{"alpha", "deny", "example.com", 8080, 80, 0},
		{"alpha", "deny", "", 22, 0, 0},
		{"", "deny", "", 443, 0, 0},
		{"alpha", "deny", "a b\x00c", 443, 0, 0},
	} {
		bm.Connection(c.project, c.verdict)
		bm.Denied(c.project, c.verdict, c.name, c.port)
		if c.up > 0 || c.down > 0 {
			bm.Bytes(c.project, c.up, c.down)
		}
	}
	names := []string{"vmegress_proxy_connections_total", "vmegress_proxy_bytes_total", "vmegress_proxy_denied_destinations_total"}
	got, want := dump(t, envoyReg, names...), dump(t, builtinReg, names...)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("envoy lines vs builtin calls (-builtin +envoy):\n%s", diff)
	}
	for _, w := range []string{
		`vmegress_proxy_connections_total{project="alpha",verdict="deny"} 4`,
		`vmegress_proxy_denied_destinations_total{destination="example.com:443",project="alpha",verdict="deny"} 1`,
		`vmegress_proxy_denied_destinations_total{destination="example.com:8080",project="alpha",verdict="deny"} 1`,
		`vmegress_proxy_denied_destinations_total{destination="(no name):22",project="alpha",verdict="deny"} 1`,
		`vmegress_proxy_denied_destinations_total{destination="(invalid):443",project="alpha",verdict="deny"} 1`,
		`vmegress_proxy_bytes_total{direction="up",project="alpha"} 597`,
	} {
		if !strings.Contains(got, w) {
			t.Errorf("missing %s in\n%s", w, got)
		}
	}
	if strings.Contains(got, "www.github.com") {
		t.Errorf("an allowed connection counted as denied:\n%s", got)
	}
}

// TestDeniedCapped: a guest making up names cannot grow the series past
// MaxDestinations+1 per project; known destinations keep counting by name.
func TestDeniedCapped(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	for i := range 10 * MaxDestinations {
		m.Denied("alpha", "deny", fmt.Sprintf("n%d.example", i), 443)
	}
	m.Denied("alpha", "deny", "n0.example", 443)
	m.Denied("beta", "would_deny", "n9999.example", 443)
	m.Denied("beta", "allow", "allowed.example", 443)
	got := dump(t, reg, "vmegress_proxy_denied_destinations_total")
	if n := strings.Count(got, `project="alpha"`); n != MaxDestinations+1 {
		t.Errorf("alpha has %d series, want %d", n, MaxDestinations+1)
	}
	for _, w := range []string{
		fmt.Sprintf(`{destination="(other)",project="alpha",verdict="deny"} %d`, 9*MaxDestinations),
		`{destination="n0.example:443",project="alpha",verdict="deny"} 2`,
		`{destination="n9999.example:443",project="beta",verdict="would_deny"} 1`,
	} {
		if !strings.Contains(got, w) {
			t.Errorf("missing %s", w)
		}
	}
	if strings.Contains(got, "allowed.example") {
		t.Error("an allowed connection was counted")
	}
}

// TestActiveFunc: with SetActiveFunc the gauge is what the func reads; a
// failing read is an error for that collector only.
func TestActiveFunc(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.Active("alpha", 1)
	if got := dump(t, reg, "vmegress_proxy_active_connections"); got != `vmegress_proxy_active_connections{project="alpha"} 1` {
		t.Errorf("builtin: %s", got)
	}
	m.SetActiveFunc(func() (map[string]float64, error) { return map[string]float64{"alpha": 3, "beta": 0}, nil })
	want := "vmegress_proxy_active_connections{project=\"alpha\"} 3\nvmegress_proxy_active_connections{project=\"beta\"} 0"
	if got := dump(t, reg, "vmegress_proxy_active_connections"); got != want {
		t.Errorf("envoy: %s", got)
	}
	m.SetActiveFunc(func() (map[string]float64, error) { return nil, errors.New("envoy restarting") })
	fams, err := reg.Gather()
	if err == nil || !strings.Contains(err.Error(), "envoy restarting") {
		t.Errorf("gather error %v", err)
	}
	found := false
	for _, f := range fams {
		found = found || f.GetName() == "vmegress_dataplane_up"
	}
	if !found {
		t.Error("a failing active read hid the other metrics")
	}
}

// FuzzAccessLine: any JSON line is counted without panicking, and never
// as a destination label that is not a bounded name.
func FuzzAccessLine(f *testing.F) {
	f.Add([]byte(`{"msg":"connection","project":"alpha","verdict":"deny","sni":"example.com","dst":"198.18.0.20:443","bytes_up":1}`))
	f.Add([]byte(`{"type":"connection","project":"alpha","verdict":"deny","host":"[::1]:80","dst":"[::1]:80","bytes_up":"12"}`))
	f.Add([]byte(`{"msg":"connection","project":"p","verdict":"would_deny","host":"x:y:z","bytes_down":-5}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var e map[string]any
		if json.Unmarshal(b, &e) != nil {
			return
		}
		reg := prometheus.NewRegistry()
		m := New(reg)
		m.AccessLine(e)
		fams, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range fams {
			for _, mt := range f.GetMetric() {
				for _, l := range mt.GetLabel() {
					if l.GetName() == "destination" && len(l.GetValue()) > maxNameLen+len(":65535") {
						t.Errorf("destination label %q", l.GetValue())
					}
				}
				if v := mt.GetCounter().GetValue(); v < 0 {
					t.Errorf("negative counter %v", v)
				}
			}
		}
	})
}
