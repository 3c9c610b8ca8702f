package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"
)

// ErrConnect is a CONNECT request on a connection to an origin server.
var ErrConnect = errors.New("HTTP CONNECT is not forwarded")

// ErrAmbiguousBody is a request whose body framing a server could read
// otherwise: both Transfer-Encoding and Content-Length, or
// Transfer-Encoding on HTTP/1.0.
var ErrAmbiguousBody = errors.New("HTTP request with both Transfer-Encoding and Content-Length")

// HostSwitchError is a request on an allowed HTTP connection that names
// another host than the one the connection was allowed for.
type HostSwitchError struct {
	Host, Allowed string
}

func (e *HostSwitchError) Error() string {
	return fmt.Sprintf("a later request on this connection names host %q, not %q", e.Host, e.Allowed)
}

// maxPipelined bounds the requests sent upstream and not yet answered; the
// client's next request waits beyond it.
const maxPipelined = 16

// exchange is one request sent upstream, until its final answer.
type exchange struct {
	method  string
	upgrade bool
	// status is the final status, set before done is closed.
	status int
	done   chan struct{}
}

// requestStream forwards an HTTP/1.x request stream upstream, one request
// at a time: each is parsed by net/http, checked, and re-serialized (see
// request.write), so the server reads exactly the requests that were
// checked. An error stops the stream before the request it is about.
//
// Checking only the first request of a kept-alive connection would let a
// guest send a second request for any host to the allowed server (domain
// fronting over plain HTTP); clients reuse a connection only for the same
// origin, so nothing legitimate is refused.
type requestStream struct {
	// port is the connection's destination port: a Host naming another
	// is refused (0: any).
	port uint16
	// check is asked about every request's host (without port).
	check func(host string) error
	// sent registers a request before it is written upstream (nil: none).
	sent func(*exchange)
	// switched waits for the server's answer to an upgrade request and
	// says whether it was 101 Switching Protocols (nil: never).
	switched func(*exchange) bool
	// readable waits until the source has bytes or has ended (eof),
	// holding no buffer (nil: do not wait).
	readable func() (eof bool, err error)
	// checked sees every request that passed, before it is written (tests).
	checked func(*request)
}

