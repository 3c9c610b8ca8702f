package main

// The paths users use besides the cidr rule's: bulk HTTPS through an sni
// rule (a package install's download), idle connections held open after
// their ClientHello, and short TCP connections through a cidr rule.

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// The download server and the idle-connection holder sit on example.com's
// address in the fake internet, on ports its sni rule allows; connPort is
// the cidr rule's port that answers one byte and closes.
var (
	httpsPort = 8443
	idlePort  = 8444
	connPort  = 5003
	// downloadName is the TLS server name of both.
	downloadName = "example.com"
)

// downloads serves an endless HTTPS download on example.com:8443 and holds
// every connection to example.com:8444 without reading it.
type downloads struct {
	lns  []net.Listener
	pool *x509.CertPool
	held atomic.Int64

	mu    sync.Mutex
	conns []net.Conn
}

func startDownloads(w *world.World) (*downloads, error) {
	cert, pool, err := selfSigned(downloadName)
	if err != nil {
		return nil, err
	}
	d := &downloads{pool: pool}
	host := world.ExampleIP.String()
	ln, err := world.ListenIn(w.Inet, "tcp4", net.JoinHostPort(host, strconv.Itoa(httpsPort)))
	if err != nil {
		return nil, err
	}
	hold, err := world.ListenIn(w.Inet, "tcp4", net.JoinHostPort(host, strconv.Itoa(idlePort)))
	if err != nil {
		ln.Close()
		return nil, err
	}
	one, err := world.ListenIn(w.Inet, "tcp4", net.JoinHostPort(sinkIP.String(), strconv.Itoa(connPort)))
	if err != nil {
		ln.Close()
		hold.Close()
		return nil, err
	}
	d.lns = []net.Listener{ln, hold, one}
	tl := tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}})
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			go serveDownload(c)
		}
	}()
	go func() {
		for {
			c, err := hold.Accept()
			if err != nil {
				return
			}
			d.mu.Lock()
			d.conns = append(d.conns, c)
			d.mu.Unlock()
			d.held.Add(1)
		}
	}()
	go func() {
		for {
			c, err := one.Accept()
			if err != nil {
				return
			}
			c.Write([]byte{'x'})
			c.Close()
		}
	}()
	return d, nil
}

func (d *downloads) close() {
	for _, l := range d.lns {
		l.Close()
	}
	d.mu.Lock()
	for _, c := range d.conns {
		c.Close()
	}
	d.mu.Unlock()
}

// downloadChunk is what the server writes per call: a few TLS records.
const downloadChunk = 256 << 10

// serveDownload reads one request head and answers with a body that only
// ends when the client goes away.
func serveDownload(c net.Conn) {
	defer c.Close()
	r := bufio.NewReader(c)
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if l == "\r\n" {
			break
		}
	}
	if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1099511627776\r\n\r\n"); err != nil {
		return
	}
	buf := make([]byte, downloadChunk)
	for {
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
}

