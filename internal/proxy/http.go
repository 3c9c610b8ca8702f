package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/textproto"
	"strconv"
	"strings"
	"sync"
)

// MaxRequestHeadBytes caps how much is read looking for an HTTP request head
// (beyond what was already buffered).
const MaxRequestHeadBytes = 16 << 10

// Errors of ReadHTTPHost and of the request forwarder. Each is a request
// vmegress refuses (403) whatever its host.
var (
	ErrNotHTTP      = errors.New("not an HTTP/1.x request")
	ErrHostMismatch = errors.New("HTTP request names two hosts (URI and Host header, or two Host headers)")
	// ErrBodyNotAllowed: a server may ignore a body on these methods and
	// read it as the next request, one nobody checked.
	ErrBodyNotAllowed = errors.New("HTTP GET, HEAD, OPTIONS or TRACE request with a body")
	// ErrHostPort: the server would route by a port the connection does
	// not go to.
	ErrHostPort = errors.New("HTTP Host names another port than the connection's")
	// ErrBadTarget: only origin-form ("/path") and http absolute-form
	// request targets are forwarded.
	ErrBadTarget = errors.New("HTTP request target is neither a path nor an http:// URI")
	// ErrBadHost: a Host that is not a host name or address with a port.
	ErrBadHost = errors.New("HTTP Host is not a host name with an optional port")
)

var errHeadTooLarge = errors.New("HTTP request head larger than 16 KiB")

