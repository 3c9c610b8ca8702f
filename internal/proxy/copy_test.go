package proxy

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"
)

// startEcho serves a TCP echo on loopback: every byte back, and a FIN
// back once the client's FIN has come.
func startEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return ln.Addr().String()
}

// helloFor returns the bytes of a TLS ClientHello for name.
func helloFor(t testing.TB, name string) []byte {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	go func() {
		tls.Client(b, &tls.Config{ServerName: name, InsecureSkipVerify: true}).Handshake()
		b.Close()
	}()
	buf := make([]byte, 16<<10)
	a.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := a.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return buf[:n]
}

// relayedConn opens a connection through p allowed by its sni rule and
// returns it once the echo has sent the ClientHello back.
func relayedConn(t *testing.T, addr string, hello []byte) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second)) // a hang fails, not blocks
	if _, err := c.Write(hello); err != nil {
		t.Fatal(err)
	}
	back := make([]byte, len(hello))
	if _, err := io.ReadFull(c, back); err != nil || !bytes.Equal(back, hello) {
		t.Fatalf("the echo through the proxy: %v (%d bytes)", err, len(back))
	}
	return c.(*net.TCPConn)
}

// waitFor polls cond until it holds (a generous bound: a hang fails).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("never: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// halvesRunning counts goroutines copying a relayed direction.
func halvesRunning() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), "proxy.(*half).run(")
}

// sniProxy serves a proxy allowing example.com on its listener's port to
// an echo server, halves parking after idle.
func sniProxy(t *testing.T, idle time.Duration, access io.Writer) (*Proxy, string) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	p := &Proxy{idleAfter: idle, AccessLog: slog.New(slog.NewJSONHandler(access, nil))}
	p.SetPolicy(testPolicy(t, fmt.Sprintf("      - sni: example.com\n        ports: [%d]\n", port)), true)
	startProxy(t, p, ln, startEcho(t))
	return p, ln.Addr().String()
}

// TestIdleRelayParks: an idle spliced connection holds no goroutine (both
// directions parked in the epoll set), wakes when bytes come, and still
// half-closes: the client's FIN reaches the server and the server's comes
// back.
func TestIdleRelayParks(t *testing.T) {
	var access syncBuffer
	p, addr := sniProxy(t, 10*time.Millisecond, &access)
	c := relayedConn(t, addr, helloFor(t, "example.com"))
	waitFor(t, "both directions parked", func() bool { return p.parked.Load().count() == 2 })
	if n := halvesRunning(); n != 0 {
		t.Errorf("%d copying goroutines while the connection is idle; want 0", n)
	}
	for i := range 3 {
		msg := fmt.Sprintf("ping %d", i)
		io.WriteString(c, msg)
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
			t.Fatalf("after parking: %q, %v; want %q", got, err, msg)
		}
		waitFor(t, "parked again", func() bool { return p.parked.Load().count() == 2 })
	}
	c.CloseWrite()
	if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
		t.Errorf("after the half-close: %q, %v; want the server's FIN", rest, err)
	}
	waitFor(t, "the access-log line", func() bool { return strings.Contains(access.String(), `"verdict":"allow"`) })
	if p.parked.Load().count() != 0 {
		t.Errorf("%d halves still parked after the connection ended", p.parked.Load().count())
	}
}

// TestParkedRelayRevoked: a policy change that refuses a parked
// connection closes both its sockets and logs it revoked (its halves have
// no goroutine to see the close by themselves).
func TestParkedRelayRevoked(t *testing.T) {
	var access syncBuffer
	p, addr := sniProxy(t, 10*time.Millisecond, &access)
	c := relayedConn(t, addr, helloFor(t, "example.com"))
	waitFor(t, "both directions parked", func() bool { return p.parked.Load().count() == 2 })
	if n := p.SetPolicy(testPolicy(t, "      - sni: other.test\n"), true); n != 1 {
		t.Fatalf("SetPolicy closed %d connections; want 1", n)
	}
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Errorf("the revoked connection is still open")
	}
	waitFor(t, "the revoked connection's log line", func() bool { return strings.Contains(access.String(), `"verdict":"revoked"`) })
	if p.parked.Load().count() != 0 {
		t.Errorf("%d halves still parked after revocation", p.parked.Load().count())
	}
}

