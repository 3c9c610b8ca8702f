package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"reflect"
	"strings"
	"testing"
)

// forward runs the request forwarder on in, for host on port 80; an
// upgrade request is answered 101 when upgrade is set. After a switch the
// rest of the input is appended raw, as the proxy does.
func forward(t *testing.T, in, host string, upgrade bool) (string, error) {
	t.Helper()
	var out bytes.Buffer
	src := strings.NewReader(in)
	s := &requestStream{port: 80, check: sameHost(host), switched: func(*exchange) bool { return upgrade }}
	n, tail, switched, err := s.forward(&out, src)
	if int(n) != out.Len() {
		t.Errorf("counted %d bytes, wrote %d", n, out.Len())
	}
	if switched {
		out.Write(tail)
		io.Copy(&out, src)
	}
	return out.String(), err
}

func TestForwardRequests(t *testing.T) {
	get := "GET / HTTP/1.1\r\nHost: www.github.com\r\n\r\n"
	post := "POST /x HTTP/1.1\r\nHost: WWW.github.com:80\r\nContent-Length: 11\r\n\r\nhello world"
	chunked := "POST /c HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nHost:\r\n0\r\n\r\n"
	other := "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"

	// Same host throughout, written canonically: it goes as it came. A body
	// that looks like a request head is not taken for one.
	smuggle := "POST /s HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: 38\r\n\r\n" + other
	for _, in := range []string{get, get + post + chunked + get, smuggle + get} {
		out, err := forward(t, in, "www.github.com", false)
		if err != nil || out != in {
			t.Errorf("forward(%q) = %q, %v; want it all", in, out, err)
		}
	}
	// What a server could read otherwise is re-serialized.
	for _, tc := range []struct{ in, want string }{
		{"GET / HTTP/1.1\nHost: www.github.com\nAccept: */*\n\n", "GET / HTTP/1.1\r\nHost: www.github.com\r\nAccept: */*\r\n\r\n"},
		{"\r\n\r\n" + get, get},
		{"GET http://www.github.com/a?b HTTP/1.1\r\nUser-Agent: x\r\n\r\n", "GET /a?b HTTP/1.1\r\nHost: www.github.com\r\nUser-Agent: x\r\n\r\n"},
		{"GET / HTTP/1.1\r\nhost:   www.github.com  \r\nx-b: 1\r\nX-A: 2\r\nx-b: 3\r\n\r\n", "GET / HTTP/1.1\r\nHost: www.github.com\r\nX-B: 1\r\nX-B: 3\r\nX-A: 2\r\n\r\n"},
		{"POST / HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=\"a\"\r\nab\r\n1\r\nc\r\n0\r\n\r\n", "POST / HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"},
		// obs-fold: net/http joins the lines; the server gets one.
		{"GET / HTTP/1.1\r\nHost: www.github.com\r\nX: a\r\n b\r\n\r\n", "GET / HTTP/1.1\r\nHost: www.github.com\r\nX: a b\r\n\r\n"},
		{"POST / HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", "POST / HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: 2\r\n\r\nok"},
		// Trailer fields are never checked: never sent.
		{"POST / HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nHost: evil.test\r\nContent-Length: 9\r\n\r\n", "POST / HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"},
		// An upgrade to h2c (HTTP/2 streams name their own hosts) is
		// dropped; WebSocket stays.
		{"GET / HTTP/1.1\r\nHost: www.github.com\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n\r\n", "GET / HTTP/1.1\r\nHost: www.github.com\r\n\r\n"},
		{"GET / HTTP/1.1\r\nHost: www.github.com\r\nConnection: keep-alive, Upgrade\r\nUpgrade: HTTP/2.0, h2c\r\n\r\n", "GET / HTTP/1.1\r\nHost: www.github.com\r\nConnection: keep-alive\r\n\r\n"},
		{"GET / HTTP/1.1\r\nHost: www.github.com\r\nConnection: Upgrade\r\nUpgrade: websocket, H2C\r\n\r\n", "GET / HTTP/1.1\r\nHost: www.github.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"},
	} {
		out, err := forward(t, tc.in, "www.github.com", false)
		if err != nil || out != tc.want {
			t.Errorf("forward(%q) = %q, %v; want %q", tc.in, out, err, tc.want)
		}
	}

	// Another host on the same connection: the stream stops before it.
	for _, in := range []string{get + other, get + post + other + get, get + "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"} {
		out, err := forward(t, in, "www.github.com", false)
		var hs *HostSwitchError
		if !errors.As(err, &hs) || hs.Host != "example.com" || strings.Contains(out, "example.com") {
			t.Errorf("forward(%q) = %q, %v; want a host switch to example.com, unsent", in, out, err)
		}
	}

	// Refused whatever the host: nothing of it is sent.
	for _, tc := range []struct {
		in  string
		err error
	}{
		// The review's reproductions: bare LF hiding a second host, and a
		// body on GET that a server ignoring it reads as a request.
		{get + "GET http://www.github.com/lf HTTP/1.1\nHost: evil.test\n\n", ErrHostMismatch},
		{get + "GET / HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: 38\r\n\r\n" + other, ErrBodyNotAllowed},
		{get + "GET / HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", ErrBodyNotAllowed},
		{get + "GET / HTTP/1.1\r\nHost: www.github.com:8080\r\n\r\n", ErrHostPort},
		{get + "GET http://example.com/ HTTP/1.1\r\nHost: www.github.com\r\n\r\n", ErrHostMismatch},
		{get + "GET / HTTP/1.1\r\nHost: www.github.com\r\nHost: example.com\r\n\r\n", ErrNotHTTP},
		{get + "\x16\x03\x01 not http\r\n\r\n", ErrNotHTTP},
		{get + "GET / HTTP/1.1\r\nHost: www.github.com\r\n evil.test\r\n\r\n", ErrBadHost}, // obs-fold into Host
		{get + "POST / HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: gzip\r\n\r\n", ErrNotHTTP},
		{get + "POST / HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n1f\r\nGET / HTTP/1.1\r\nHost: evil\r\n\r\n\r\n0\r\n\r\n", ErrAmbiguousBody},
		{get + "POST / HTTP/1.0\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", ErrAmbiguousBody},
		{get + "CONNECT www.github.com:443 HTTP/1.1\r\nHost: www.github.com:443\r\n\r\n" + other, ErrConnect},
	} {
		out, err := forward(t, tc.in, "www.github.com", false)
		if !errors.Is(err, tc.err) || out != get {
			t.Errorf("forward(%q) = %q, %v; want the first request only and %v", tc.in, out, err, tc.err)
		}
	}
	// A bad chunk: its request's head went, the bad line does not.
	badChunk := "POST / HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\n\r\n"
	if out, err := forward(t, get+badChunk+"zz\r\n", "www.github.com", false); err == nil || out != get+badChunk {
		t.Errorf("bad chunk: %q, %v", out, err)
	}

	// After an upgrade the server accepted (101), the stream goes as is.
	upgrade := "GET /ws HTTP/1.1\r\nHost: www.github.com\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"
	for _, frame := range []string{"\x81\x05hello", "\x01\x02hi\x80\x01!"} {
		ws := upgrade + frame + other
		if out, err := forward(t, ws, "www.github.com", true); err != nil || out != ws {
			t.Errorf("upgrade: %q, %v", out, err)
		}
	}
	// The review's second reproduction: the server refused the upgrade and
	// what follows, even after an empty line, is a request like any other.
	var hs *HostSwitchError
	for _, next := range []string{other, "\r\n" + other, "\n" + other} {
		if out, err := forward(t, upgrade+next, "www.github.com", false); !errors.As(err, &hs) || out != upgrade {
			t.Errorf("request after a refused upgrade: %q, %v; want it checked and refused", out, err)
		}
	}
	if out, err := forward(t, upgrade+"\x81\x05hello", "www.github.com", false); !errors.Is(err, ErrNotHTTP) || out != upgrade {
		t.Errorf("frames after a refused upgrade: %q, %v; want them refused", out, err)
	}
	if out, err := forward(t, upgrade+get, "www.github.com", false); err != nil || out != upgrade+get {
		t.Errorf("same-host request after a refused upgrade: %q, %v", out, err)
	}
}

