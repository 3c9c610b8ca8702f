package proxy

import (
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// holdingOrigin accepts connections and keeps them open, unread, with no
// goroutine each (the bench's server that never answers).
type holdingOrigin struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func startHoldingOrigin(tb testing.TB) *holdingOrigin {
	tb.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	o := &holdingOrigin{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			o.mu.Lock()
			o.conns = append(o.conns, c)
			o.mu.Unlock()
		}
	}()
	tb.Cleanup(func() {
		ln.Close()
		o.mu.Lock()
		for _, c := range o.conns {
			c.Close()
		}
		o.mu.Unlock()
	})
	return o
}

// drop closes the connections held so far.
func (o *holdingOrigin) drop() {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, c := range o.conns {
		c.Close()
	}
	o.conns = nil
}

func (o *holdingOrigin) held() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.conns)
}

// liveHeap is the heap in use after two collections (the second frees what
// the first's finalizers released).
func liveHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc + ms.StackInuse
}

// rssKiB is this process's resident memory.
func rssKiB(tb testing.TB) int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		tb.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kib, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return kib
		}
	}
	tb.Fatal("no VmRSS in /proc/self/status")
	return 0
}

// BenchmarkIdleConnMemory reports the live Go memory (heap and stacks, after
// collection) the proxy holds per idle relayed connection that has sent its
// ClientHello to a server that never answers (the bench's idle-memory
// shape), the clients' and server's own sockets subtracted. With
// VMEGRESS_HEAP_PROFILE=file it writes a heap profile of the held state.
// Run with -benchtime 1x.
func BenchmarkIdleConnMemory(b *testing.B) {
	const n = 1000 // connections held at once
	if os.Getenv("VMEGRESS_HEAP_PROFILE") != "" {
		runtime.MemProfileRate = 1 // every allocation, for the profile
	}
	hello := helloFor(b, "example.com")
	origin := startHoldingOrigin(b)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	p := &Proxy{idleAfter: 10 * time.Millisecond}
	p.SetPolicy(testPolicy(b, fmt.Sprintf("      - sni: example.com\n        ports: [%d]\n", port)), true)
	startProxy(b, p, ln, origin.ln.Addr().String())

	dialAll := func(addr string, send []byte) []net.Conn {
		conns := make([]net.Conn, 0, n)
		for range n {
			c, err := net.Dial("tcp4", addr)
			if err != nil {
				b.Fatal(err)
			}
			if len(send) > 0 {
				if _, err := c.Write(send); err != nil {
					b.Fatal(err)
				}
			}
			conns = append(conns, c)
		}
		return conns
	}
	closeAll := func(conns []net.Conn) {
		for _, c := range conns {
			c.Close()
		}
	}
	wait := func(what string, cond func() bool) {
		deadline := time.Now().Add(60 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				b.Fatalf("never: %s", what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	for range b.N {
		// The control: as many client connections straight to the origin.
		base := liveHeap()
		held := origin.held()
		direct := dialAll(origin.ln.Addr().String(), nil)
		wait("the direct connections held", func() bool { return origin.held() == held+n })
		ends := liveHeap() - base
		closeAll(direct)
		origin.drop()

		base = liveHeap()
		var ms0 runtime.MemStats
		runtime.ReadMemStats(&ms0)
		rss0 := rssKiB(b)
		held = origin.held()
		conns := dialAll(ln.Addr().String(), hello)
		wait("the relayed connections held", func() bool { return origin.held() == held+n })
		wait("every direction parked", func() bool { return p.parked.Load().count() == 2*n })
		total := liveHeap() - base
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		b.ReportMetric(float64(ms.HeapInuse-ms0.HeapInuse)/n, "B-heapinuse/conn")
		b.ReportMetric(float64((ms.HeapIdle-ms.HeapReleased)-(ms0.HeapIdle-ms0.HeapReleased))/n, "B-heapidle/conn")
		b.ReportMetric(float64(ms.StackSys-ms0.StackSys)/n, "B-stacksys/conn")
		b.ReportMetric(float64(ms.OtherSys+ms.MSpanSys+ms.GCSys-ms0.OtherSys-ms0.MSpanSys-ms0.GCSys)/n, "B-othersys/conn")
		b.ReportMetric(float64(rssKiB(b)-rss0)*1024/n, "B-rss/conn")
		if f := os.Getenv("VMEGRESS_HEAP_PROFILE"); f != "" {
			w, err := os.Create(f)
			if err != nil {
				b.Fatal(err)
			}
			pprof.Lookup("heap").WriteTo(w, 0)
			w.Close()
		}
		b.ReportMetric(float64(total-ends)/n, "B/idle-conn")
		b.ReportMetric(float64(ends)/n, "B/ends")
		closeAll(conns)
		origin.drop()
		wait("every relayed connection ended", func() bool { return p.open.Load() == 0 })
	}
}

// BenchmarkRelayBulk moves bulk bytes from a client through a relayed
// connection to a server that discards them (b.SetBytes: MB/s).
func BenchmarkRelayBulk(b *testing.B) {
	sink, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer sink.Close()
	go func() {
		for {
			c, err := sink.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 256<<10)
				for {
					if _, err := c.Read(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	p := &Proxy{}
	p.SetPolicy(testPolicy(b, fmt.Sprintf("      - sni: example.com\n        ports: [%d]\n", port)), true)
	startProxy(b, p, ln, sink.Addr().String())
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(helloFor(b, "example.com")); err != nil {
		b.Fatal(err)
	}
	const chunk = 256 << 10 // what one write sends
	buf := make([]byte, chunk)
	b.SetBytes(chunk)
	cpu0 := cpuTime(b)
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	// The process's CPU per MiB moved (client, proxy and sink together;
	// less noisy than the rate on a shared machine).
	b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N*chunk>>20), "cpu-ns/MiB")
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
