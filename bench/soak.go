package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// soakConfig: one guest allowed github.com over TLS and example.com over
// plain HTTP; everything else is denied. The access log is discarded (a
// million lines would only measure the disk).
const soakConfig = `dataplane: builtin
admin: 127.0.0.1:9901
access_log: /dev/null
projects:
  alpha:
    subnet: 172.31.0.0/30
    max_connections: 100000
    allow:
      - sni: github.com
      - http: example.com
`

// soakSample is the daemon's footprint after a number of connections, taken
// with no connection in flight.
type soakSample struct {
	conns      int
	fds        int
	threads    int
	goroutines int
	rssKiB     int
	heapInuse  int64 // bytes
}

type soakResult struct {
	conns, clients int
	wrong          int64 // connections whose verdict was not the expected one
	elapsed        time.Duration
	samples        []soakSample
}

// soakKinds are the four kinds of connection, in turn: TLS allowed, TLS
// denied (SNI not allowed), HTTP allowed, HTTP denied (Host not allowed).
var soakKinds = []string{"tls allowed", "tls denied", "http allowed", "http denied"}

// measureSoak runs conns connections from the guest through the builtin
// plane with clients in parallel, sampling the daemon every sampleEvery.
func measureSoak(bin string, conns, clients, sampleEvery int) (*soakResult, error) {
	ctx := context.Background()
	w, err := world.New(ctx, world.Options{Prefix: "vmbsoak", Guests: []world.GuestSpec{{Project: "alpha", Subnet: netip.MustParsePrefix("172.31.0.0/30")}}})
	if err != nil {
		return nil, err
	}
	defer w.Close()
	g := w.Guest("alpha")
	// Short connections by the hundred thousand: reuse ports in TIME_WAIT
	// and widen the ephemeral range, in the world's namespaces only.
	for _, ns := range []string{g.NS, w.Host, w.Inet} {
		if err := world.Run(ctx, world.NS(ns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000")...); err != nil {
			return nil, err
		}
	}
	cfg, err := w.WriteConfig("config.yaml", soakConfig)
	if err != nil {
		return nil, err
	}
	d, err := w.StartDaemon(ctx, bin, cfg, "VMEGRESS_PPROF=1")
	if err != nil {
		return nil, err
	}
	defer d.Kill()
	pid := d.Cmd.Process.Pid
	// d.Cmd is `ip netns exec`, which execs vmegress: the same pid.
	pem, err := os.ReadFile(w.CAFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	one := func(kind int) bool {
		switch kind {
		case 0, 1:
			name, ip := "github.com", world.GitHubIP
			if kind == 1 {
				name, ip = "example.com", world.ExampleIP
			}
			raw, err := dialIn(g.NS, ip.String()+":443")
			if err != nil {
				return false
			}
			defer raw.Close()
			tc := tls.Client(raw, &tls.Config{ServerName: name, RootCAs: pool})
			tc.SetDeadline(time.Now().Add(10 * time.Second))
			return (tc.Handshake() == nil) == (kind == 0)
		default:
			host, ip := "example.com", world.ExampleIP
			if kind == 3 {
				host, ip = "github.com", world.GitHubIP
			}
			raw, err := dialIn(g.NS, ip.String()+":80")
			if err != nil {
				return false
			}
			defer raw.Close()
			raw.SetDeadline(time.Now().Add(10 * time.Second))
			fmt.Fprintf(raw, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", host)
			resp, err := http.ReadResponse(bufio.NewReader(raw), nil)
			if err != nil {
				return kind == 3 // a denial may be a reset
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return (resp.StatusCode == http.StatusOK) == (kind == 2)
		}
	}
	admin := func(path string) (string, error) {
		// curl in the host namespace: a Go HTTP client dials on goroutines
		// that may run outside it.
		return world.Output(ctx, world.NS(w.Host, "curl", "-sS", "--fail", "--max-time", "10", "http://127.0.0.1:9901"+path)...)
	}
	sample := func(done int) (soakSample, error) {
		time.Sleep(500 * time.Millisecond) // the last connections' closes reach the daemon
		s := soakSample{conns: done}
		ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			return s, err
		}
		s.fds = len(ents)
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			return s, err
		}
		for _, l := range strings.Split(string(st), "\n") {
			f := strings.Fields(l)
			if len(f) >= 2 && f[0] == "VmRSS:" {
				s.rssKiB, _ = strconv.Atoi(f[1])
			}
			if len(f) >= 2 && f[0] == "Threads:" {
				s.threads, _ = strconv.Atoi(f[1])
			}
		}
		gr, err := admin("/debug/pprof/goroutine?debug=1")
		if err != nil {
			return s, fmt.Errorf("reading goroutines: %w", err)
		}
		if rest, ok := strings.CutPrefix(gr, "goroutine profile: total "); ok {
			s.goroutines, _ = strconv.Atoi(strings.Fields(rest)[0])
		}
		heap, err := admin("/debug/pprof/heap?debug=1")
		if err != nil {
			return s, fmt.Errorf("reading the heap: %w", err)
		}
		for _, l := range strings.Split(heap, "\n") {
			if v, ok := strings.CutPrefix(l, "# HeapInuse = "); ok {
				s.heapInuse, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			}
		}
		return s, nil
	}
	res := &soakResult{conns: conns, clients: clients}
	first, err := sample(0)
	if err != nil {
		return nil, err
	}
	res.samples = append(res.samples, first)
	var wrong atomic.Int64
	t0 := time.Now()
	for done := 0; done < conns; {
		batch := min(sampleEvery, conns-done)
		var next atomic.Int64
		var wg sync.WaitGroup
		for c := 0; c < clients; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := next.Add(1) - 1
					if i >= int64(batch) {
						return
					}
					if !one(int(int64(done)+i) % len(soakKinds)) {
						wrong.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		done += batch
		w.Log.Reset() // the fake internet's own log of hits
		s, err := sample(done)
		if err != nil {
			return nil, err
		}
		res.samples = append(res.samples, s)
		fmt.Fprintf(os.Stderr, "soak: %d connections, %.0f/s, fds %d, goroutines %d, rss %d KiB, heap %d KiB, wrong verdicts %d\n",
			done, float64(done)/time.Since(t0).Seconds(), s.fds, s.goroutines, s.rssKiB, s.heapInuse>>10, wrong.Load())
	}
	res.elapsed = time.Since(t0)
	res.wrong = wrong.Load()
	if d.Exited() {
		return nil, fmt.Errorf("the daemon exited during the soak:\n%s", d.Stderr())
	}
	return res, nil
}

// renderSoak writes the soak section: every sample, and growth after the
// baseline (the sample at 100,000 connections, or the first after it).
func renderSoak(r *soakResult, cmd string) string {
	var b strings.Builder
	b.WriteString("## Soak (issue 12 item 14)\n\n")
	fmt.Fprintf(&b, "Produced by `%s` (as root) on %s, %s.\n\n", cmd, machine(), time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, `Method: one guest, the builtin plane, %d clients making %d connections in turn of
four kinds — TLS allowed (handshake completed with github.com), TLS denied (SNI
example.com, not allowed), plain HTTP allowed (example.com, 200) and plain HTTP denied
(Host github.com, 403) — each checked for its expected verdict. At every sample the
clients pause, and after half a second the daemon's descriptors (/proc), threads and
RSS, goroutines (/debug/pprof/goroutine) and Go heap in use (/debug/pprof/heap) are read.
Rate: %.0f connections/s over %s; wrong verdicts: %d.

`, r.clients, r.conns, float64(r.conns)/r.elapsed.Seconds(), r.elapsed.Round(time.Second), r.wrong)
	if r.conns < 1000000 {
		rate := float64(r.conns) / r.elapsed.Seconds()
		fmt.Fprintf(&b, "Issue 12 asks for a million connections: at this rate (clients, servers and the daemon on the same two shared cores) that is about %.0f minutes; this run made %d (`-soak 1000000` runs the whole).\n\n", 1e6/rate/60, r.conns)
	}
	b.WriteString("| connections | descriptors | threads | goroutines | RSS (MiB) | Go heap in use (MiB) |\n|---|---|---|---|---|---|\n")
	for _, s := range r.samples {
		fmt.Fprintf(&b, "| %d | %d | %d | %d | %.1f | %.1f |\n", s.conns, s.fds, s.threads, s.goroutines, float64(s.rssKiB)/1024, float64(s.heapInuse)/(1<<20))
	}
	base := -1
	for i, s := range r.samples {
		if s.conns >= 100000 || (base < 0 && i == len(r.samples)-1) {
			base = i
			break
		}
	}
	if base >= 0 && base < len(r.samples)-1 {
		bs, last := r.samples[base], r.samples[len(r.samples)-1]
		var maxFD, maxG int
		var maxHeap int64
		var maxRSS int
		for _, s := range r.samples[base:] {
			maxFD, maxG, maxHeap, maxRSS = max(maxFD, s.fds), max(maxG, s.goroutines), max(maxHeap, s.heapInuse), max(maxRSS, s.rssKiB)
		}
		grew := maxFD > bs.fds+4 || maxG > bs.goroutines+16 || float64(maxHeap) > 1.5*float64(bs.heapInuse) || float64(maxRSS) > 1.25*float64(bs.rssKiB)
		verdict := "no growth"
		if grew {
			verdict = "**growth**"
		}
		fmt.Fprintf(&b, "\nAfter %d connections (baseline) to %d: descriptors %d → %d (max %d), goroutines %d → %d (max %d), RSS %.1f → %.1f MiB (max %.1f), Go heap %.1f → %.1f MiB (max %.1f): %s (the check: descriptors within +4, goroutines within +16, heap within 1.5×, RSS within 1.25× of the baseline).\n",
			bs.conns, last.conns, bs.fds, last.fds, maxFD, bs.goroutines, last.goroutines, maxG,
			float64(bs.rssKiB)/1024, float64(last.rssKiB)/1024, float64(maxRSS)/1024,
			float64(bs.heapInuse)/(1<<20), float64(last.heapInuse)/(1<<20), float64(maxHeap)/(1<<20), verdict)
	} else {
		b.WriteString("\nToo few connections for a growth check (it compares samples after the first 100,000).\n")
	}
	return b.String()
}
