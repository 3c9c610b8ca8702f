package main

// The kernel path measured on its own (-cidr): throughput and new TCP
// connections through a cidr rule, vmegress (builtin plane, nftables)
// against direct forwarding, with what each path's CPU went to: the
// daemon's own CPU time and, with -profile DIR, a system-wide perf capture
// of each measurement whose top symbols go into the report.

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// cidrMetrics are the figures -cidr takes, in metrics' keys.
var cidrMetrics = []string{"tput1", "tput8", "ccps"}

// cidrPaths are the paths -cidr compares: the kernel path is the same on
// both planes (no data plane touches its bytes), so the builtin plane
// stands for both.
var cidrPaths = []string{"direct", "builtin"}

// perfTopN is how many symbols of each perf capture the report shows.
const perfTopN = 15

// cidrProfile is one perf capture's top symbols and the daemon's CPU.
type cidrProfile struct {
	path, key string
	// daemonCPU is the daemon's CPU time over the measurement's wall time
	// (1.0 = one core); -1 on direct.
	daemonCPU float64
	top       string
	// shares: what part of the measurement's samples went to each cost
	// the kernel path adds over direct forwarding (costShares).
	shares string
}

// costs are the kernel path's own costs, as perf sees them: the daemon's
// process (conntrack events, deletes, the access log), the ruleset's
// evaluation, route lookups through the routing lock's rules and the
// ruleset's fib checks, and conntrack events built in the kernel.
var costs = []struct {
	name string
	in   func(comm, sym string) bool
}{
	{"the daemon (events, deletes, access log)", func(c, _ string) bool { return c == "vmegress" }},
	{"nftables ruleset (nft_*)", func(c, s string) bool { return c != "vmegress" && strings.HasPrefix(s, "nft_") }},
	{"route lookups with policy rules (fib_*)", func(c, s string) bool { return c != "vmegress" && strings.HasPrefix(s, "fib") }},
	{"conntrack events built (ctnetlink_*, nla_*)", func(c, s string) bool {
		return c != "vmegress" && (strings.HasPrefix(s, "ctnetlink_") || strings.Contains(s, "nla_"))
	}},
}

// cidrBench runs -cidr: o.runs rounds of the cidr figures on direct and
// builtin, printed and put in place of the "kernel" section of -out (a
// full run keeps that section as it is).
func cidrBench(o options, bin string) error {
	results := map[string][]result{}
	var profiles []cidrProfile
	for r := 1; r <= o.runs; r++ {
		for _, p := range cidrPaths {
			fmt.Fprintf(os.Stderr, "run %d/%d: %s (cidr only)\n", r, o.runs, p)
			// Profiles are taken in the first run only: perf's own cost
			// must not weigh on the figures of every run.
			prof, ro := "", o
			if r == 1 {
				prof = o.profile
			} else {
				ro.daemonProfile = ""
			}
			res, ps, err := measureCIDR(ro, bin, p, prof)
			if err != nil {
				return fmt.Errorf("run %d, %s: %w", r, p, err)
			}
			results[p] = append(results[p], res)
			profiles = append(profiles, ps...)
			fmt.Fprintf(os.Stderr, "  %v\n", res)
		}
	}
	return emitSection(o.out, "kernel", renderCIDR(o, results, profiles))
}