// forward reads requests from src and writes them to up until src ends
// (nil error), a request is refused (its error), or the server switched
// protocols (switched true: tail is what was read past the upgrade request,
// to be sent raw with the rest of src). n counts the bytes written to up.
func (s *requestStream) forward(up io.Writer, src io.Reader) (n int64, tail []byte, switched bool, err error) {
	cw := &countingWriter{w: up}
	hr := &headReader{r: src, left: -1}
	var br *bufio.Reader
	defer func() {
		if br != nil {
			br.Reset(nil)
			readerPool.Put(br)
		}
	}()
	for {
		if br == nil || br.Buffered() == 0 {
			// Idle between requests: no buffer is held while waiting.
			if br != nil {
				br.Reset(nil)
				readerPool.Put(br)
				br = nil
			}
			if s.readable != nil {
				eof, err := s.readable()
				if err != nil || eof {
					return cw.n, nil, false, err
				}
			}
			br = readerPool.Get().(*bufio.Reader)
			br.Reset(hr)
		}
		p, err := readRequest(br, hr)
		if errors.Is(err, io.EOF) {
			return cw.n, nil, false, nil // the client is done
		}
		if err != nil {
			return cw.n, nil, false, err
		}
		if err := p.validate(s.port); err != nil {
			return cw.n, nil, false, err
		}
		if err := s.check(p.name); err != nil {
			return cw.n, nil, false, err
		}
		if s.checked != nil {
			s.checked(p)
		}
		x := &exchange{method: p.Method, upgrade: p.upgrade(), done: make(chan struct{})}
		if s.sent != nil {
			s.sent(x)
		}
		if err := p.write(cw); err != nil {
			return cw.n, nil, false, err
		}
		if x.upgrade && s.switched != nil && s.switched(x) {
			return cw.n, append([]byte(nil), peekBuffered(br)...), true, nil
		}
		// Refused or answered otherwise: the server still reads HTTP, and
		// so does this loop.
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

// responseStream passes the server's bytes to the client unchanged while
// reading them as HTTP responses, one final response per exchange in the
// order the requests went, to learn each answer (an upgrade goes raw only
// on 101).
type responseStream struct {
	pending chan *exchange
	// lost is closed when the responses are no longer followed (the
	// stream ended, switched protocols or is not HTTP).
	lost chan struct{}
	// readable: as requestStream's, on the server's side.
	readable func() (eof bool, err error)
}

func newResponseStream() *responseStream {
	return &responseStream{pending: make(chan *exchange, maxPipelined), lost: make(chan struct{})}
}

// sent registers x (requestStream.sent); it waits while maxPipelined
// requests are unanswered.
func (r *responseStream) sent(x *exchange) {
	select {
	case r.pending <- x:
	case <-r.lost:
	}
}

// answered waits for x's final answer and returns its status (0: none will
// come, or stop was closed first).
func (r *responseStream) answered(x *exchange, stop <-chan time.Time) int {
	select {
	case <-x.done:
		return x.status
	case <-r.lost:
	case <-stop:
	}
	select {
	case <-x.done: // done is closed before lost
		return x.status
	default:
		return 0
	}
}

// forward copies up to client until the server ends (nil error) or is no
// longer followed (raw true: the rest is to be copied as is). Bytes reach
// the client as soon as they are read; a response's Content-Length body
// goes by copyN, straight from up (spliced when both are sockets).
func (r *responseStream) forward(client *guardedWriter, up io.Reader) (n int64, raw bool, err error) {
	defer close(r.lost)
	cw := &countingWriter{w: client}
	tee := &teeReader{r: up, w: cw}
	var br *bufio.Reader
	defer func() {
		if br != nil {
			br.Reset(nil)
			readerPool.Put(br)
		}
	}()
	for {
		if br == nil || br.Buffered() == 0 {
			if br != nil {
				br.Reset(nil)
				readerPool.Put(br)
				br = nil
			}
			if r.readable != nil {
				eof, err := r.readable()
				if err != nil || eof {
					return cw.n, false, err
				}
			}
			br = readerPool.Get().(*bufio.Reader)
			br.Reset(tee)
		}
		if _, err := br.Peek(1); err != nil {
			if errors.Is(err, io.EOF) {
				return cw.n, false, nil // the server closed between responses
			}
			return cw.n, false, err
		}
		// The server spoke: the answer to the oldest request (or to none).
		var x *exchange
		select {
		case x = <-r.pending:
		default:
		}
		method := http.MethodGet
		if x != nil {
			method = x.method
		}
		status, raw, err := r.response(br, client, cw, up, method)
		if x != nil && err == nil {
			x.status = status
			close(x.done)
		}
		if errors.Is(err, errClientClosed) {
			return cw.n, false, err
		}
		if err != nil {
			return cw.n, true, nil // not HTTP (or cut short): the rest goes as is
		}
		if raw {
			return cw.n, true, nil
		}
	}
}

// response reads one final response (and the interim ones before it) to a
// request with method, and its body. raw: what follows is not HTTP (101,
// or a body that lasts until the server closes).
func (r *responseStream) response(br *bufio.Reader, client *guardedWriter, cw *countingWriter, up io.Reader, method string) (status int, raw bool, err error) {
	for {
		resp, err := http.ReadResponse(br, &http.Request{Method: method})
		if err != nil {
			return 0, false, err
		}
		code := resp.StatusCode
		switch {
		case code == http.StatusSwitchingProtocols:
			return code, true, nil
		case code >= 100 && code < 200:
			continue // interim (100 Continue, 103 Early Hints)
		case method == http.MethodHead || code == http.StatusNoContent || code == http.StatusNotModified:
			return code, false, nil
		case len(resp.TransferEncoding) > 0:
			_, err := io.Copy(io.Discard, resp.Body) // through tee: to the client
			return code, false, err
		case resp.ContentLength > 0:
			rest := resp.ContentLength
			k := min(int64(br.Buffered()), rest)
			br.Discard(int(k)) // already at the client
			rest -= k
			if rest > 0 {
				m, err := client.copyN(up, rest)
				cw.n += m
				if err == nil && m < rest {
					err = io.ErrUnexpectedEOF
				}
				return code, false, err
			}
			return code, false, nil
		case resp.ContentLength == 0:
			return code, false, nil
		default:
			return code, true, nil // until the server closes
		}
	}
}

// teeReader writes to w what it reads from r before returning it.
type teeReader struct {
	r io.Reader
	w io.Writer
}

func (t *teeReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if n > 0 {
		if _, werr := t.w.Write(p[:n]); werr != nil {
			return n, werr
		}
	}
	return n, err
}

// errClientClosed: the client's side was closed with a refusal.
var errClientClosed = errors.New("client connection closed after a refusal")

// guardedWriter is the client's side, written by the response stream and,
// once, by a refusal: never both at once.
type guardedWriter struct {
	mu     sync.Mutex
	w      io.Writer
	closed bool
}

func (g *guardedWriter) Write(b []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return 0, errClientClosed
	}
	return g.w.Write(b)
}

// copyN copies n bytes of src to the client.
func (g *guardedWriter) copyN(src io.Reader, n int64) (int64, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return 0, errClientClosed
	}
	return io.Copy(g.w, io.LimitReader(src, n))
}

// last writes b, and nothing is written after it.
func (g *guardedWriter) last(b []byte) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errClientClosed
	}
	g.closed = true
	_, err := g.w.Write(b)
	return err
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
