package rawhttp

import (
	"io"
	"net"
	"net/http"
	"reflect"
	"testing"
	"time"
)

// serve answers each connection of a loopback listener with h (over
// HTTP/2 with prior knowledge when h2) and returns a dialled connection.
func serve(t *testing.T, h2 bool, h http.HandlerFunc) net.Conn {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	srv := &http.Server{Handler: h, Protocols: new(http.Protocols)}
	srv.Protocols.SetHTTP1(!h2)
	srv.Protocols.SetUnencryptedHTTP2(h2) // HTTP/2 with prior knowledge
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second)) // a hang fails, not blocks
	t.Cleanup(func() { c.Close() })
	return c
}

func echo(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/reset":
		panic(http.ErrAbortHandler) // HTTP/2: the stream is reset
	case "/missing":
		http.Error(w, "no", http.StatusNotFound)
	default:
		io.WriteString(w, r.Method+" "+r.URL.Path)
	}
}

func TestHTTP1(t *testing.T) {
	// Pipelined: the first n responses, in order.
	c := serve(t, false, echo)
	got := HTTP1(c, "GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /missing HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n", 2)
	if want := []string{"200 GET /a", "404 no\n"}; !reflect.DeepEqual(got, want) {
		t.Errorf("%q; want %q", got, want)
	}
	// Fewer than n when the connection ends.
	c = serve(t, false, echo)
	got = HTTP1(c, "GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 3)
	if want := []string{"200 GET /a"}; !reflect.DeepEqual(got, want) {
		t.Errorf("%q; want %q", got, want)
	}
}

func TestHTTP2(t *testing.T) {
	c := serve(t, true, echo)
	req := func(method, path string) H2Request {
		return H2Request{{":method", method}, {":scheme", "http"}, {":authority", "x"}, {":path", path}}
	}
	got := HTTP2(c, req("GET", "/a"), req("GET", "/reset"), req("GET", "/missing"), req("PUT", "/d"))
	if want := []string{"200 GET /a", "RST", "404 no\n", "200 PUT /d"}; !reflect.DeepEqual(got, want) {
		t.Errorf("%q; want %q", got, want)
	}
}
