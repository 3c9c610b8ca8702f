package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/state"
)

// Scale of the incremental-change benchmarks (issue 11 item 6).
const (
	benchProjects = 4000
	benchRules    = 50
	// benchTarget names the project that changes: one in the middle.
	benchTarget = "p2000"
	// flipName is allowed by every other change of the target's policy.
	flipName = "flip.example.com"
)

var flipDst = netip.MustParseAddrPort("198.18.1.10:443")

// benchState places n projects p0…p(n-1) on consecutive /30s of 172.31.0.0/16.
func benchState(n int) *state.State {
	st := &state.State{Projects: make(map[string]state.Project, n)}
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("p%d", i)
		sub := netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 31, byte(4 * i / 256), byte(4 * i % 256)}), 30)
		st.Projects[name] = state.Project{Name: name, TAP: "tap-" + name, Subnet: sub, MAC: state.MAC(name), Egress: state.EgressProxy}
	}
	return st
}

func benchRulesOf(name string, flip bool) []config.Rule {
	rules := make([]config.Rule, 0, benchRules+1)
	for r := 0; r < benchRules; r++ {
		rules = append(rules, config.Rule{Kind: config.KindSNI, Name: fmt.Sprintf("h%d.%s.example.com", r, name)})
	}
	if flip {
		rules = append(rules, config.Rule{Kind: config.KindSNI, Name: flipName})
	}
	return rules
}

// newBenchEngine opens an engine on the fakes of engine_test.go over a state
// directory holding the placed projects and, when api, each one's API policy.
func newBenchEngine(b *testing.B, file *config.Config, api bool) *Engine {
	b.Helper()
	dir := b.TempDir()
	store := state.Store{Dir: dir}
	st := benchState(benchProjects)
	if err := store.Save(st); err != nil {
		b.Fatal(err)
	}
	if api {
		// Written directly (no fsync each): only the layout matters here.
		if err := os.MkdirAll(filepath.Dir(store.PolicyPath("x")), 0o700); err != nil {
			b.Fatal(err)
		}
		for name := range st.Projects {
			doc := config.Project{Name: name, Mode: "enforce", MaxConnections: config.DefaultMaxConnections, Allow: benchRulesOf(name, false)}
			if err := os.WriteFile(store.PolicyPath(name), mustJSON(b, config.PolicyDocument(doc)), 0o600); err != nil {
				b.Fatal(err)
			}
		}
	}
	j := &journal{}
	e := &Engine{Store: store, Interception: Interception{Firewall: &fakeFirewall{j: j}}, Host: &fakeHost{j: j, taps: map[string]bool{}}}
	if err := e.Open(context.Background(), file, false); err != nil {
		b.Fatal(err)
	}
	return e
}

// benchConfigYAML is a config file naming every project with its rules;
// the target allows flipName when flip.
func benchConfigYAML(flip bool) []byte {
	var y strings.Builder
	y.WriteString("projects:\n")
	for p := 0; p < benchProjects; p++ {
		name := fmt.Sprintf("p%d", p)
		fmt.Fprintf(&y, "  %s:\n    allow:\n", name)
		for _, r := range benchRulesOf(name, flip && name == benchTarget) {
			fmt.Fprintf(&y, "      - sni: %s\n", r.Name)
		}
	}
	return []byte(y.String())
}

// decided reports whether the snapshot's policy gives the target's guest the
// verdict a connection to flipName must get when allowed is as said.
func decided(e *Engine, allowed bool) bool {
	ex := e.Snapshot().Policy.Explain(policy.Query{Project: benchTarget, Dst: flipDst, Name: flipName, Bytes: policy.BytesTLS})
	return (ex.Verdict == policy.Allow) == allowed
}

// reportQuantiles reports p50 and p99 of lat in milliseconds.
func reportQuantiles(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Nanoseconds()) / 1e6 }
	b.ReportMetric(q(0.50), "ms-p50")
	b.ReportMetric(q(0.99), "ms-p99")
}

// BenchmarkSetPolicy4000x50: with 4,000 placed API projects of 50 rules each,
// one project's policy is replaced (allowing, then no longer allowing, one
// name), timed until a decision on the new snapshot gives the new verdict.
// The policy file's write (with fsync) is part of it.
func BenchmarkSetPolicy4000x50(b *testing.B) {
	e := newBenchEngine(b, config.Default(), true)
	ctx := context.Background()
	var lat []time.Duration
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		allow := i%2 == 0
		p := config.Project{Name: benchTarget, Mode: "enforce", MaxConnections: config.DefaultMaxConnections, Allow: benchRulesOf(benchTarget, allow)}
		t0 := time.Now()
		if _, err := e.SetPolicy(ctx, p); err != nil {
			b.Fatal(err)
		}
		if !decided(e, allow) {
			b.Fatalf("change %d: the new policy does not decide", i)
		}
		lat = append(lat, time.Since(t0))
	}
	b.StopTimer()
	reportQuantiles(b, lat)
	// What of it is the policy file's atomic write (two fsyncs: the file,
	// its directory), which depends on the disk, not on the project count.
	var write []time.Duration
	doc := mustJSON(b, config.PolicyDocument(config.Project{Name: benchTarget, Mode: "enforce", Allow: benchRulesOf(benchTarget, true)}))
	for range 50 { // enough writes for a median
		t0 := time.Now()
		if err := e.Store.SavePolicy(benchTarget, doc); err != nil {
			b.Fatal(err)
		}
		write = append(write, time.Since(t0))
	}
	slices.Sort(write)
	b.ReportMetric(float64(write[len(write)/2].Nanoseconds())/1e6, "ms-write-p50")
}

// BenchmarkSetConfig4000x50 is a config reload where one of 4,000 projects
// (50 rules each, all placed) changed, timed until a decision on the new
// snapshot gives the new verdict: without parsing (the file already parsed)
// and with it (config.Parse of the whole file, as the daemon's reload does).
func BenchmarkSetConfig4000x50(b *testing.B) {
	raw := [2][]byte{benchConfigYAML(false), benchConfigYAML(true)}
	var parsed [2]*config.Config
	for i, y := range raw {
		cfg, err := config.Parse("bench.yaml", y)
		if err != nil {
			b.Fatal(err)
		}
		parsed[i] = cfg
	}
	for _, parse := range []bool{false, true} {
		b.Run(fmt.Sprintf("parse=%v", parse), func(b *testing.B) {
			e := newBenchEngine(b, parsed[0], false)
			ctx := context.Background()
			var lat []time.Duration
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				k := 1 - i%2 // 1: the target allows flipName
				t0 := time.Now()
				cfg := parsed[k]
				if parse {
					var err error
					if cfg, err = config.Parse("bench.yaml", raw[k]); err != nil {
						b.Fatal(err)
					}
				}
				changed, err := e.SetConfig(ctx, cfg)
				if err != nil {
					b.Fatal(err)
				}
				if !decided(e, k == 1) {
					b.Fatalf("reload %d: the new policy does not decide", i)
				}
				lat = append(lat, time.Since(t0))
				if !slices.Equal(changed, []string{benchTarget}) {
					b.Fatalf("reload %d changed %v, want only %s", i, changed, benchTarget)
				}
			}
			reportQuantiles(b, lat)
		})
	}
}

func mustJSON(b *testing.B, v any) []byte {
	data, err := json.Marshal(v)
	if err != nil {
		b.Fatal(err)
	}
	return data
}
