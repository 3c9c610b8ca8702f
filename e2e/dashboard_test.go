package e2e

import (
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/nettest"
	"github.com/vmegress/vmegress/internal/world"
)

// promAddr is where the test's Prometheus listens, on the world's host
// namespace loopback (never reachable from anything else).
const promAddr = "127.0.0.1:9090"

// TestDashboardQueries runs a real Prometheus (Debian's package) in the
// world's host namespace, scraping the daemon's admin address after some
// allowed and denied traffic, and checks that every query of the shipped
// Grafana dashboard returns series, and that Prometheus loads the shipped
// alert rules. A renamed metric or label fails it. CI runs it on both data
// planes (VMEGRESS_TEST_PLANE=envoy).
func TestDashboardQueries(t *testing.T) {
	nettest.Privileged(t, "prometheus", "promtool")
	t.Parallel()
	e := newEnv(t)

	// Traffic: allowed and denied connections, allowed and refused names.
	if _, err := e.curl("https://www.github.com"); err != nil {
		t.Fatalf("allowed request: %v", err)
	}
	if _, err := e.curlAt("https://example.com", world.ExampleIP.String()); err == nil {
		t.Fatal("a denied request went through")
	}
	// A refused HTTP request (403 on both planes): its Host is the denied
	// destination.
	e.curlAt("http://example.com/", world.ExampleIP.String())
	for _, name := range []string{"www.github.com", "example.com"} {
		e.guest("dig", "+time=3", "+tries=1", name)
	}

	dir := t.TempDir()
	rules, err := filepath.Abs("../packaging/prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "prometheus.yml")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [%q]
scrape_configs:
  - job_name: vmegress
    static_configs:
      - targets: ["127.0.0.1:9901"]
`, rules)), 0o644)
	if out, err := exec.Command("promtool", "check", "config", cfg).CombinedOutput(); err != nil {
		t.Fatalf("promtool check config: %v\n%s", err, out)
	}
	argv := world.NS(e.w.Host, "prometheus", "--config.file="+cfg,
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+promAddr)
	prom := exec.CommandContext(e.ctx, argv[0], argv[1:]...)
	logFile, _ := os.Create(filepath.Join(dir, "prometheus.log"))
	prom.Stdout, prom.Stderr = logFile, logFile
	if err := prom.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		prom.Process.Kill()
		prom.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "prometheus.log"))
			t.Logf("prometheus log:\n%s", b)
		}
	})

	// Ready when rate() over 1m has enough samples: at least 3 scrapes.
	// (Bounded: the world's context ends the wait.)
	for {
		res, err := e.promQuery(`count_over_time(vmegress_dataplane_up[1m]) >= 3`)
		if err == nil && len(res) > 0 {
			break
		}
		select {
		case <-e.ctx.Done():
			t.Fatalf("prometheus never scraped the daemon three times: %v", err)
		case <-time.After(500 * time.Millisecond):
		}
	}

	dash, err := os.ReadFile("../packaging/grafana/vmegress.json")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(dash, &d); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	if len(d.Panels) == 0 {
		t.Fatal("dashboard has no panels")
	}
	// Grafana's variables, as Grafana would fill them in.
	vars := strings.NewReplacer("$__rate_interval", "1m", "$__range", "5m", "$project", ".*")
	results := map[string][]promSeries{}
	for _, p := range d.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			res, err := e.promQuery(vars.Replace(tg.Expr))
			switch {
			case err != nil:
				t.Errorf("panel %q: %s: %v", p.Title, tg.Expr, err)
			case len(res) == 0:
				t.Errorf("panel %q: %s returned no series", p.Title, tg.Expr)
			}
			results[p.Title] = append(results[p.Title], res...)
		}
	}
	// The traffic above shows up where it should, on either data plane
	// (Envoy's access-log lines feed the same series as the builtin proxy).
	want := map[string][]string{
		"DNS verdicts":                {`verdict="allow"`, `verdict="deny"`},
		"Data plane up":               {`value=1`},
		"Decisions by verdict":        {`verdict="allow"`, `verdict="deny"`},
		"Decisions by project":        {`project="alpha"`},
		"Top denied destinations":     {`destination="example.com:443"`, `destination="example.com:80"`},
		"Open connections by project": {`project="alpha"`},
		"Bytes by project":            {`direction="up"`, `direction="down"`},
	}
	for title, want := range want {
		got := fmt.Sprint(results[title])
		for _, w := range want {
			if !strings.Contains(got, w) {
				t.Errorf("panel %q: no %s in %s", title, w, got)
			}
		}
	}

	// Every metric the alert rules name is one the daemon exports (a rule
	// on a renamed metric would evaluate cleanly, to nothing, forever).
	alertRules, err := os.ReadFile(rules)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, n := range regexp.MustCompile(`\bvmegress_[a-z_]+\b`).FindAllString(string(alertRules), -1) {
		names[n] = true
	}
	if len(names) < 4 {
		t.Errorf("the alert rules name only %v", names)
	}
	for n := range names {
		if res, err := e.promQuery(n); err != nil || len(res) == 0 {
			t.Errorf("the alert rules use %s, which the daemon does not export (%v)", n, err)
		}
	}

	// Prometheus itself loaded every alert rule and evaluates them cleanly.
	out, err := e.hostGet("http://" + promAddr + "/api/v1/rules?type=alert")
	if err != nil {
		t.Fatal(err)
	}
	var rr struct {
		Data struct {
			Groups []struct {
				Rules []struct{ Name, Health, LastError string }
			}
		}
	}
	json.Unmarshal([]byte(out), &rr)
	n := 0
	for _, g := range rr.Data.Groups {
		for _, r := range g.Rules {
			n++
			if r.Health == "err" {
				t.Errorf("alert %s: %s", r.Name, r.LastError)
			}
		}
	}
	if n != 5 {
		t.Errorf("prometheus loaded %d alert rules, want 5: %s", n, out)
	}
}

// promSeries is one series of an instant query, printed as labels=value.
type promSeries struct {
	Metric map[string]string
	Value  []any
}

func (s promSeries) String() string {
	var b strings.Builder
	for k, v := range s.Metric {
		fmt.Fprintf(&b, "%s=%q ", k, v)
	}
	if len(s.Value) == 2 {
		fmt.Fprintf(&b, "value=%v", s.Value[1])
	}
	return b.String()
}

// promQuery runs an instant query against the test's Prometheus.
func (e *env) promQuery(q string) ([]promSeries, error) {
	out, err := e.hostGet("http://" + promAddr + "/api/v1/query?query=" + url.QueryEscape(q))
	if err != nil {
		return nil, err
	}
	var r struct {
		Status, Error string
		Data          struct {
			ResultType string
			Result     []promSeries
		}
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return nil, fmt.Errorf("query %s: %w: %s", q, err, out)
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("query %s: %s", q, r.Error)
	}
	return r.Data.Result, nil
}
