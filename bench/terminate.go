package main

// Requests through a terminating https rule (issue 15's "Speed"): requests
// per second and p99 on kept-alive connections and on a new TLS connection
// per request, builtin vs Envoy terminating the same rule vs direct, and
// the data plane's memory per open terminated connection.

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmegress/vmegress/internal/tlsca"
	"github.com/vmegress/vmegress/internal/world"
)

// The terminated origin: an HTTPS server on example.com's address in the
// fake internet, on a port of its own that an https rule terminates.
var (
	termPort = 8445
	termName = "example.com"
	termPath = "/v1/models"
)

// termClients is the number of clients making requests at once.
const termClients = 8

// termConnsMax caps the open terminated connections of the memory figure
// (each holds a TLS session on both sides of the data plane).
const termConnsMax = 1000

func init() {
	metrics = append(metrics, []struct {
		key, name, unit string
		higherBetter    bool
	}{
		{"treq", "requests/s through an https rule (TLS terminated), keep-alive, 8 clients", "req/s", true},
		{"treqp99", "request latency through an https rule, keep-alive, p99", "ms", false},
		{"tnew", "requests/s through an https rule, a new TLS connection per request, 8 clients", "req/s", true},
		{"tnewp99", "request latency through an https rule, new connection (connect to body), p99", "ms", false},
		{"termmem", "data plane memory per open terminated connection (https rule)", "KiB", false},
		{"tcpu", "data plane CPU time per request through an https rule, keep-alive", "µs", false},
		{"tnewcpu", "data plane CPU time per request through an https rule, new connection", "µs", false},
	}...)
}

// termOrigin is the HTTPS origin behind the https rule, with a certificate
// of its own CA (the daemon's upstream_ca_file).
type termOrigin struct {
	srv    *http.Server
	caFile string
	pool   *x509.CertPool // the origin's CA: what a direct client trusts
}

func startTermOrigin(w *world.World) (*termOrigin, error) {
	ca, err := tlsca.Load(filepath.Join(w.Dir, "term-origin-ca"), tlsca.Options{})
	if err != nil {
		return nil, fmt.Errorf("creating the terminated origin's CA: %w", err)
	}
	leaf, err := ca.Leaf(termName)
	if err != nil {
		return nil, fmt.Errorf("issuing the terminated origin's certificate: %w", err)
	}
	t := &termOrigin{caFile: filepath.Join(w.Dir, "term-origin-ca.pem"), pool: x509.NewCertPool()}
	if err := os.WriteFile(t.caFile, ca.CertPEM(), 0o644); err != nil {
		return nil, err
	}
	t.pool.AddCert(ca.Certificate())
	ln, err := world.ListenIn(w.Inet, "tcp4", net.JoinHostPort(world.ExampleIP.String(), strconv.Itoa(termPort)))
	if err != nil {
		return nil, err
	}
	body := []byte(`{"data":[{"id":"model-1"}]}` + "\n") // an API's small answer
	t.srv = &http.Server{
		Handler: http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
			rw.Header().Set("Content-Type", "application/json")
			rw.Write(body)
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{*leaf}, NextProtos: []string{"h2", "http/1.1"}},
		ErrorLog:  log.New(io.Discard, "", 0),
	}
	go t.srv.ServeTLS(ln, "", "")
	return t, nil
}

func (t *termOrigin) close() { t.srv.Close() }

// config adds the https rule for the origin and its CA to a bench config
// (whose last lines are alpha's allow rules).
func (t *termOrigin) config(cfg string) string {
	return "upstream_ca_file: " + t.caFile + "\n" + cfg +
		fmt.Sprintf("      - https: %s\n        ports: [%d]\n        methods: [GET]\n        paths: [\"/v1/*\"]\n", termName, termPort)
}