// measureCIDR builds a world for one path and takes the cidr figures; with
// profileDir, each figure is taken a second time under perf record.
func measureCIDR(o options, bin, path, profileDir string) (result, []cidrProfile, error) {
	ctx := context.Background()
	w, err := world.New(ctx, world.Options{Prefix: "vmbench", Guests: []world.GuestSpec{{Project: "alpha", Subnet: netip.MustParsePrefix("172.31.0.0/30")}}})
	if err != nil {
		return nil, nil, err
	}
	defer w.Close()
	g := w.Guest("alpha")
	if err := world.Run(ctx, world.NS(w.Inet, "ip", "addr", "add", sinkIP.String()+"/32", "dev", "lo")...); err != nil {
		return nil, nil, err
	}
	sink, err := startSink(w)
	if err != nil {
		return nil, nil, err
	}
	defer sink.close()
	daemonPID := -1
	var daemon *world.Daemon
	switch path {
	case "direct":
		rules := "table ip benchnat {\n chain post {\n  type nat hook postrouting priority srcnat;\n  ip saddr 172.31.0.0/16 oifname \"up0\" masquerade\n }\n}\n"
		f := filepath.Join(w.Dir, "nat.nft")
		if err := os.WriteFile(f, []byte(rules), 0o644); err != nil {
			return nil, nil, err
		}
		if err := world.Run(ctx, world.NS(w.Host, "nft", "-f", f)...); err != nil {
			return nil, nil, err
		}
	default:
		cfg, err := w.WriteConfig("config.yaml", fmt.Sprintf(benchConfig, path))
		if err != nil {
			return nil, nil, err
		}
		// VMEGRESS_PPROF serves /debug/pprof on the admin address (-daemon-profile).
		d, err := w.StartDaemon(ctx, bin, cfg, "VMEGRESS_PPROF=1")
		if err != nil {
			return nil, nil, err
		}
		defer d.Kill()
		daemon = d
		daemonPID = d.Cmd.Process.Pid // ip netns exec execs the daemon: same process
	}
	dl, err := startDownloads(w) // its third listener answers connPort
	if err != nil {
		return nil, nil, err
	}
	defer dl.close()
	take := map[string]func() (float64, error){
		"tput1": func() (float64, error) { return throughput(g.NS, sink, 1, o.duration) },
		"tput8": func() (float64, error) { return throughput(g.NS, sink, 8, o.duration) },
		"ccps":  func() (float64, error) { return tcpConnections(g.NS, 8, o.duration) },
	}
	res := result{}
	var profiles []cidrProfile
	for _, key := range cidrMetrics {
		var pprofDone chan error
		if key == "ccps" && daemon != nil && o.daemonProfile != "" {
			pprofDone = daemonPprof(w, o.daemonProfile, o.duration)
		}
		cpu0 := procCPU(daemonPID)
		v, err := take[key]()
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", key, err)
		}
		res[key] = v
		if key == "ccps" && daemon != nil && v > 0 {
			// The daemon's CPU per new flow, in µs: what it spends on
			// each flow's events, delete, access-log line and counters.
			res["dcpu"] = float64((procCPU(daemonPID) - cpu0).Microseconds()) / (v * o.duration.Seconds())
		}
		if pprofDone != nil {
			if err := <-pprofDone; err != nil {
				return nil, nil, err
			}
		}
		if profileDir == "" {
			continue
		}
		p, err := perfCapture(profileDir, path, key, daemonPID, o.duration, take[key])
		if err != nil {
			return nil, nil, fmt.Errorf("profiling %s: %w", key, err)
		}
		profiles = append(profiles, p)
	}
	if daemon != nil {
		// Every kernel-forwarded flow must have its access-log line: the
		// figures are worth nothing if logging fell behind or stopped.
		time.Sleep(time.Second) // the last flows' lines
		res["klog"] = float64(strings.Count(daemon.RawAccessLog(), `"path":"kernel"`))
	}
	return res, profiles, nil
}

// daemonPprof fetches a Go CPU profile of the daemon over d from its
// admin endpoint into dir/daemon-ccps.pprof, in the background; the
// channel tells when it is written.
func daemonPprof(w *world.World, dir string, d time.Duration) chan error {
	done := make(chan error, 1)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		done <- fmt.Errorf("creating the daemon profile directory: %w", err)
		return done
	}
	secs := max(int(d.Round(time.Second)/time.Second), 1)
	file := filepath.Join(dir, "daemon-ccps.pprof")
	go func() {
		err := world.Run(context.Background(), world.NS(w.Host, "curl", "-sS", "--fail", "--max-time", strconv.Itoa(secs+30),
			"-o", file, fmt.Sprintf("http://127.0.0.1:9901/debug/pprof/profile?seconds=%d", secs))...)
		if err != nil {
			err = fmt.Errorf("fetching the daemon's CPU profile: %w", err)
		}
		done <- err
	}()
	time.Sleep(100 * time.Millisecond) // the profile has started
	return done
}

