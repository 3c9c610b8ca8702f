package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
)

// MaxChunkLineBytes caps a chunk-size or trailer line of a chunked body.
const MaxChunkLineBytes = 4 << 10

// ErrConnect is a CONNECT request on a connection to an origin server.
var ErrConnect = errors.New("HTTP CONNECT is not forwarded")

// ErrAmbiguousBody is a request with both Transfer-Encoding and
// Content-Length.
var ErrAmbiguousBody = errors.New("HTTP request with both Transfer-Encoding and Content-Length")

// HostSwitchError is a request on an allowed HTTP connection that names
// another host than the one the connection was allowed for.
type HostSwitchError struct {
	Host, Allowed string
}

func (e *HostSwitchError) Error() string {
	return fmt.Sprintf("a later request on this connection names host %q, not %q", e.Host, e.Allowed)
}

// forwardRequests copies an HTTP/1.x request stream from br to up byte for
// byte, one request at a time, and checks every request head with check
// (given the host it names): an error stops the copy before that request
// and is returned. Bodies (Content-Length or chunked) pass unchanged; after
// an Upgrade or CONNECT request the rest is not HTTP and is copied as is. It
// returns the bytes written to up.
//
// Checking only the first request of a kept-alive connection would let a
// guest send a second request for any host to the allowed server (domain
// fronting over plain HTTP); clients reuse a connection only for the same
// origin, so nothing legitimate is refused.
func forwardRequests(up io.Writer, br *bufio.Reader, check func(host string) error) (int64, error) {
	cw := &countingWriter{w: up}
	for {
		head, err := readRequestHead(br)
		if err != nil {
			if errors.Is(err, io.EOF) && len(head) == 0 {
				return cw.n, nil // the client is done
			}
			return cw.n, err
		}
		name, req, err := requestHost(head)
		if err != nil {
			return cw.n, err
		}
		if err := check(name); err != nil {
			return cw.n, err
		}
		if req.Method == http.MethodConnect {
			// An origin server has no use for CONNECT; one that refused
			// it would read what follows as requests nobody checked.
			return cw.n, ErrConnect
		}
		if _, err := cw.Write(head); err != nil {
			return cw.n, err
		}
		if req.Header.Get("Upgrade") != "" && headerHasToken(req.Header, "Connection", "upgrade") {
			// After an upgrade the client speaks the new protocol, but the
			// server may have refused it and still read HTTP. What follows
			// is taken for a request (and checked) when it starts like one
			// (a method is upper-case letters; a WebSocket frame's first
			// byte never is one); else it is copied as is.
			next, err := br.Peek(1)
			if err != nil {
				if errors.Is(err, io.EOF) {
					return cw.n, nil
				}
				return cw.n, err
			}
			if next[0] < 'A' || next[0] > 'Z' {
				_, err := io.Copy(cw, br)
				return cw.n, err
			}
			continue
		}
		switch {
		case len(req.TransferEncoding) > 0:
			if !strings.EqualFold(req.TransferEncoding[len(req.TransferEncoding)-1], "chunked") {
				return cw.n, errors.New("request body with a transfer coding other than chunked")
			}
			err = copyChunked(cw, br)
		case req.ContentLength > 0:
			_, err = io.CopyN(cw, br, req.ContentLength)
		}
		if err != nil {
			return cw.n, err
		}
	}
}

// sameHost is the check that every request names host (any case): the
// one the connection was allowed for.
func sameHost(host string) func(string) error {
	return func(name string) error {
		if !strings.EqualFold(name, host) {
			return &HostSwitchError{Host: name, Allowed: host}
		}
		return nil
	}
}

// readRequestHead reads one request head (through its empty line, at most
// MaxRequestHeadBytes), skipping nothing: the bytes are returned as read.
// Empty lines before a request line (RFC 9112 2.2) belong to its head. A
// stream that ends before any byte gives io.EOF.
func readRequestHead(br *bufio.Reader) ([]byte, error) {
	var head []byte
	started := false
	for {
		line, err := readLine(br, MaxRequestHeadBytes-len(head))
		head = append(head, line...)
		if errors.Is(err, io.EOF) && len(head) > 0 {
			return head, io.ErrUnexpectedEOF
		}
		if errors.Is(err, errLineTooLong) {
			return head, errors.New("HTTP request head larger than 16 KiB")
		}
		if err != nil {
			return head, err
		}
		blank := len(bytes.TrimRight(line, "\r\n")) == 0
		if blank && started {
			return head, nil
		}
		if !blank {
			started = true
		}
	}
}

// requestHost parses a request head and returns the host it names (as
// ReadHTTPHost decides it) and the request.
func requestHost(head []byte) (string, *http.Request, error) {
	trimmed := bytes.TrimLeft(head, "\r\n")
	req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(trimmed)))
	if err != nil {
		return "", nil, ErrNotHTTP
	}
	// A body framed two ways is where a server and vmegress could disagree
	// on where the next request starts (request smuggling): refused, as
	// RFC 9112 6.3 lets an intermediary do.
	if len(req.TransferEncoding) > 0 && len(rawHeaders(trimmed, "content-length")) > 0 {
		return "", nil, ErrAmbiguousBody
	}
	hosts := rawHostHeaders(trimmed)
	if len(hosts) > 1 || (len(hosts) == 1 && req.URL.Host != "" && !strings.EqualFold(stripPort(hosts[0]), stripPort(req.URL.Host))) {
		return "", nil, ErrHostMismatch
	}
	return stripPort(req.Host), req, nil
}

// copyChunked copies one chunked body (chunks, last chunk, trailers) raw.
func copyChunked(w io.Writer, br *bufio.Reader) error {
	for {
		line, err := chunkLine(br)
		if err != nil {
			return err
		}
		sizeField, _, _ := strings.Cut(strings.TrimSpace(string(line)), ";")
		size, err := strconv.ParseUint(strings.TrimSpace(sizeField), 16, 63)
		if err != nil {
			return fmt.Errorf("bad chunk size %q", sizeField)
		}
		if _, err := w.Write(line); err != nil {
			return err
		}
		if size == 0 {
			// Trailers up to an empty line.
			for {
				line, err := chunkLine(br)
				if err != nil {
					return err
				}
				if _, err := w.Write(line); err != nil {
					return err
				}
				if len(bytes.TrimRight(line, "\r\n")) == 0 {
					return nil
				}
			}
		}
		if _, err := io.CopyN(w, br, int64(size)); err != nil {
			return err
		}
		crlf, err := chunkLine(br)
		if err != nil {
			return err
		}
		if len(bytes.TrimRight(crlf, "\r\n")) != 0 {
			return errors.New("chunk not followed by CRLF")
		}
		if _, err := w.Write(crlf); err != nil {
			return err
		}
	}
}

var errLineTooLong = errors.New("line too long")

// readLine reads through '\n', at most max bytes (errLineTooLong beyond);
// io.EOF when the stream ends before any byte, io.ErrUnexpectedEOF within
// a line.
func readLine(br *bufio.Reader, max int) ([]byte, error) {
	var out []byte
	for {
		part, err := br.ReadSlice('\n')
		out = append(out, part...)
		if len(out) > max {
			return out, errLineTooLong
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if errors.Is(err, io.EOF) && len(out) > 0 {
			return out, io.ErrUnexpectedEOF
		}
		return out, err
	}
}

// chunkLine is a line of a chunked body: the stream may not end there.
func chunkLine(br *bufio.Reader) ([]byte, error) {
	line, err := readLine(br, MaxChunkLineBytes)
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return line, err
}

func headerHasToken(h http.Header, key, token string) bool {
	for _, v := range h.Values(key) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}
