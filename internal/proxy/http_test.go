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
		{"host with port", "GET / HTTP/1.1\r\nHost: www.github.com:8080\r\n\r\n", "www.github.com", nil},
		{"absolute URI", "GET http://deb.debian.org/x HTTP/1.1\r\nHost: deb.debian.org\r\n\r\n", "deb.debian.org", nil},
		{"absolute URI, no Host", "GET http://deb.debian.org/x HTTP/1.0\r\n\r\n", "deb.debian.org", nil},
		{"URI and Host disagree", "GET http://evil.test/ HTTP/1.1\r\nHost: deb.debian.org\r\n\r\n", "", ErrHostMismatch},
		{"two Host headers", "GET / HTTP/1.1\r\nHost: a.com\r\nhost: evil.test\r\n\r\n", "", ErrNotHTTP}, // net/http refuses it
		{"body follows", "POST / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 5\r\n\r\nhello", "a.com", nil},
		{"body framed twice", "POST / HTTP/1.1\r\nHost: a.com\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "", ErrAmbiguousBody},
		{"TLS", "\x16\x03\x01\x00\x05hello", "", ErrNotHTTP},
		{"garbage", "SSH-2.0-OpenSSH\r\n\r\n", "", ErrNotHTTP},
		{"truncated", "GET / HTTP/1.1\r\nHost: a.c", "", ErrNotHTTP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			host, prefix, err := ReadHTTPHost(oneByteReader{strings.NewReader(tc.req)})
			if host != tc.host || !errors.Is(err, tc.err) {
				t.Errorf("got %q, %v; want %q, %v", host, err, tc.host, tc.err)
			}
			if !strings.HasPrefix(tc.req, string(prefix)) {
				t.Errorf("returned bytes are not a prefix of the stream")
			}
		})
	}
	big := "GET / HTTP/1.1\r\nHost: a.com\r\nX: " + strings.Repeat("a", MaxRequestHeadBytes) + "\r\n\r\n"
	if _, got, err := ReadHTTPHost(strings.NewReader(big)); err == nil || len(got) > MaxRequestHeadBytes {
		t.Errorf("oversized head: %d bytes, %v", len(got), err)
	}
}

func FuzzReadHTTPHost(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\nHost: www.github.com\r\n\r\n"))
	f.Add([]byte("GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n"))
	f.Add([]byte("CONNECT a.com:443 HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		host, got, err := ReadHTTPHost(bytes.NewReader(data))
		if !bytes.HasPrefix(data, got) || len(got) > MaxRequestHeadBytes {
			t.Fatal("returned bytes are not a bounded prefix of the stream")
		}
		if err != nil && host != "" {
			t.Fatalf("host %q with error %v", host, err)
		}
	})
}