// perfCapture runs f under a system-wide `perf record -g` as long as f's
// measurement, measures the daemon's CPU time over it, and returns perf
// report's top symbols (self time, every CPU).
func perfCapture(dir, path, key string, daemonPID int, d time.Duration, f func() (float64, error)) (cidrProfile, error) {
	p := cidrProfile{path: path, key: key, daemonCPU: -1}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return p, fmt.Errorf("creating the profile directory: %w", err)
	}
	data := filepath.Join(dir, fmt.Sprintf("perf-%s-%s.data", path, key))
	rec := exec.Command("perf", "record", "-a", "-g", "-q", "-o", data)
	rec.Env = append(os.Environ(), "LC_ALL=C")
	if err := rec.Start(); err != nil {
		return p, fmt.Errorf("starting perf record: %w", err)
	}
	time.Sleep(200 * time.Millisecond) // perf has opened its events
	cpu0, t0 := procCPU(daemonPID), time.Now()
	_, ferr := f()
	cpu1, wall := procCPU(daemonPID), time.Since(t0)
	// SIGINT is how perf record is told to stop and write its file.
	if err := rec.Process.Signal(syscall.SIGINT); err != nil {
		return p, fmt.Errorf("stopping perf record: %w", err)
	}
	// perf writes its file and re-raises the SIGINT: killed by it is success.
	if err := rec.Wait(); err != nil && ferr == nil {
		if ee, ok := err.(*exec.ExitError); !ok || ee.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGINT {
			return p, fmt.Errorf("perf record: %w", err)
		}
	}
	if ferr != nil {
		return p, ferr
	}
	if daemonPID > 0 {
		p.daemonCPU = (cpu1 - cpu0).Seconds() / wall.Seconds()
	}
	// Only the processes of the measurement (the bench's clients and
	// servers, the daemon, softirq threads, idle): the machine is shared.
	comms := []string{filepath.Base(os.Args[0]), "vmegress", "ksoftirqd/0", "ksoftirqd/1", "swapper"}
	cmd := exec.Command("perf", "report", "-i", data, "--no-children", "--sort", "sym", "--stdio", "-g", "none",
		"--percent-limit", "0.5", "--comms", strings.Join(comms, ","))
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.Output()
	if err != nil {
		return p, fmt.Errorf("perf report of %s: %w", data, err)
	}
	var keep []string
	for _, l := range strings.Split(string(out), "\n") {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		keep = append(keep, strings.TrimRight(l, " "))
		if len(keep) == perfTopN {
			break
		}
	}
	p.top = strings.Join(keep, "\n")
	cmd = exec.Command("perf", "report", "-i", data, "--no-children", "--sort", "comm,sym", "--stdio", "-g", "none", "-n",
		"--comms", strings.Join(comms, ","))
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if out, err = cmd.Output(); err != nil {
		return p, fmt.Errorf("perf report of %s: %w", data, err)
	}
	p.shares = costShares(string(out))
	return p, nil
}

// costShares sums a `perf report --sort comm,sym -n` listing into costs.
func costShares(listing string) string {
	total, sums := 0.0, make([]float64, len(costs))
	for _, l := range strings.Split(listing, "\n") {
		f := strings.Fields(l)
		// "12.34%  567  comm  [k]  symbol"
		if len(f) < 5 || strings.HasPrefix(f[0], "#") || !strings.HasSuffix(f[0], "%") {
			continue
		}
		n, err := strconv.ParseFloat(f[1], 64)
		if err != nil {
			continue
		}
		total += n
		for i, c := range costs {
			if c.in(f[2], f[4]) {
				sums[i] += n
			}
		}
	}
	if total == 0 {
		return ""
	}
	var parts []string
	for i, c := range costs {
		parts = append(parts, fmt.Sprintf("%s %.1f%%", c.name, 100*sums[i]/total))
	}
	return strings.Join(parts, "; ")
}

// procCPU is the user+system CPU time process pid has used (0 when pid is
// not positive or unreadable).
func procCPU(pid int) time.Duration {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name (which may hold spaces) start after
	// the last ')'; utime and stime are fields 14 and 15, in clock ticks.
	s := string(b)
	fs := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fs) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(fs[11], 10, 64)
	st, _ := strconv.ParseInt(fs[12], 10, 64)
	const ticksPerSecond = 100 // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / ticksPerSecond
}