// refusedRequest reports whether err refuses a request that was read
// whole (and gets a 403), not a stream that is not HTTP at all.
func refusedRequest(err error) bool {
	for _, e := range []error{ErrHostMismatch, ErrBodyNotAllowed, ErrHostPort, ErrBadTarget, ErrBadHost, ErrAmbiguousBody, ErrConnect} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// ReadHTTPHost reads from r until it holds a complete HTTP/1.x request head
// (at most MaxRequestHeadBytes) and returns its host, without port, and every
// byte read so the caller can hand them to the request forwarder. The request
// is checked as the forwarder checks every request (see request.validate)
// against port, the connection's destination port (0: any). The caller sets
// any deadline.
func ReadHTTPHost(r io.Reader, port uint16) (string, []byte, error) {
	rc := &recordingConn{r: r}
	hr := &headReader{r: rc, left: -1}
	br := bufio.NewReaderSize(hr, 4096)
	p, err := readRequest(br, hr)
	if err != nil {
		var ne net.Error
		switch {
		case errors.Is(err, errHeadTooLarge):
			return "", rc.buf.Bytes(), err
		case errors.As(rc.readErr, &ne) && ne.Timeout():
			return "", rc.buf.Bytes(), errors.New("no complete HTTP request head before the deadline")
		}
		return "", rc.buf.Bytes(), ErrNotHTTP
	}
	if err := p.validate(port); err != nil {
		return "", rc.buf.Bytes(), err
	}
	return p.name, rc.buf.Bytes(), nil
}

// request is one parsed request: what is checked, and all that is sent.
type request struct {
	*http.Request
	// name is the Host without port, what the policy decides on.
	name string
	// order is the header keys (canonical) in the order they came.
	order []string
	// hosts are the Host header values as sent (net/http drops them).
	hosts []string
	// rawTE and rawCL: the head had Transfer-Encoding or Content-Length
	// (net/http drops the first on HTTP/1.0 and when it frames by it).
	rawTE, rawCL bool
}

// headReader is what a request reader's bufio.Reader reads from: while
// left >= 0 at most left more bytes, and what is read is recorded into rec
// when it is set.
type headReader struct {
	r    io.Reader
	left int64
	rec  []byte
	on   bool
}

func (h *headReader) Read(p []byte) (int, error) {
	if h.left == 0 {
		return 0, io.EOF
	}
	if h.left > 0 && int64(len(p)) > h.left {
		p = p[:h.left]
	}
	n, err := h.r.Read(p)
	if h.left > 0 {
		h.left -= int64(n)
	}
	if h.on {
		h.rec = append(h.rec, p[:n]...)
	}
	return n, err
}

// readRequest reads one request head from br, which reads from hr, with
// net/http's parser. Empty lines before it (RFC 9112 2.2) are skipped and
// never forwarded. At most MaxRequestHeadBytes more than br already holds
// are read. A stream that ends before a request starts gives io.EOF.
func readRequest(br *bufio.Reader, hr *headReader) (*request, error) {
	hr.left, hr.on = MaxRequestHeadBytes, true
	hr.rec = append(hr.rec[:0], peekBuffered(br)...)
	defer func() { hr.left, hr.on, hr.rec = -1, false, nil }()
	skipped := 0
	for {
		b, err := br.Peek(1)
		if err != nil {
			if hr.left == 0 {
				return nil, errHeadTooLarge
			}
			if errors.Is(err, io.EOF) {
				return nil, io.EOF // nothing but empty lines, if anything
			}
			return nil, err
		}
		if b[0] != '\r' && b[0] != '\n' {
			break
		}
		br.Discard(1)
		skipped++
	}
	req, err := http.ReadRequest(br)
	if err != nil {
		if hr.left == 0 {
			return nil, errHeadTooLarge
		}
		return nil, fmt.Errorf("%w: %v", ErrNotHTTP, err)
	}
	head := hr.rec[skipped : len(hr.rec)-br.Buffered()]
	p := &request{Request: req}
	// The head parsed again, only for what net/http does not keep: the
	// order of the keys and the headers it consumed. It was accepted by
	// net/http, so its lines are "key: value" and end in LF.
	seen := map[string]bool{}
	lines := strings.Split(string(head), "\n")
	for _, line := range lines[1:] {
		k, v, ok := strings.Cut(strings.TrimSuffix(line, "\r"), ":")
		if !ok {
			continue
		}
		// Detection is by the trimmed name: "Transfer-Encoding :" is not
		// a header to net/http, but may be one to a server. The key as
		// net/http stores it (a name with a space is kept as is, and
		// refused when written) gives the order.
		switch textproto.CanonicalMIMEHeaderKey(strings.TrimSpace(k)) {
		case "Host":
			p.hosts = append(p.hosts, strings.TrimSpace(v))
		case "Transfer-Encoding":
			p.rawTE = true
		case "Content-Length":
			p.rawCL = true
		}
		k = textproto.CanonicalMIMEHeaderKey(k)
		if !seen[k] {
			seen[k] = true
			p.order = append(p.order, k)
		}
	}
	name, _, _ := splitHost(req.Host)
	p.name = name
	p.dropHTTPUpgrade()
	return p, nil
}

// dropHTTPUpgrade removes the upgrade tokens that switch the connection to
// another version of HTTP (h2c, HTTP/x): once a server switched, every
// HTTP/2 stream names its own host and none of them is checked. The server
// answers in HTTP/1.1 instead (RFC 9110 7.8: it may ignore Upgrade). Other
// upgrades (WebSocket) stay.
func (p *request) dropHTTPUpgrade() {
	vals := p.Header.Values("Upgrade")
	if len(vals) == 0 {
		return
	}
	var keep []string
	dropped := false
	for _, v := range vals {
		for _, tok := range strings.Split(v, ",") {
			tok = strings.TrimSpace(tok)
			switch {
			case tok == "":
			case strings.EqualFold(tok, "h2c") || len(tok) >= 5 && strings.EqualFold(tok[:5], "HTTP/"):
				dropped = true
			default:
				keep = append(keep, tok)
			}
		}
	}
	if !dropped {
		return
	}
	p.Header.Del("Http2-Settings")
	if len(keep) > 0 {
		p.Header["Upgrade"] = []string{strings.Join(keep, ", ")}
		return
	}
	p.Header.Del("Upgrade")
	// Connection no longer names an upgrade (nor HTTP2-Settings).
	var conn []string
	for _, v := range p.Header.Values("Connection") {
		for _, tok := range strings.Split(v, ",") {
			tok = strings.TrimSpace(tok)
			if tok != "" && !strings.EqualFold(tok, "upgrade") && !strings.EqualFold(tok, "http2-settings") {
				conn = append(conn, tok)
			}
		}
	}
	p.Header.Del("Connection")
	if len(conn) > 0 {
		p.Header["Connection"] = []string{strings.Join(conn, ", ")}
	}
}

func peekBuffered(br *bufio.Reader) []byte {
	b, _ := br.Peek(br.Buffered())
	return b
}

// upgrade reports whether the request asks the server to switch protocols.
// Any Upgrade header counts: what follows is held back until the server
// has answered, whatever Connection says.
func (p *request) upgrade() bool { return len(p.Header.Values("Upgrade")) > 0 }

// chunked reports whether the body is framed by chunks.
func (p *request) chunked() bool { return len(p.TransferEncoding) > 0 }

// validate refuses what a server could read otherwise than vmegress did,
// and what an origin server has no use for. port is the connection's
// destination port (0: any).
func (p *request) validate(port uint16) error {
	if p.ProtoMajor != 1 || p.ProtoMinor > 1 {
		return ErrNotHTTP
	}
	if p.Method == http.MethodConnect {
		// An origin server has no use for CONNECT; one that refused it
		// would read what follows as requests nobody checked.
		return ErrConnect
	}
	switch u := p.URL; {
	case strings.HasPrefix(p.RequestURI, "/"):
	case p.RequestURI == "*" && p.Method == http.MethodOptions:
	case strings.EqualFold(u.Scheme, "http") && u.Host != "" && u.User == nil && u.Opaque == "":
		for _, h := range p.hosts {
			if !strings.EqualFold(stripPort(h), stripPort(u.Host)) {
				return ErrHostMismatch
			}
		}
	default:
		return ErrBadTarget
	}
	if len(p.hosts) > 1 {
		return ErrHostMismatch
	}
	_, hport, ok := splitHost(p.Host)
	if !ok {
		return ErrBadHost
	}
	if port != 0 && hport != "" && hport != strconv.Itoa(int(port)) {
		return ErrHostPort
	}
	// A body framed two ways is where a server and vmegress could disagree
	// on where the next request starts (request smuggling): refused, as
	// RFC 9112 6.3 lets an intermediary do. So is Transfer-Encoding on
	// HTTP/1.0, which net/http ignores and a server may not.
	if p.rawTE && (p.rawCL || !p.chunked()) {
		return ErrAmbiguousBody
	}
	if p.ContentLength < 0 && !p.chunked() {
		return ErrNotHTTP
	}
	switch p.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		if p.rawTE || p.ContentLength > 0 {
			return ErrBodyNotAllowed
		}
	}
	return nil
}