// TestForwardResponses: the server's bytes reach the client unchanged, and
// each exchange learns its final status in order (interim answers skipped,
// bodies of every framing stepped over).
func TestForwardResponses(t *testing.T) {
	resps := "HTTP/1.1 100 Continue\r\n\r\n" +
		"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello" +
		"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + // to HEAD: no body
		"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\ne\r\nHTTP/1.1 101\r\n\r\n0\r\n\r\n" +
		"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"
	r := newResponseStream()
	xs := []*exchange{{method: "POST"}, {method: "HEAD"}, {method: "GET"}, {method: "GET", upgrade: true}}
	for _, x := range xs {
		x.done = make(chan struct{})
		r.sent(x)
	}
	var out bytes.Buffer
	n, raw, err := r.forward(&guardedWriter{w: &out}, strings.NewReader(resps))
	if err != nil || !raw {
		t.Fatalf("forward: raw %v, %v; want raw after the 101", raw, err)
	}
	// Up to the 101's head (and what was read with it) went through.
	if !strings.HasPrefix(resps, out.String()) || !strings.Contains(out.String(), "101 Switching") || int(n) != out.Len() {
		t.Errorf("client got %q (%d counted)", out.String(), n)
	}
	for i, want := range []int{200, 200, 404, 101} {
		if got := r.answered(xs[i], nil); got != want {
			t.Errorf("exchange %d: status %d, want %d", i, got, want)
		}
	}

	// A refused upgrade: the status says so, and the stream is followed on.
	r = newResponseStream()
	x := &exchange{method: "GET", upgrade: true, done: make(chan struct{})}
	r.sent(x)
	out.Reset()
	in := "HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n"
	if _, raw, err := r.forward(&guardedWriter{w: &out}, strings.NewReader(in)); err != nil || raw || out.String() != in || r.answered(x, nil) != 426 {
		t.Errorf("refused upgrade: %q, raw %v, %v, status %d", out.String(), raw, err, r.answered(x, nil))
	}
}