// measureTermination takes the termination figures of one path into res.
// The guest trusts the vmegress CA (read from the state directory, what
// `vmegress ca cert` prints) on a data plane, the origin's CA on direct.
func measureTermination(o options, w *world.World, ns, path string, t *termOrigin, planePID func() int, res result) error {
	roots := t.pool
	if path != "direct" {
		pem, err := os.ReadFile(filepath.Join(w.StateDir(), tlsca.CertFile))
		if err != nil {
			return fmt.Errorf("reading the vmegress CA: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return fmt.Errorf("no certificate in the vmegress CA file")
		}
	}
	for _, m := range []struct {
		keepAlive          bool
		rps, p99, cpu, how string
	}{
		{true, "treq", "treqp99", "tcpu", "keep-alive requests"},
		{false, "tnew", "tnewp99", "tnewcpu", "requests on new connections"},
	} {
		// The data plane's CPU time per request: what it costs, whatever
		// else the shared machine is doing meanwhile.
		var cpu0 float64
		if planePID != nil {
			cpu0, _ = cpuSeconds(planePID())
		}
		rps, p99, err := termRequests(ns, roots, termClients, o.duration, m.keepAlive)
		if err != nil {
			return fmt.Errorf("%s: %w", m.how, err)
		}
		res[m.rps], res[m.p99] = rps, p99
		if planePID != nil {
			if cpu1, err := cpuSeconds(planePID()); err == nil && rps > 0 {
				res[m.cpu] = (cpu1 - cpu0) / (rps * o.duration.Seconds()) * 1e6
			}
		}
	}
	var err error
	if planePID != nil {
		if res["termmem"], err = termMemory(ns, roots, planePID(), min(o.idle, termConnsMax)); err != nil {
			return fmt.Errorf("memory per terminated connection: %w", err)
		}
	}
	return nil
}

// cpuSeconds is the user and system CPU time process pid has used
// (/proc/PID/stat, in clock ticks of 1/100 s: USER_HZ on Linux).
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces: count from its ")".
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("reading /proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:])) // f[0] is field 3 (state)
	if len(f) < 13 {
		return 0, fmt.Errorf("reading /proc/%d/stat: %d fields", pid, len(f))
	}
	utime, err1 := strconv.ParseFloat(f[11], 64) // field 14
	stime, err2 := strconv.ParseFloat(f[12], 64) // field 15
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("reading /proc/%d/stat: utime %q, stime %q", pid, f[11], f[12])
	}
	const userHZ = 100 // clock ticks per second of /proc's times
	return (utime + stime) / userHZ, nil
}

// termClient is one guest client of the terminated origin speaking
// HTTP/1.1, on one kept-alive connection or a new one per request.
func termClient(ns string, roots *x509.CertPool, keepAlive bool) *http.Client {
	addr := net.JoinHostPort(world.ExampleIP.String(), strconv.Itoa(termPort))
	return &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			DialContext:         func(context.Context, string, string) (net.Conn, error) { return dialIn(ns, addr) },
			TLSClientConfig:     &tls.Config{ServerName: termName, RootCAs: roots},
			TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{}, // HTTP/1.1
			DisableKeepAlives:   !keepAlive,
			MaxIdleConnsPerHost: 1,
		},
	}
}

// termRequests runs clients making GET requests through the https rule for
// d and returns requests per second and the p99 latency in ms (request to
// whole body; with a new connection per request, connect to whole body).
func termRequests(ns string, roots *x509.CertPool, clients int, d time.Duration, keepAlive bool) (rps, p99 float64, err error) {
	url := fmt.Sprintf("https://%s:%d%s", termName, termPort, termPath)
	var mu sync.Mutex
	var lat []time.Duration
	var failures atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	end := time.Now().Add(d)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := termClient(ns, roots, keepAlive)
			defer c.CloseIdleConnections()
			var mine []time.Duration
			for time.Now().Before(end) {
				t0 := time.Now()
				resp, err := c.Get(url)
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("status %s", resp.Status)
					}
				}
				if err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if len(lat) == 0 {
		return 0, 0, fmt.Errorf("no request succeeded (%d failures, first: %v)", failures.Load(), firstErr.Load())
	}
	slices.Sort(lat)
	q := float64(lat[int(0.99*float64(len(lat)-1))].Microseconds()) / 1000
	return float64(len(lat)) / d.Seconds(), q, nil
}

// termMemory opens n terminated connections, each after one request
// answered, held open, and returns the data plane's resident memory growth
// per connection.
func termMemory(ns string, roots *x509.CertPool, pid, n int) (float64, error) {
	return termMemoryHeld(ns, roots, pid, n, nil)
}

