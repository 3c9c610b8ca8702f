package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/nettest"
	"github.com/vmegress/vmegress/internal/state"
	"github.com/vmegress/vmegress/internal/world"
)

// populate gives the world's host n placed projects: real TAPs (made in
// one `ip -batch`) and their state records.
func populate(b testing.TB, w *world.World, n int) {
	b.Helper()
	st := state.State{Projects: map[string]state.Project{}}
	var batch strings.Builder
	sub := netip.MustParsePrefix("172.31.0.0/30")
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("p%d", i)
		p := state.Project{Name: name, TAP: fmt.Sprintf("tap-p%d", i), Subnet: sub, MAC: state.MAC(name), Egress: state.EgressProxy}
		st.Projects[name] = p
		fmt.Fprintf(&batch, "tuntap add %s mode tap\naddr add %s/30 dev %s\nlink set %s up\n", p.TAP, p.HostIP(), p.TAP, p.TAP)
		next := sub.Addr()
		for j := 0; j < 4; j++ {
			next = next.Next()
		}
		sub = netip.PrefixFrom(next, 30)
	}
	if n > 0 {
		f := filepath.Join(w.Dir, "batch")
		os.WriteFile(f, []byte(batch.String()), 0o644)
		if err := world.Run(context.Background(), world.NS(w.Host, "ip", "-batch", f)...); err != nil {
			b.Fatal(err)
		}
	}
	os.MkdirAll(w.StateDir(), 0o700)
	data, err := state.Marshal(&st)
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.StateDir(), state.FileName), data, 0o600); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkNetScale reports `net up` and `net down` latency (the whole CLI
// run: process start, state lock and write, TAP, ruleset) with 0, 1,000 and
// 4,000 projects already up, and the daemon's resident memory holding them.
// Run: scripts/bench-net-scale.sh
func BenchmarkNetScale(b *testing.B) {
	nettest.Privileged(b)
	for _, n := range []int{0, 1000, 4000} {
		b.Run(fmt.Sprintf("projects=%d", n), func(b *testing.B) {
			ctx := context.Background()
			w, err := world.New(ctx, world.Options{Prefix: "vmegb"})
			if err != nil {
				b.Fatal(err)
			}
			defer w.Close()
			cfg, _ := w.WriteConfig("config.yaml", "projects: {}\n")
			populate(b, w, n)
			if _, err := w.Vmegress(ctx, binary, "--config", cfg, "up"); err != nil {
				b.Fatal(err)
			}
			d, err := w.StartDaemon(ctx, binary, cfg)
			if err != nil {
				b.Fatal(err)
			}
			defer d.Kill()
			var up, down time.Duration
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				t0 := time.Now()
				if _, err := w.Vmegress(ctx, binary, "--config", cfg, "net", "up", "bench"); err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				if _, err := w.Vmegress(ctx, binary, "--config", cfg, "net", "down", "bench"); err != nil {
					b.Fatal(err)
				}
				up += t1.Sub(t0)
				down += time.Since(t1)
			}
			b.StopTimer()
			b.ReportMetric(float64(up.Microseconds())/float64(b.N)/1000, "ms/up")
			b.ReportMetric(float64(down.Microseconds())/float64(b.N)/1000, "ms/down")
			time.Sleep(1500 * time.Millisecond) // let the daemon settle on the final state
			b.ReportMetric(float64(rssKiB(b, d.Cmd.Process.Pid))/1024, "MiB-daemon-rss")
		})
	}
}

func rssKiB(b testing.TB, pid int) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kib, _ := strconv.Atoi(strings.Fields(v)[0])
			return kib
		}
	}
	b.Fatal("no VmRSS")
	return 0
}