// selfSigned makes a certificate for name and a pool that trusts it.
func selfSigned(name string) (tls.Certificate, *x509.CertPool, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("generating a key for %s: %w", name, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(2),
		Subject:               pkix.Name{CommonName: name},
		DNSNames:              []string{name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("creating a certificate for %s: %w", name, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool, nil
}

// httpsDownload runs streams HTTPS downloads from example.com through the
// guest's path for d and returns the bytes received, in Gbit/s.
func httpsDownload(ns string, dl *downloads, streams int, d time.Duration) (float64, error) {
	var total atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	var ready sync.WaitGroup
	start := make(chan struct{})
	conns := make([]*tls.Conn, streams)
	for i := range conns {
		raw, err := dialIn(ns, net.JoinHostPort(world.ExampleIP.String(), strconv.Itoa(httpsPort)))
		if err != nil {
			return 0, err
		}
		c := tls.Client(raw, &tls.Config{ServerName: downloadName, RootCAs: dl.pool})
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if err := c.Handshake(); err != nil {
			raw.Close()
			return 0, fmt.Errorf("TLS handshake with %s: %w", downloadName, err)
		}
		conns[i] = c
	}
	t0 := time.Now()
	for _, c := range conns {
		wg.Add(1)
		ready.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			buf := make([]byte, downloadChunk)
			ready.Done()
			<-start
			c.SetDeadline(t0.Add(d))
			if _, err := io.WriteString(c, "GET /debian/pool/big.deb HTTP/1.1\r\nHost: "+downloadName+"\r\n\r\n"); err != nil {
				firstErr.CompareAndSwap(nil, err)
				return
			}
			for {
				n, err := c.Read(buf)
				total.Add(int64(n))
				if err != nil {
					return
				}
			}
		}()
	}
	ready.Wait()
	t0 = time.Now()
	close(start)
	wg.Wait()
	elapsed := time.Since(t0)
	if total.Load() == 0 {
		return 0, fmt.Errorf("nothing downloaded (%v)", firstErr.Load())
	}
	return float64(total.Load()) * 8 / elapsed.Seconds() / 1e9, nil
}

// tcpConnections runs clients making short TCP connections through the
// cidr rule for d (connect, one byte from the server, close) and returns
// connections per second.
func tcpConnections(ns string, clients int, d time.Duration) (float64, error) {
	var ok, failures atomic.Int64
	var wg sync.WaitGroup
	end := time.Now().Add(d)
	addr := net.JoinHostPort(sinkIP.String(), strconv.Itoa(connPort))
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var b [1]byte
			for time.Now().Before(end) {
				c, err := dialIn(ns, addr)
				if err != nil {
					failures.Add(1)
					continue
				}
				c.SetDeadline(time.Now().Add(10 * time.Second))
				_, err = io.ReadFull(c, b[:])
				c.Close()
				if err != nil {
					failures.Add(1)
					continue
				}
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	if ok.Load() == 0 {
		return 0, fmt.Errorf("no connection succeeded (%d failures)", failures.Load())
	}
	return float64(ok.Load()) / d.Seconds(), nil
}

// clientHello returns the bytes of a TLS ClientHello for name, as a client
// sends them first.
func clientHello(name string) ([]byte, error) {
	a, b := net.Pipe()
	defer a.Close()
	go func() {
		tls.Client(b, &tls.Config{ServerName: name, InsecureSkipVerify: true}).Handshake()
		b.Close()
	}()
	buf := make([]byte, 16<<10)
	a.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := a.Read(buf)
	if err != nil {
		return nil, fmt.Errorf("capturing a ClientHello: %w", err)
	}
	return buf[:n], nil
}

// envoyClusterMax caps the idle connections measured: Envoy's default
// circuit breaker allows 1,024 connections to one upstream cluster, and
// vmegress's Envoy configuration does not raise it, so more would wait in
// Envoy unconnected (and a 1,025th idle connection to one sni rule's
// destination is not served there).
const envoyClusterMax = 1000

// parkAfter is how long the bench lets idle connections sit before reading
// the data plane's memory: longer than the builtin plane's wait before it
// parks a quiet connection (proxy.idleAfter), and time for the garbage
// collector to have run.
const parkAfter = 3 * time.Second

// idleMemory opens n proxied connections that send their ClientHello and
// then nothing (the server never answers), and returns the data plane's
// resident memory growth per connection.
func idleMemory(ns string, dl *downloads, pid, n int) (float64, error) {
	hello, err := clientHello(downloadName)
	if err != nil {
		return 0, err
	}
	time.Sleep(parkAfter) // the earlier measurements' connections are gone
	before, err := rssKiB(pid)
	if err != nil {
		return 0, err
	}
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	held := dl.held.Load()
	for i := 0; i < n; i++ {
		c, err := dialIn(ns, net.JoinHostPort(world.ExampleIP.String(), strconv.Itoa(idlePort)))
		if err != nil {
			return 0, fmt.Errorf("connection %d: %w", i, err)
		}
		conns = append(conns, c)
		if _, err := c.Write(hello); err != nil {
			return 0, fmt.Errorf("connection %d: sending its ClientHello: %w", i, err)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for dl.held.Load() < held+int64(n) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if got := dl.held.Load() - held; got < int64(n) {
		return 0, fmt.Errorf("only %d of %d idle connections reached the server", got, n)
	}
	time.Sleep(parkAfter)
	after, err := rssKiB(pid)
	if err != nil {
		return 0, err
	}
	return float64(after-before) / float64(n), nil
}

// profileHTTPS takes a CPU profile of the builtin plane (through its admin
// endpoint) while one HTTPS download runs for d, and returns pprof's top
// functions by cumulative and by flat time.
func profileHTTPS(w *world.World, bin string, dl *downloads, ns string, d time.Duration) (string, error) {
	secs := max(int(d.Round(time.Second)/time.Second), 1)
	file := filepath.Join(w.Dir, "cpu.pprof")
	done := make(chan error, 1)
	go func() {
		done <- world.Run(context.Background(), world.NS(w.Host, "curl", "-sS", "--fail", "--max-time", strconv.Itoa(secs+30),
			"-o", file, fmt.Sprintf("http://127.0.0.1:9901/debug/pprof/profile?seconds=%d", secs))...)
	}()
	time.Sleep(100 * time.Millisecond) // the profile has started
	if _, err := httpsDownload(ns, dl, 1, time.Duration(secs)*time.Second); err != nil {
		return "", err
	}
	if err := <-done; err != nil {
		return "", fmt.Errorf("fetching the CPU profile: %w", err)
	}
	out, err := exec.Command("go", "tool", "pprof", "-top", "-nodecount=14", bin, file).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go tool pprof: %v\n%s", err, out)
	}
	var keep []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, "flat%") || strings.HasPrefix(strings.TrimSpace(l), "Showing") ||
			(len(l) > 0 && (l[0] == ' ' || (l[0] >= '0' && l[0] <= '9'))) {
			keep = append(keep, strings.TrimRight(l, " "))
		}
	}
	return strings.Join(slices.Clip(keep), "\n"), nil
}

// cpuTicks is a process's user and system CPU time in clock ticks
// (USER_HZ, 100 a second on Linux), 0 when it cannot be read.
func cpuTicks(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndex(s, ")")+2:]) // fields from the 3rd on
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64) // utime, the 14th field
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return u + st
}

// planeCPU starts counting the data plane's CPU time; the returned func
// prints it per GB downloaded (stderr: how much the plane itself costs,
// which the shared machine's load moves less than the rate).
func planeCPU(planePID func() int) func(path string, streams int, gbps float64, d time.Duration) {
	if planePID == nil {
		return func(string, int, float64, time.Duration) {}
	}
	pid := planePID()
	t0 := cpuTicks(pid)
	return func(path string, streams int, gbps float64, d time.Duration) {
		secs := float64(cpuTicks(pid)-t0) / 100
		if gb := gbps * d.Seconds() / 8; gb > 0 {
			fmt.Fprintf(os.Stderr, "  %s, %d stream(s): %.2f Gbit/s, the plane took %.2f CPU-s, %.3f CPU-s/GB\n", path, streams, gbps, secs, secs/gb)
		}
	}
}