// renderCIDR prints the cidr figures, their ratios against direct with the
// targets of issue 14, and the profiles.
func renderCIDR(o options, res map[string][]result, profiles []cidrProfile) string {
	var b strings.Builder
	cmd := fmt.Sprintf("go run ./bench -cidr -runs %d -duration %s", o.runs, o.duration)
	if o.profile != "" {
		cmd += " -profile DIR"
	}
	fmt.Fprintf(&b, "## The kernel path (cidr rule) against direct forwarding, with profiles\n\n`%s` (as root) on %s, %s.\n\n",
		cmd, machine(), time.Now().UTC().Format("2006-01-02"))
	b.WriteString("| metric | direct | vmegress | vmegress / direct (spread) | target |\n|---|---|---|---|---|\n")
	for _, key := range cidrMetrics {
		name := key
		for _, m := range metrics {
			if m.key == key {
				name = m.name + " (" + m.unit + ")"
			}
		}
		var d, v, rs []float64
		for i := range res["builtin"] {
			if i < len(res["direct"]) && res["direct"][i][key] > 0 {
				rs = append(rs, res["builtin"][i][key]/res["direct"][i][key])
			}
		}
		for _, r := range res["direct"] {
			d = append(d, r[key])
		}
		for _, r := range res["builtin"] {
			v = append(v, r[key])
		}
		verdict := "—"
		if len(rs) > 0 {
			verdict = "≥ 0.95×: met"
			if median(rs) < 0.95 {
				verdict = "≥ 0.95×: **missed**"
			}
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s× (%s) | %s |\n", name, num(median(d)), num(median(v)), num(median(rs)), spread(rs), verdict)
	}
	var logged, dcpu []string
	for _, r := range res["builtin"] {
		logged = append(logged, fmt.Sprintf("%.0f", r["klog"]))
		dcpu = append(dcpu, fmt.Sprintf("%.0f", r["dcpu"]))
	}
	fmt.Fprintf(&b, "\nKernel-forwarded flows with an access-log line, per run: %s.\n", strings.Join(logged, ", "))
	fmt.Fprintf(&b, "The daemon's CPU per new flow (new connections), per run: %s µs.\n", strings.Join(dcpu, ", "))
	b.WriteString(cidrLimits)
	for _, p := range profiles {
		cpu := ""
		if p.daemonCPU >= 0 {
			cpu = fmt.Sprintf("; the daemon used %.0f%% of a core", 100*p.daemonCPU)
		}
		fmt.Fprintf(&b, "\n%s, %s (perf record -a -g, self time by symbol, top %d%s):\n\n```\n%s\n```\n", p.path, p.key, perfTopN, cpu, p.top)
		if p.shares != "" {
			fmt.Fprintf(&b, "Share of the measurement's samples: %s.\n", p.shares)
		}
	}
	return b.String()
}

// cidrLimits is what limits the cidr figures, from the profiles below and
// the attribution runs behind them (issue 14).
const cidrLimits = `
What limits it. Direct forwarding has no ruleset beyond one masquerade
rule, no policy routing rules, no conntrack accounting and no conntrack
event listener. The kernel path pays, per packet, its ruleset (an open
flow's packets leave the guest chain after the interface set, the range
check and one reverse-path fib lookup) and route lookups through the
routing lock's rules (fib_rules_lookup, absent on direct). Per flow it
pays conntrack's accounting and timestamps, the connection cap's count,
the conntrack events of the flow's TCP state changes and its end (the
ruleset masks every other event, and all of a proxied flow's), a delete
of the entry at TIME_WAIT and the access-log line: the daemon's CPU per
flow is printed above each report (it was about 146 µs before events were
decoded by hand and read, deleted and logged in batches; 35-45 µs since).
New connections pay these on the same two cores as the client and the
server, and the throughput figures swing by a quarter between runs of the
same code on this shared machine (the spreads): the shares below say how
much each cost took. The kernel's software flow offload (nftables
flowtables), which would take open flows past the ruleset and conntrack,
is not built into this machine's kernel (CONFIG_NF_FLOW_TABLE unset).
`
