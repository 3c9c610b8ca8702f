package proxy

import (
	"bufio"
	"bytes"
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
	ErrHostMismatch = errors.New("HTTP request names two hosts (URI and Host header, or two Host headers)")
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
	if len(req.TransferEncoding) > 0 && len(rawHeaders(rc.buf.Bytes(), "content-length")) > 0 {
		return "", rc.buf.Bytes(), ErrAmbiguousBody
	}
	// net/http folds the Host header into req.Host (preferring an absolute
	// URI's host) and drops it: read the raw header lines to compare.
	hosts := rawHostHeaders(rc.buf.Bytes())
	if len(hosts) > 1 {
		return "", rc.buf.Bytes(), ErrHostMismatch
	}
	if len(hosts) == 1 && req.URL.Host != "" && !strings.EqualFold(stripPort(hosts[0]), stripPort(req.URL.Host)) {
		return "", rc.buf.Bytes(), ErrHostMismatch
	}
	return stripPort(req.Host), rc.buf.Bytes(), nil
}

// rawHostHeaders returns the values of every Host header line in a request head.
func rawHostHeaders(b []byte) []string { return rawHeaders(b, "host") }

// rawHeaders returns the values of every header line named name (any case)
// in a request head, as written.
func rawHeaders(b []byte, name string) []string {
	head, _, _ := bytes.Cut(b, []byte("\r\n\r\n"))
	var out []string
	for i, line := range bytes.Split(head, []byte("\r\n")) {
		if i == 0 {
			continue // request line
		}
		k, v, ok := bytes.Cut(line, []byte(":"))
		if ok && strings.EqualFold(string(bytes.TrimSpace(k)), name) {
			out = append(out, string(bytes.TrimSpace(v)))
		}
	}
	return out
}

func stripPort(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return strings.Trim(h, "[]")
	}
	return hostport
}