// splitHost splits a Host value into name and port and says whether it is
// a host name (letters, digits, '-', '_', '.') or a bracketed IPv6 address,
// with an optional decimal port.
func splitHost(h string) (name, port string, ok bool) {
	name = h
	if i := strings.LastIndexByte(h, ':'); i >= 0 && !strings.HasSuffix(h, "]") {
		name, port = h[:i], h[i+1:]
		if port == "" || len(port) > 5 {
			return name, port, false
		}
		for _, c := range port {
			if c < '0' || c > '9' {
				return name, port, false
			}
		}
	}
	if strings.HasPrefix(name, "[") && strings.HasSuffix(name, "]") {
		ip := net.ParseIP(name[1 : len(name)-1])
		return strings.Trim(name, "[]"), port, ip != nil && ip.To4() == nil
	}
	if name == "" {
		return name, port, false
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return name, port, false
		}
	}
	return name, port, true
}

// write sends the request as checked, re-serialized: request line with an
// origin-form target, exactly one Host, the other headers in the order they
// came with the values net/http parsed, CRLF line ends, and the body framed
// as net/http framed it (Content-Length, or chunked re-encoded). Nothing of
// the client's raw bytes is copied but the body's content.
func (p *request) write(w io.Writer) error {
	target := p.RequestURI
	if !strings.HasPrefix(target, "/") && target != "*" {
		target = p.URL.RequestURI() // absolute-form: its host is Host
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/%d.%d\r\nHost: %s\r\n", p.Method, target, p.ProtoMajor, p.ProtoMinor, p.Host)
	for _, k := range p.order {
		switch k {
		case "Host", "Content-Length", "Transfer-Encoding":
			continue
		}
		for _, v := range p.Header[k] {
			if err := writeField(&b, k, v); err != nil {
				return err
			}
		}
	}
	switch {
	case p.chunked():
		b.WriteString("Transfer-Encoding: chunked\r\n")
	case p.ContentLength > 0 || p.rawCL:
		fmt.Fprintf(&b, "Content-Length: %d\r\n", p.ContentLength)
	}
	b.WriteString("\r\n")
	if _, err := w.Write(b.Bytes()); err != nil {
		return err
	}
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	switch {
	case p.chunked():
		cw := httputil.NewChunkedWriter(w)
		if _, err := io.CopyBuffer(writerOnly{cw}, p.Body, *bp); err != nil {
			return fmt.Errorf("reading a chunked request body: %w", err)
		}
		cw.Close() // the last chunk; the empty line follows
		// Trailer fields are never sent: nothing checks them (a Host or
		// Content-Length among them is for a server to misread), and
		// Envoy's HTTP/1 codec drops them too.
		_, err := io.WriteString(w, "\r\n")
		return err
	case p.ContentLength > 0:
		n, err := io.CopyBuffer(writerOnly{w}, p.Body, *bp)
		if err == nil && n != p.ContentLength {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	return nil
}

func writeField(b *bytes.Buffer, k, v string) error {
	if strings.ContainsAny(k, "\r\n\x00: ") || strings.ContainsAny(v, "\r\n\x00") {
		return fmt.Errorf("%w: a header field holds a line break", ErrNotHTTP)
	}
	b.WriteString(k)
	b.WriteString(": ")
	b.WriteString(v)
	b.WriteString("\r\n")
	return nil
}

// writerOnly hides a writer's ReadFrom, so io.CopyBuffer uses the pooled
// buffer it is given.
type writerOnly struct{ io.Writer }

var readerPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4096) }}

func stripPort(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return strings.Trim(h, "[]")
	}
	return hostport
}