// FuzzForwardRequests: whatever the client sends, what reaches upstream
// parses, with net/http, as exactly the requests that were checked — same
// method, target, version, Host, headers and body, nothing before, between
// or after them — and none of them is for another host, a CONNECT, or a
// GET/HEAD/OPTIONS/TRACE with a body.
func FuzzForwardRequests(f *testing.F) {
	f.Add("GET / HTTP/1.1\r\nHost: a.test\r\n\r\nGET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
	f.Add("POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
	f.Add("POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
	f.Add("GET / HTTP/1.1\r\nHost: a.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
	f.Add("GET / HTTP/1.1\r\nHost: a.test\r\n\r\nCONNECT b.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n")
	f.Add("GET http://a.test/lf HTTP/1.1\nHost: b.test\n\n")
	f.Add("GET / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 38\r\n\r\nGET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
	f.Add("GET http://a.test:80/x?y HTTP/1.0\r\nPragma: no-cache\r\nX: 1\r\nx: 2\r\n\r\n")
	f.Add("GET / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n\r\nGET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
	f.Fuzz(func(t *testing.T, in string) {
		var out bytes.Buffer
		type sent struct {
			p    *request
			body *bytes.Buffer
		}
		var checked []sent
		s := &requestStream{port: 80, check: sameHost("a.test"), checked: func(p *request) {
			b := &bytes.Buffer{}
			p.Body = io.NopCloser(io.TeeReader(p.Body, b))
			checked = append(checked, sent{p, b})
		}}
		s.forward(&out, strings.NewReader(in))
		br := bufio.NewReader(bytes.NewReader(out.Bytes()))
		for i, c := range checked {
			got, err := http.ReadRequest(br)
			if err != nil {
				if i == len(checked)-1 {
					return // the last one was cut short (its body did not all come)
				}
				t.Fatalf("request %d does not parse: %v\n%q", i, err, out.String())
			}
			body, err := io.ReadAll(got.Body)
			if err != nil {
				if i == len(checked)-1 {
					return
				}
				t.Fatalf("request %d: body: %v", i, err)
			}
			want := c.p
			target := want.RequestURI
			if !strings.HasPrefix(target, "/") && target != "*" {
				target = want.URL.RequestURI()
			}
			if got.Method != want.Method || got.RequestURI != target || got.Proto != want.Proto || got.Host != want.Host {
				t.Fatalf("request %d: sent %s %s %s Host %q; checked %s %s %s Host %q", i,
					got.Method, got.RequestURI, got.Proto, got.Host, want.Method, target, want.Proto, want.Host)
			}
			if !strings.EqualFold(want.name, "a.test") || want.Method == http.MethodConnect {
				t.Fatalf("request %d for %q (%s) passed", i, want.name, want.Method)
			}
			// Go's parser rewrites the Content-Length it read ("00" is
			// "0"): the lengths are compared as numbers below, the rest
			// of the header as sent.
			gh, wh := got.Header.Clone(), want.Header.Clone()
			gh.Del("Content-Length")
			wh.Del("Content-Length")
			if !reflect.DeepEqual(gh, wh) {
				t.Fatalf("request %d: headers sent %v; checked %v", i, got.Header, want.Header)
			}
			if !bytes.Equal(body, c.body.Bytes()) || got.ContentLength != want.ContentLength || len(got.TransferEncoding) != len(want.TransferEncoding) {
				t.Fatalf("request %d: body sent %q (%d); checked %q (%d)", i, body, got.ContentLength, c.body.Bytes(), want.ContentLength)
			}
			if len(body) > 0 && (got.Method == "GET" || got.Method == "HEAD" || got.Method == "OPTIONS" || got.Method == "TRACE") {
				t.Fatalf("request %d: %s with a body", i, got.Method)
			}
			// No token that switches to another HTTP (h2c, HTTP/x); other
			// tokens (websocket, or "0h2C00", which no server switches to)
			// may pass.
			for _, v := range got.Header.Values("Upgrade") {
				for _, tok := range strings.Split(v, ",") {
					tok = strings.TrimSpace(tok)
					if strings.EqualFold(tok, "h2c") || len(tok) >= 5 && strings.EqualFold(tok[:5], "HTTP/") {
						t.Fatalf("request %d: an upgrade to another HTTP was sent: %q", i, v)
					}
				}
			}
			if tr := nonEmpty(got.Trailer); len(tr) > 0 {
				t.Fatalf("request %d: trailer fields sent, never checked: %v", i, tr)
			}
		}
		if rest, _ := io.ReadAll(br); len(rest) > 0 {
			t.Fatalf("sent %q after the checked requests", rest)
		}
	})
}

func nonEmpty(h http.Header) http.Header {
	out := http.Header{}
	for k, vs := range h {
		if len(vs) > 0 {
			out[k] = vs
		}
	}
	return out
}