// termMemoryHeld is termMemory calling held (when not nil) while the
// connections are open; with pid 0 it measures no memory.
func termMemoryHeld(ns string, roots *x509.CertPool, pid, n int, held func() error) (float64, error) {
	time.Sleep(parkAfter) // the earlier measurements' connections are gone
	rss := func() (int, error) {
		if pid == 0 {
			return 0, nil
		}
		return rssKiB(pid)
	}
	before, err := rss()
	if err != nil {
		return 0, err
	}
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	req := "GET " + termPath + " HTTP/1.1\r\nHost: " + termName + ":" + strconv.Itoa(termPort) + "\r\n\r\n"
	addr := net.JoinHostPort(world.ExampleIP.String(), strconv.Itoa(termPort))
	for i := 0; i < n; i++ {
		raw, err := dialIn(ns, addr)
		if err != nil {
			return 0, fmt.Errorf("connection %d: %w", i, err)
		}
		c := tls.Client(raw, &tls.Config{ServerName: termName, RootCAs: roots, NextProtos: []string{"http/1.1"}})
		conns = append(conns, c)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, req); err != nil {
			return 0, fmt.Errorf("connection %d: sending a request: %w", i, err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return 0, fmt.Errorf("connection %d: reading the answer: %w", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return 0, fmt.Errorf("connection %d: %s", i, resp.Status)
		}
		c.SetDeadline(time.Time{})
	}
	time.Sleep(parkAfter)
	after, err := rss()
	if err != nil {
		return 0, err
	}
	if held != nil {
		if err := held(); err != nil {
			return 0, err
		}
	}
	return float64(after-before) / float64(n), nil
}

// termLimits says what limits the termination figures where builtin
// misses Envoy.
const termLimits = `
What limits the termination figures. Both planes do the same work per request: a TLS
session with the guest under a certificate of the vmegress CA, an HTTP/1.1 request
parsed and decided by method and path, and the request sent on over a pooled,
verified TLS connection to the origin (HTTP/2 by ALPN on both planes), on the same two
cores as the clients, the origin and the other work of this shared machine, so rates
and p99 move from run to run by more than the planes differ (the CPU rows are steadier).
**Keep-alive** (builtin CPU profile): about a third is socket reads and writes (one
each way per request on each side, as Envoy), then Go's net/http server and reverse
proxy (request and header copies, HTTP/2 framing, and two goroutines per request that
net/http starts itself: the server's background read and the HTTP/2 client's request
writer), the access-log line and event per request (JSON encoding), and garbage
collection, which on two cores takes one of them while it marks. A higher GOGC for the
plane (BENCH_PLANE_GOGC=200) was measured: p99 and CPU per request unchanged within the
noise, memory per open connection up by a third, so the plane keeps Go's default.
**New connections**: the TLS handshake with the guest (X25519, an ECDSA P-256
signature; the certificate comes from the per-name cache) is about 40% of the builtin
plane's CPU; then the ClientHello parsed once more by the SNI peek and two log lines
(connection and request). (The netlink route lookup that checks the vetted address is
not the host's own, about 8% when measured, is now answered from a cache kept while
the host's addresses and routes stay the same: HostAddrCache.)
**Memory per open connection**: net/http's buffered reader and writer (4 KiB each)
and crypto/tls's record state and AES-GCM keys are most of the heap; the rest is the
goroutine serving the connection (one per connection: the handshake's goroutine ends
when the connection is handed to the shared server) and the heap's slack.
`

// renderTermination is the report's table for issue 15's speed targets:
// builtin ≥ Envoy on requests per second and ≤ Envoy on p99, keep-alive and
// new connections; memory per connection reported.
func renderTermination(res map[string][]result) string {
	ratio := func(a, bb, key string) (float64, bool) {
		var rs []float64
		for i := range res[a] {
			if i < len(res[bb]) && res[bb][i][key] > 0 && res[a][i][key] > 0 {
				rs = append(rs, res[a][i][key]/res[bb][i][key])
			}
		}
		if len(rs) == 0 {
			return 0, false
		}
		return median(rs), true
	}
	fig := func(p, key string) string {
		var xs []float64
		for _, r := range res[p] {
			if v, ok := r[key]; ok {
				xs = append(xs, v)
			}
		}
		if len(xs) == 0 {
			return "—"
		}
		return num(median(xs))
	}
	var b strings.Builder
	b.WriteString("\n## Targets of issue 15 (TLS termination), as measured above\n\n")
	fmt.Fprintf(&b, "An `https: %s` rule on port %d (methods GET, paths /v1/*) in front of Go's HTTPS server in the fake internet (its CA given as `upstream_ca_file`); %d clients speaking HTTP/1.1 `GET %s` (a 28-byte JSON answer), trusting the vmegress CA (direct: the origin's CA); on kept-alive connections, then on a new TLS connection per request; memory: the data plane's RSS growth holding open connections that each had one request answered; CPU per request: the data plane process's user and system time during a measurement over the requests answered (what a request costs the plane, less sensitive than rates to the other work on this shared machine).\n\n",
		termName, termPort, termClients, termPath)
	b.WriteString("| figure | builtin | envoy | direct | target | builtin / envoy | verdict |\n|---|---|---|---|---|---|---|\n")
	missed := false
	for _, t := range []struct {
		what, key, unit string
		higher          bool
	}{
		{"requests/s, keep-alive", "treq", "req/s", true},
		{"p99, keep-alive", "treqp99", "ms", false},
		{"requests/s, new connection per request", "tnew", "req/s", true},
		{"p99, new connection per request", "tnewp99", "ms", false},
	} {
		target, verdict, rs := "≥ 1×", "—", "—"
		if !t.higher {
			target = "≤ 1×"
		}
		if r, ok := ratio("builtin", "envoy", t.key); ok {
			rs = num(r) + "×"
			verdict = "met"
			if (t.higher && r < 1) || (!t.higher && r > 1) {
				verdict, missed = "**missed**", true
			}
		}
		fmt.Fprintf(&b, "| %s (%s) | %s | %s | %s | %s | %s | %s |\n", t.what, t.unit,
			fig("builtin", t.key), fig("envoy", t.key), fig("direct", t.key), target, rs, verdict)
	}
	rs := "—"
	if r, ok := ratio("builtin", "envoy", "termmem"); ok {
		rs = num(r) + "×"
	}
	fmt.Fprintf(&b, "| memory per open terminated connection (KiB) | %s | %s | — | reported | %s | — |\n",
		fig("builtin", "termmem"), fig("envoy", "termmem"), rs)
	for _, c := range []struct{ what, key string }{
		{"data plane CPU per request, keep-alive (µs)", "tcpu"},
		{"data plane CPU per request, new connection (µs)", "tnewcpu"},
	} {
		rs := "—"
		if r, ok := ratio("builtin", "envoy", c.key); ok {
			rs = num(r) + "×"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | — | reported | %s | — |\n", c.what, fig("builtin", c.key), fig("envoy", c.key), rs)
	}
	if missed {
		b.WriteString(termLimits)
	}
	return b.String()
}

// termOnly measures only the termination figures of the three paths, o.runs
// times each (ratios within a run, as in the full report), and prints their
// table; with -term-profile it also profiles the builtin plane under each
// load. It writes nothing but the profiles.
func termOnly(o options, bin string) error {
	results := map[string][]result{}
	var profiles strings.Builder
	for r := 1; r <= o.runs; r++ {
		// The machine is shared: the two planes take turns going first,
		// so that load coming or going during a run favours neither.
		order := paths
		if r%2 == 0 {
			order = []string{"direct", "envoy", "builtin"}
		}
		for _, p := range order {
			fmt.Fprintf(os.Stderr, "run %d/%d: %s (termination only)\n", r, o.runs, p)
			prof := ""
			if p == "builtin" && r == 1 {
				prof = o.termProfile
			}
			res, err := measureTermPath(o, bin, p, prof, &profiles)
			if err != nil {
				return fmt.Errorf("run %d, %s: %w", r, p, err)
			}
			results[p] = append(results[p], res)
			fmt.Fprintf(os.Stderr, "  %v\n", res)
		}
	}
	fmt.Printf("Produced by `go run ./bench -term -runs %d -duration %s -idle %d`.\n", o.runs, o.duration, o.idle)
	fmt.Print(renderTermination(results))
	fmt.Print(profiles.String())
	return nil
}

// measureTermPath builds a world for one path with only the terminated
// origin and takes the termination figures. With profDir (builtin only),
// CPU profiles of the data plane under the keep-alive and the
// new-connection loads, and a heap profile holding open connections, are
// written there and their top entries appended to profiles.
func measureTermPath(o options, bin, path, profDir string, profiles *strings.Builder) (result, error) {
	ctx := context.Background()
	w, err := world.New(ctx, world.Options{Prefix: "vmbench", Guests: []world.GuestSpec{{Project: "alpha", Subnet: netip.MustParsePrefix("172.31.0.0/30")}}})
	if err != nil {
		return nil, err
	}
	defer w.Close()
	g := w.Guest("alpha")
	term, err := startTermOrigin(w)
	if err != nil {
		return nil, err
	}
	defer term.close()
	var planePID func() int
	if path == "direct" {
		// The spec's direct egress: forwarding and MASQUERADE, no vmegress.
		rules := "table ip benchnat {\n chain post {\n  type nat hook postrouting priority srcnat;\n  ip saddr 172.31.0.0/16 oifname \"up0\" masquerade\n }\n}\n"
		f := filepath.Join(w.Dir, "nat.nft")
		if err := os.WriteFile(f, []byte(rules), 0o644); err != nil {
			return nil, err
		}
		if err := world.Run(ctx, world.NS(w.Host, "nft", "-f", f)...); err != nil {
			return nil, err
		}
	} else {
		cfg, err := w.WriteConfig("config.yaml", term.config(fmt.Sprintf(benchConfig, path)))
		if err != nil {
			return nil, err
		}
		env := []string{"VMEGRESS_PPROF=1"}
		if v := os.Getenv("BENCH_PLANE_GOGC"); v != "" {
			// A GC setting for the builtin plane alone (not the bench's
			// clients): what a GOGC knob would buy, measured side by side.
			env = append(env, "GOGC="+v)
		}
		d, err := w.StartDaemon(ctx, bin, cfg, env...)
		if err != nil {
			return nil, err
		}
		defer d.Kill()
		planePID = func() int { return d.Cmd.Process.Pid }
		if path == "envoy" {
			planePID = func() int {
				out, _ := exec.Command("pgrep", "-f", "-n", w.StateDir()+"/envoy-bootstrap.json").Output()
				pid, _ := strconv.Atoi(strings.TrimSpace(string(out)))
				return pid
			}
		}
	}
	res := result{}
	if err := measureTermination(o, w, g.NS, path, term, planePID, res); err != nil {
		return nil, err
	}
	if profDir != "" && path == "builtin" {
		if err := profileTermination(o, w, bin, g.NS, term, profDir, profiles); err != nil {
			return nil, fmt.Errorf("profiling: %w", err)
		}
	}
	return res, nil
}

// profileTermination takes CPU profiles of the builtin plane (its pprof on
// the admin address) under each request load, and a heap profile while
// connections are held open.
func profileTermination(o options, w *world.World, bin, ns string, t *termOrigin, dir string, profiles *strings.Builder) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	pem, err := os.ReadFile(filepath.Join(w.StateDir(), tlsca.CertFile))
	if err != nil {
		return fmt.Errorf("reading the vmegress CA: %w", err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	fetch := func(url, file string, timeout int) error {
		return world.Run(context.Background(), world.NS(w.Host, "curl", "-sS", "--fail", "--max-time", strconv.Itoa(timeout),
			"-o", file, "http://127.0.0.1:9901"+url)...)
	}
	top := func(title, file string, extra ...string) error {
		args := append([]string{"tool", "pprof", "-top", "-nodecount=25"}, extra...)
		out, err := exec.Command("go", append(args, bin, file)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("go tool pprof: %v\n%s", err, out)
		}
		fmt.Fprintf(profiles, "\n### %s (%s)\n\n```\n%s```\n", title, file, out)
		return nil
	}
	secs := max(int(o.duration.Round(time.Second)/time.Second), 1)
	for _, keepAlive := range []bool{true, false} {
		name := "keepalive"
		if !keepAlive {
			name = "newconn"
		}
		file := filepath.Join(dir, "cpu-"+name+".pprof")
		done := make(chan error, 1)
		go func() {
			done <- fetch(fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs), file, secs+30)
		}()
		time.Sleep(100 * time.Millisecond) // the profile has started
		if _, _, err := termRequests(ns, roots, termClients, time.Duration(secs)*time.Second, keepAlive); err != nil {
			return err
		}
		if err := <-done; err != nil {
			return fmt.Errorf("fetching the CPU profile: %w", err)
		}
		if err := top("builtin plane CPU, "+name, file); err != nil {
			return err
		}
	}
	file := filepath.Join(dir, "heap-held.pprof")
	held := func() error { return fetch("/debug/pprof/heap?gc=1", file, 30) }
	if _, err := termMemoryHeld(ns, roots, 0, min(o.idle, termConnsMax), held); err != nil {
		return err
	}
	return top("builtin plane heap in use, connections held open", file, "-sample_index=inuse_space")
}