// TestRelayBurstsAcrossParking: bytes sent in bursts with pauses longer
// than the idle wait (so the halves park and wake between them, and
// windows end mid-transfer) all arrive, in order, both ways.
func TestRelayBurstsAcrossParking(t *testing.T) {
	var access syncBuffer
	_, addr := sniProxy(t, time.Millisecond, &access)
	c := relayedConn(t, addr, helloFor(t, "example.com"))
	const bursts, size = 8, 3 << 20 // spliced, not copied through a buffer
	sent, got := sha256.New(), sha256.New()
	done := make(chan error, 1)
	go func() {
		n, err := io.Copy(got, c)
		if err == nil && n != bursts*size {
			err = fmt.Errorf("got %d bytes back; want %d", n, bursts*size)
		}
		done <- err
	}()
	buf := make([]byte, size)
	for range bursts {
		rand.Read(buf)
		sent.Write(buf)
		if _, err := c.Write(buf); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond) // let the halves park
	}
	c.CloseWrite()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(sent.Sum(nil), got.Sum(nil)) {
		t.Errorf("the bytes that came back differ from those sent")
	}
	waitFor(t, "the access-log line", func() bool { return strings.Contains(access.String(), `"bytes_down"`) })
	var line struct{ BytesUp, BytesDown int64 }
	dec := json.NewDecoder(strings.NewReader(access.String()))
	var m map[string]any
	for dec.Decode(&m) == nil {
		if v, ok := m["bytes_up"].(float64); ok {
			line.BytesUp, line.BytesDown = int64(v), int64(m["bytes_down"].(float64))
		}
	}
	if want := int64(bursts * size); line.BytesUp < want || line.BytesDown < want {
		t.Errorf("logged %d bytes up, %d down; want at least %d each", line.BytesUp, line.BytesDown, want)
	}
}

// TestRelaySlowReader: behind a guest that does not read, the relay stops
// reading the server once the guest's socket and its one pipe are full
// (the server's writes block: what the host holds for the connection is
// bounded by socket buffers and one pipe), and when the guest reads at
// last every byte arrives, in order, then the server's end.
func TestRelaySlowReader(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	origin, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { origin.Close() })
	hello := helloFor(t, "example.com")
	// The server reads the hello, then writes until a write has been
	// blocked for a while (the path is full), and closes.
	type pushed struct {
		n   int64
		sum []byte
	}
	result := make(chan pushed, 1)
	go func() {
		c, err := origin.Accept()
		if err != nil {
			result <- pushed{}
			return
		}
		defer c.Close()
		io.ReadFull(c, make([]byte, len(hello)))
		h := sha256.New()
		buf := make([]byte, 64<<10)
		var n int64
		for i := 0; ; i++ {
			buf[0], buf[len(buf)-1] = byte(i), byte(i>>8) // every chunk differs
			c.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
			m, err := c.Write(buf)
			h.Write(buf[:m])
			n += int64(m)
			if err != nil || n > slowReaderBound {
				break
			}
		}
		result <- pushed{n, h.Sum(nil)}
	}()
	p := &Proxy{idleAfter: 50 * time.Millisecond}
	p.SetPolicy(testPolicy(t, fmt.Sprintf("      - sni: example.com\n        ports: [%d]\n", port)), true)
	startProxy(t, p, ln, origin.Addr().String())
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write(hello); err != nil {
		t.Fatal(err)
	}
	got := <-result // the guest has read nothing so far
	t.Logf("the server wrote %d KiB before its writes blocked", got.n>>10)
	if got.n > slowReaderBound {
		t.Fatalf("the server wrote over %d MiB to a guest that reads nothing: the relay does not stop reading", slowReaderBound>>20)
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second)) // a hang fails, not blocks
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil || n != got.n || !bytes.Equal(h.Sum(nil), got.sum) {
		t.Errorf("the guest read %d bytes (%v), matching: %v; the server wrote %d", n, err, bytes.Equal(h.Sum(nil), got.sum), got.n)
	}
}

// slowReaderBound is more than the socket buffers on the way (the kernel's
// maxima on loopback: the guest's receive, the proxy's send and receive,
// the server's send) and one pipe can hold.
const slowReaderBound = 64 << 20

// TestRelayBulkAnswerArrivesWhole: an answer larger than a buffered copy
// (spliced), sent at once and followed by nothing, reaches the guest whole
// while the connection stays open (nothing of it is held back waiting for
// more bytes).
func TestRelayBulkAnswerArrivesWhole(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	origin, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { origin.Close() })
	hello := helloFor(t, "example.com")
	answer := make([]byte, 3*smallCopy+12345) // spliced, ending mid-segment
	rand.Read(answer)
	hold := make(chan struct{})
	t.Cleanup(func() { close(hold) })
	go func() {
		c, err := origin.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.ReadFull(c, make([]byte, len(hello)))
		c.Write(answer)
		<-hold // the connection stays open
	}()
	p := &Proxy{}
	p.SetPolicy(testPolicy(t, fmt.Sprintf("      - sni: example.com\n        ports: [%d]\n", port)), true)
	startProxy(t, p, ln, origin.Addr().String())
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write(hello); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(20 * time.Second)) // a hang fails, not blocks
	got := make([]byte, len(answer))
	if n, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, answer) {
		t.Fatalf("the guest got %d of %d bytes of the answer (%v)", n, len(answer), err)
	}
}
