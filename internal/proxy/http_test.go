package proxy

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestReadHTTPHost(t *testing.T) {
	for _, tc := range []struct {
		name, req, host string
		err             error
	}{
		{"host header", "GET / HTTP/1.1\r\nHost: www.github.com\r\n\r\n", "www.github.com", nil},
		{"host with port", "GET / HTTP/1.1\r\nHost: www.github.com:80\r\n\r\n", "www.github.com", nil},
		{"host with another port", "GET / HTTP/1.1\r\nHost: www.github.com:8080\r\n\r\n", "", ErrHostPort},
		{"absolute URI", "GET http://deb.debian.org/x HTTP/1.1\r\nHost: deb.debian.org\r\n\r\n", "deb.debian.org", nil},
		{"absolute URI, no Host", "GET http://deb.debian.org/x HTTP/1.0\r\n\r\n", "deb.debian.org", nil},
		{"URI and Host disagree", "GET http://evil.test/ HTTP/1.1\r\nHost: deb.debian.org\r\n\r\n", "", ErrHostMismatch},
		// The review's first reproduction: bare LF line ends hid the Host.
		{"URI and Host disagree, bare LF", "GET http://www.github.com/lf HTTP/1.1\nHost: evil.test\n\n", "", ErrHostMismatch},
		{"bare LF", "GET / HTTP/1.1\nHost: www.github.com\n\n", "www.github.com", nil},
		{"leading empty line", "\r\nGET / HTTP/1.1\r\nHost: www.github.com\r\n\r\n", "www.github.com", nil},
		{"two Host headers", "GET / HTTP/1.1\r\nHost: a.com\r\nhost: evil.test\r\n\r\n", "", ErrNotHTTP}, // net/http refuses it
		{"body follows", "POST / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 5\r\n\r\nhello", "a.com", nil},
		{"GET with a body", "GET / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 5\r\n\r\nhello", "", ErrBodyNotAllowed},
		{"HEAD chunked", "HEAD / HTTP/1.1\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "", ErrBodyNotAllowed},
		{"GET, empty body", "GET / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 0\r\n\r\n", "a.com", nil},
		{"body framed twice", "POST / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "", ErrAmbiguousBody},
		{"chunked on HTTP/1.0", "POST / HTTP/1.0\r\nHost: a.com\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "", ErrAmbiguousBody},
		{"CONNECT", "CONNECT a.com:80 HTTP/1.1\r\nHost: a.com:80\r\n\r\n", "", ErrConnect},
		{"not a URI", "GET a.com HTTP/1.1\r\nHost: a.com\r\n\r\n", "", ErrNotHTTP},
		{"https URI", "GET https://a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n", "", ErrBadTarget},
		{"opaque URI", "GET http:evil.test HTTP/1.1\r\nHost: a.com\r\n\r\n", "", ErrBadTarget},
		{"userinfo", "GET http://a.com@evil.test/ HTTP/1.1\r\n\r\n", "", ErrBadTarget},
		{"odd host", "GET / HTTP/1.1\r\nHost: a.com/x\r\n\r\n", "", ErrBadHost},
		{"HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "", ErrNotHTTP},
		{"TLS", "\x16\x03\x01\x00\x05hello", "", ErrNotHTTP},
		{"garbage", "SSH-2.0-OpenSSH\r\n\r\n", "", ErrNotHTTP},
		{"truncated", "GET / HTTP/1.1\r\nHost: a.c", "", ErrNotHTTP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, prefix, err := ReadHTTPHost(oneByteReader{strings.NewReader(tc.req)}, 80)
			if host != tc.host || !errors.Is(err, tc.err) {
				t.Errorf("got %q, %v; want %q, %v", host, err, tc.host, tc.err)
			}
			if !strings.HasPrefix(tc.req, string(prefix)) {
				t.Errorf("returned bytes are not a prefix of the stream")
			}
		})
	}
	big := "GET / HTTP/1.1\r\nHost: a.com\r\nX: " + strings.Repeat("a", MaxRequestHeadBytes) + "\r\n\r\n"
	if _, got, err := ReadHTTPHost(strings.NewReader(big), 0); err == nil || len(got) > MaxRequestHeadBytes+4096 {
		t.Errorf("oversized head: %d bytes, %v", len(got), err)
	}
}

func FuzzReadHTTPHost(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\nHost: www.github.com\r\n\r\n"))
	f.Add([]byte("GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n"))
	f.Add([]byte("CONNECT a.com:443 HTTP/1.1\r\n\r\n"))
	f.Add([]byte("GET http://www.github.com/lf HTTP/1.1\nHost: evil.test\n\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		host, got, err := ReadHTTPHost(bytes.NewReader(data), 80)
		// What was read: the head (at most the cap) and one buffer more.
		if !bytes.HasPrefix(data, got) || len(got) > MaxRequestHeadBytes+4096 {
			t.Fatal("returned bytes are not a bounded prefix of the stream")
		}
		if err != nil && host != "" {
			t.Fatalf("host %q with error %v", host, err)
		}
	})
}
