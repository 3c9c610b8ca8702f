package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"strings"
	"testing"
)

func forward(t *testing.T, in, host string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	n, err := forwardRequests(&out, bufio.NewReader(strings.NewReader(in)), sameHost(host))
	if int(n) != out.Len() {
		t.Errorf("counted %d bytes, wrote %d", n, out.Len())
	}
	return out.String(), err
}

func TestForwardRequests(t *testing.T) {
	get := "GET / HTTP/1.1\r\nHost: www.github.com\r\n\r\n"
	post := "POST /x HTTP/1.1\r\nHost: WWW.github.com:80\r\nContent-Length: 11\r\n\r\nhello world"
	chunked := "POST /c HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nHost:\r\n0\r\nX-Trailer: 1\r\n\r\n"
	other := "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"

	// Same host throughout: every byte passes unchanged. A body that looks
	// like a request head is not taken for one.
	smuggle := "POST /s HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: 38\r\n\r\n" + other
	for _, in := range []string{get, get + post + chunked + get, "\r\n" + get, smuggle + get} {
		out, err := forward(t, in, "www.github.com")
		if err != nil || out != in {
			t.Errorf("forward(%q) = %q, %v; want it all", in, out, err)
		}
	}

	// Another host on the same connection: the copy stops before it.
	for _, in := range []string{get + other, get + post + other + get, get + "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"} {
		out, err := forward(t, in, "www.github.com")
		var hs *HostSwitchError
		if !errors.As(err, &hs) || hs.Host != "example.com" || strings.Contains(out, "example.com") {
			t.Errorf("forward(%q) = %q, %v; want a host switch to example.com, unsent", in, out, err)
		}
	}

	// Two hosts in one head, garbage, an unsupported transfer coding.
	for _, in := range []string{
		get + "GET http://example.com/ HTTP/1.1\r\nHost: www.github.com\r\n\r\n",
		get + "GET / HTTP/1.1\r\nHost: www.github.com\r\nHost: example.com\r\n\r\n",
		get + "\x16\x03\x01 not http\r\n\r\n",
		get + "POST / HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: gzip\r\n\r\n",
		get + "POST / HTTP/1.1\r\nHost: www.github.com\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n1f\r\nGET / HTTP/1.1\r\nHost: evil\r\n\r\n\r\n0\r\n\r\n",
		get + "POST / HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n",
	} {
		out, err := forward(t, in, "www.github.com")
		if err == nil || out != get {
			t.Errorf("forward(%q) = %q, %v; want the first request only and an error", in, out, err)
		}
	}
	// A bad chunk: its request's head went, the bad line does not.
	badChunk := "POST / HTTP/1.1\r\nHost: www.github.com\r\nTransfer-Encoding: chunked\r\n\r\n"
	if out, err := forward(t, get+badChunk+"zz\r\n", "www.github.com"); err == nil || out != get+badChunk {
		t.Errorf("bad chunk: %q, %v", out, err)
	}

	// After an upgrade the stream is not HTTP any more: passed as is...
	upgrade := "GET /ws HTTP/1.1\r\nHost: www.github.com\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"
	for _, frame := range []string{"\x81\x05hello", "\x01\x02hi\x80\x01!"} {
		ws := upgrade + frame + other
		if out, err := forward(t, ws, "www.github.com"); err != nil || out != ws {
			t.Errorf("upgrade: %q, %v", out, err)
		}
	}
	// ... unless what follows starts like a request (the server may have
	// refused the upgrade): then it is checked like any other.
	var hs *HostSwitchError
	if out, err := forward(t, upgrade+other, "www.github.com"); !errors.As(err, &hs) || out != upgrade {
		t.Errorf("request after an upgrade: %q, %v; want it checked and refused", out, err)
	}
	if out, err := forward(t, upgrade+get, "www.github.com"); err != nil || out != upgrade+get {
		t.Errorf("same-host request after an upgrade: %q, %v", out, err)
	}
	// CONNECT is never forwarded, whatever host it names.
	if out, err := forward(t, get+"CONNECT www.github.com:443 HTTP/1.1\r\nHost: www.github.com:443\r\n\r\n"+other, "www.github.com"); !errors.Is(err, ErrConnect) || out != get {
		t.Errorf("CONNECT: %q, %v", out, err)
	}
}

// FuzzForwardRequests: whatever the client sends, what reaches upstream is
// a prefix of it, unchanged, and never holds the head of a request for
// another host.
func FuzzForwardRequests(f *testing.F) {
	f.Add("GET / HTTP/1.1\r\nHost: a.test\r\n\r\nGET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
	f.Add("POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
	f.Add("POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
	f.Add("GET / HTTP/1.1\r\nHost: a.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nGET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
	f.Add("GET / HTTP/1.1\r\nHost: a.test\r\n\r\nCONNECT b.test:443 HTTP/1.1\r\nHost: a.test\r\n\r\n")
	f.Fuzz(func(t *testing.T, in string) {
		var out bytes.Buffer
		forwardRequests(&out, bufio.NewReader(strings.NewReader(in)), sameHost("a.test"))
		if !strings.HasPrefix(in, out.String()) {
			t.Fatalf("forwarded bytes are not a prefix of the input:\n%q\n%q", out.String(), in)
		}
		// Re-read what was forwarded as requests: every head names a.test.
		br := bufio.NewReader(bytes.NewReader(out.Bytes()))
		for {
			head, err := readRequestHead(br)
			if err != nil {
				return
			}
			name, req, err := requestHost(head)
			if err != nil {
				t.Fatalf("forwarded a head that does not parse: %q", head)
			}
			if name != "a.test" && !strings.EqualFold(name, "a.test") {
				t.Fatalf("forwarded a request for %q", name)
			}
			if req.Method == "CONNECT" {
				t.Fatalf("forwarded a CONNECT: %q", head)
			}
			if req.Header.Get("Upgrade") != "" && headerHasToken(req.Header, "Connection", "upgrade") {
				if next, err := br.Peek(1); err != nil || next[0] < 'A' || next[0] > 'Z' {
					return // copied as is
				}
				continue
			}
			switch {
			case len(req.TransferEncoding) > 0:
				if copyChunked(&bytes.Buffer{}, br) != nil {
					return
				}
			case req.ContentLength > 0:
				if _, err := br.Discard(int(min(req.ContentLength, 1<<30))); err != nil {
					return
				}
			}
		}
	})
}
