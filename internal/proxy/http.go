package proxy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
)

// MaxRequestHeadBytes caps how much is read looking for an HTTP request head.
const MaxRequestHeadBytes = 16 << 10

// Errors of ReadHTTPHost.
var (
	ErrNotHTTP      = errors.New("not an HTTP request")
	ErrHostMismatch = errors.New("HTTP request's URI names another host than its Host header")
)

// ReadHTTPHost reads from r until it holds a complete HTTP/1.x request head
// (at most MaxRequestHeadBytes) and returns its host, without port, and every
// byte read so the caller can send them on unchanged. A request whose
// absolute URI and Host header disagree is refused: which one the server
// obeys is the server's choice, not ours. The caller sets any deadline.
func ReadHTTPHost(r io.Reader) (string, []byte, error) {
	rc := &recordingConn{r: io.LimitReader(r, MaxRequestHeadBytes)}
	req, err := http.ReadRequest(bufio.NewReaderSize(rc, 4096))
	if err != nil {
		var ne net.Error
		switch {
		case rc.buf.Len() >= MaxRequestHeadBytes:
			return "", rc.buf.Bytes(), errors.New("HTTP request head larger than 16 KiB")
		case errors.As(rc.readErr, &ne) && ne.Timeout():
			return "", rc.buf.Bytes(), errors.New("no complete HTTP request head before the deadline")
		}
		return "", rc.buf.Bytes(), ErrNotHTTP
	}
	host := req.Host // the absolute URI's host if there is one, else the Host header
	if h := req.Header.Get("Host"); h != "" && req.URL.Host != "" && !strings.EqualFold(stripPort(h), stripPort(req.URL.Host)) {
		return "", rc.buf.Bytes(), ErrHostMismatch
	}
	return stripPort(host), rc.buf.Bytes(), nil
}

func stripPort(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return strings.Trim(h, "[]")
	}
	return hostport
}
