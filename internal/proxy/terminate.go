package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/secrets"
)

// Termination is what the proxy needs to terminate TLS for https rules and
// to read plain-HTTP requests one by one for http rules with methods, paths
// or inject. Without it (Proxy.Termination nil) such connections are refused.
type Termination struct {
	// Leaf issues the certificate the guest is shown for a name (the
	// vmegress CA's tlsca.CA.Leaf).
	Leaf func(name string) (*tls.Certificate, error)
	// Secret reads a secret's value for ${secret:NAME} (secrets.Store.Get).
	// Its errors must not carry the value. Nil: every secret is missing.
	Secret func(name string) (string, error)
	// UpstreamRoots verify upstream servers (the host's roots plus
	// upstream_ca_file); nil: the host's roots.
	UpstreamRoots *x509.CertPool
}

// Timeouts of terminated connections.
const (
	// termHeaderTimeout bounds the wait for a request head on a terminated
	// connection.
	termHeaderTimeout = 30 * time.Second
	// termIdleTimeout closes a terminated connection idle between requests.
	termIdleTimeout = 5 * time.Minute
	// termMaxHeaderBytes caps a request head (net/http's default is 1 MiB).
	termMaxHeaderBytes = 64 << 10
	// termFlushInterval bounds how long a response's bytes of known
	// length wait in the guest connection's buffer (a head whose body is
	// slow to come, a body coming in pieces): short enough not to be
	// seen, long enough that a response read at once leaves in one write.
	termFlushInterval = 5 * time.Millisecond
)

// terminates reports whether an allowed connection is read request by
// request: the name stage allowed it (enforced, not audit) by a rule that
// reads requests.
func (p *Proxy) terminates(pr *policy.Project, e *entry, inspect policy.Inspect) bool {
	return e.d.Verdict == policy.Allow && inspect != policy.InspectNone && e.kind != policy.KindNone &&
		pr.Terminates(e.kind, e.name, e.dst.Port())
}

// serveTerminated serves one connection whose requests are each decided by
// the policy: for TLS it answers the guest's handshake with a certificate
// of the vmegress CA for the server name, and forwards over TLS verified
// against UpstreamRoots; for plain HTTP it forwards in plain HTTP. Upstream
// connections go to target with the proxy's dialer, made only when a first
// request is allowed.
//
// When the handshake fails it logs the connection and returns false (the
// caller releases it). Otherwise it hands the connection to the proxy's
// one HTTP server for terminated connections (termServer) and returns true
// at once: the handler's goroutine, whose stack grew in the handshake,
// ends, and the connection lives on the server's goroutine for it alone.
// When the connection is over, release is called after it was logged.
func (p *Proxy) serveTerminated(ctx context.Context, c *net.TCPConn, e *entry, prefix []byte, target netip.AddrPort, release func()) (detached bool) {
	t := p.Termination
	if t == nil {
		e.d.Verdict, e.d.Reason = verdictError, "the rule reads requests but TLS termination is not set up in this data plane"
		p.refuse(c, e, refuseReset)
		return false
	}
	tlsMode := e.kind == policy.KindTLS
	name := dnsName(e.name)
	guest := &countedConn{Conn: c, prefix: prefix, name: name}
	var conn net.Conn = guest
	if tlsMode {
		tc := tls.Server(guest, p.guestTLS())
		// Bounded by a deadline, not a context: HandshakeContext starts
		// a goroutine per handshake to watch the context. The proxy's
		// stop is seen all the same: it closes every accepted connection.
		c.SetDeadline(time.Now().Add(p.helloTimeout()))
		err := tc.Handshake()
		c.SetDeadline(time.Time{})
		if err != nil {
			// A guest that does not trust the CA ends here: nothing was
			// dialled.
			e.d.Verdict, e.d.Reason = verdictError, fmt.Sprintf("TLS handshake with the guest failed (does the guest trust the vmegress CA? `vmegress ca cert`): %v", err)
			c.Close()
			p.logEntry(e)
			return false
		}
		conn = tc
	}
	e.upstream = target.String()
	p.mu.Lock()
	e.established.Store(true)
	p.mu.Unlock()

	// Upstream connections come from the pool of this project, address
	// and name (pool.go): another guest connection of the project to the
	// same name may reuse them, nobody else.
	var tr *http.Transport
	var poolRelease func(time.Time)
	mk := func() *upstream { return p.termTransport(t, name, target, tlsMode) }
	if pr := p.policy.Load().Project(e.d.Project); pr != nil {
		tr, poolRelease = p.pool.get(poolKey{project: pr.Name, target: target, name: name, tls: tlsMode}, pr, p.now(), mk)
	} else {
		u := mk() // the project went meanwhile: used for this connection only
		tr, poolRelease = u.Transport, func(time.Time) { u.close() }
	}
	h := &termHandler{p: p, t: t, e: e, tls: tlsMode, name: name, tr: tr,
		src: e.src.String(), dst: e.dst.String(), sni: nameIf(e, policy.KindTLS)}
	h.finish = func() {
		conn.Close()
		e.up, e.down = guest.in.Load(), guest.out.Load()
		poolRelease(p.now())
		p.logEntry(e)
		release()
		p.track(c, nil)
		p.wg.Done()
	}
	p.wg.Add(1) // done in finish: Serve waits for the connection
	p.termServer(ctx).serve(conn, h)
	return true
}

// termServers holds the proxy's HTTP server for terminated connections
// and the guest-facing TLS configuration they share.
type termServers struct {
	mu  sync.Mutex
	cur *termServer

	tlsOnce sync.Once
	tls     *tls.Config
}

// sessionNameTag marks a TLS session with the server name it was made
// for (SessionState.Extra).
const sessionNameTag = "vmegress-server-name="

// guestTLS is the TLS configuration the guest's handshakes are answered
// with, one for all terminated connections: the certificate for the name
// the connection was decided for (a ClientHello naming another is refused),
// and session tickets under keys of its own, so a guest that resumes skips
// the certificate and key exchange. A session resumes only for the server
// name it was made for: the name is sealed in the ticket and compared.
func (p *Proxy) guestTLS() *tls.Config {
	p.term.tlsOnce.Do(func() {
		cfg := &tls.Config{
			MinVersion: tls.VersionTLS12,
			// The guest is on this host's TAP, never on a network where
			// its traffic could be recorded for later decryption: the
			// classical groups (what Envoy offers by default), not
			// X25519MLKEM768, whose key exchange costs as much as the
			// rest of the handshake. Upstream keeps Go's defaults.
			CurvePreferences: []tls.CurveID{tls.X25519, tls.CurveP256},
			NextProtos:       []string{"h2", "http/1.1"},
		}
		// Called for every ClientHello, resumed or not.
		cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			gc, ok := hello.Conn.(*countedConn)
			if !ok || dnsName(hello.ServerName) != gc.name {
				return nil, fmt.Errorf("server name %q is not the one decided", hello.ServerName)
			}
			return nil, nil // cfg itself
		}
		cfg.GetCertificate = func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			return p.Termination.Leaf(dnsName(hello.ServerName)) // checked above
		}
		cfg.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
			ss.Extra = append(ss.Extra, []byte(sessionNameTag+dnsName(cs.ServerName)))
			return cfg.EncryptTicket(cs, ss)
		}
		cfg.UnwrapSession = func(ticket []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
			ss, err := cfg.DecryptTicket(ticket, cs)
			if err != nil || ss == nil {
				return nil, err
			}
			want := sessionNameTag + dnsName(cs.ServerName)
			for _, x := range ss.Extra {
				if string(x) == want {
					return ss, nil
				}
			}
			return nil, nil // another name's session: a full handshake
		}
		p.term.tls = cfg
	})
	return p.term.tls
}

// termServer is one http.Server (HTTP/1.1, and HTTP/2 by ALPN) serving
// every terminated connection of a Proxy.Serve: a connection costs the
// server's goroutine for it and its buffers, not a server, a reverse proxy
// and a goroutine of its own. Connections are handed to it through a
// listener; each one's handler state is found by the connection.
type termServer struct {
	srv   *http.Server
	rp    *httputil.ReverseProxy
	ln    *chanListener
	conns sync.Map // net.Conn as handed to srv → *termHandler
}

// termHandlerKey carries a connection's *termHandler in its context.
type termHandlerKey struct{}

// termServer returns the running server for terminated connections,
// starting one (stopped when ctx is done) if there is none.
func (p *Proxy) termServer(ctx context.Context) *termServer {
	p.term.mu.Lock()
	defer p.term.mu.Unlock()
	if s := p.term.cur; s != nil && !s.ln.isClosed() {
		return s
	}
	s := &termServer{ln: newChanListener()}
	s.srv = &http.Server{
		Handler:           http.HandlerFunc(serveTermRequest),
		ReadHeaderTimeout: termHeaderTimeout,
		IdleTimeout:       termIdleTimeout,
		MaxHeaderBytes:    termMaxHeaderBytes,
		ErrorLog:          log.New(io.Discard, "", 0),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			h, _ := s.conns.Load(c)
			return context.WithValue(ctx, termHandlerKey{}, h)
		},
		ConnState: func(c net.Conn, st http.ConnState) {
			if st != http.StateClosed && st != http.StateHijacked {
				return
			}
			if h, ok := s.conns.LoadAndDelete(c); ok {
				h.(*termHandler).serverDone()
			}
		},
	}
	s.rp = &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			h := handlerOf(r.In)
			r.Out.URL.Scheme = "http"
			if h.tls {
				r.Out.URL.Scheme = "https"
			}
			r.Out.URL.Host = h.name
			r.Out.Host = r.In.Host // checked: the connection's name
		},
		Transport:  termRoundTripper{},
		BufferPool: &copyBuffers{},
		// Streams (server-sent events, bodies of unknown length) are
		// flushed after every write whatever this says; a body of known
		// length is flushed at most termFlushInterval after a write. Not
		// -1 (flush every write): that flushed the head on a timer's
		// goroutine at once, and then the body: two TLS records, two
		// writes and a goroutine per request where one write does.
		FlushInterval: termFlushInterval,
		ErrorLog:      log.New(io.Discard, "", 0),
		// w is always the statusWriter ServeHTTP was given.
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			handlerOf(r).upstreamError(w, err)
		},
	}
	p.term.cur = s
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		s.srv.Serve(s.ln) // returns when the listener closes
	}()
	context.AfterFunc(ctx, s.ln.close)
	return s
}

// handlerOf is the termHandler of a request's connection (the server's
// ConnContext put it there; every connection is stored before it is handed
// to the server).
func handlerOf(r *http.Request) *termHandler {
	return r.Context().Value(termHandlerKey{}).(*termHandler)
}

// copyBufferSize is the reverse proxy's body copy buffer (its default).
const copyBufferSize = 32 << 10

// copyBuffers lends the reverse proxy its body copy buffers: without it,
// it allocates one per request, most of a request's garbage.
type copyBuffers struct{ p sync.Pool }

func (b *copyBuffers) Get() []byte {
	if v, ok := b.p.Get().(*[]byte); ok {
		return *v
	}
	return make([]byte, copyBufferSize)
}

func (b *copyBuffers) Put(buf []byte) {
	if cap(buf) == copyBufferSize {
		buf = buf[:copyBufferSize]
		b.p.Put(&buf)
	}
}

// termRoundTripper sends a request on its connection's pooled transport.
type termRoundTripper struct{}

func (termRoundTripper) RoundTrip(r *http.Request) (*http.Response, error) {
	return handlerOf(r).tr.RoundTrip(r)
}

// serve hands c to the server; h's finish runs when it is over.
func (s *termServer) serve(c net.Conn, h *termHandler) {
	h.rp = s.rp
	s.conns.Store(c, h)
	if !s.ln.push(c) {
		// The proxy is stopping: the server takes no more connections.
		s.conns.Delete(c)
		h.serverDone()
	}
}

// serveTermRequest is the terminated connections' handler: it finds the
// connection's termHandler in the request's context.
func serveTermRequest(w http.ResponseWriter, r *http.Request) { handlerOf(r).ServeHTTP(w, r) }

// chanListener hands out the connections pushed to it until closed.
type chanListener struct {
	ch     chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func newChanListener() *chanListener {
	return &chanListener{ch: make(chan net.Conn), closed: make(chan struct{})}
}

// push hands c to Accept; false once the listener is closed.
func (l *chanListener) push(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.closed:
		return false
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) close() { l.once.Do(func() { close(l.closed) }) }

func (l *chanListener) isClosed() bool {
	select {
	case <-l.closed:
		return true
	default:
		return false
	}
}

func (l *chanListener) Close() error { l.close(); return nil }

func (l *chanListener) Addr() net.Addr { return &net.TCPAddr{} }

// termTransport is the upstream side of the terminated connections of one
// pool key: every connection it makes goes to target through the proxy's
// dialer (the upstream mark), and TLS is verified for name against the
// roots. It keeps at most poolMaxIdlePerKey idle connections, each for at
// most poolIdleTimeout.
func (p *Proxy) termTransport(t *Termination, name string, target netip.AddrPort, tlsMode bool) *upstream {
	u := &upstream{}
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		dctx, cancel := context.WithTimeout(ctx, DefaultDialTimeout)
		defer cancel()
		c, err := p.dial(dctx, target.String())
		if err != nil {
			return nil, fmt.Errorf("dialing upstream %s: %w", target, err)
		}
		return u.track(c)
	}
	tr := &http.Transport{
		Proxy:               nil, // never an environment proxy
		DialContext:         dial,
		DisableCompression:  true, // the guest's Accept-Encoding, as sent
		MaxIdleConns:        poolMaxIdlePerKey,
		MaxIdleConnsPerHost: poolMaxIdlePerKey,
		IdleConnTimeout:     poolIdleTimeout,
		TLSHandshakeTimeout: DefaultDialTimeout,
	}
	if tlsMode {
		// The Transport does TLS over the dialled connection, offering h2
		// by ALPN except for requests that need HTTP/1.1 (WebSocket).
		tr.ForceAttemptHTTP2 = true
		tr.TLSClientConfig = &tls.Config{
			ServerName: name,
			RootCAs:    t.UpstreamRoots, // never InsecureSkipVerify
			MinVersion: tls.VersionTLS12,
		}
	}
	u.Transport = tr
	return u
}

// termHandler decides and forwards each request of one terminated
// connection, and finishes the connection once the server is done with it
// and no request of it is being handled (an upgraded exchange goes on in
// its handler after the server let go of the connection).
type termHandler struct {
	p    *Proxy
	t    *Termination
	e    *entry
	tls  bool
	name string
	tr   *http.Transport
	rp   *httputil.ReverseProxy // the server's
	// finish closes, logs and releases the connection; run once.
	finish func()
	// src, dst and sni of the connection's access-log lines, formatted
	// once for all its requests.
	src, dst, sni string

	mu       sync.Mutex
	handlers int  // requests being handled
	over     bool // the server closed the connection or let go of it
	finished bool
}

// enter and leave bracket a request's handling.
func (h *termHandler) enter() {
	h.mu.Lock()
	h.handlers++
	h.mu.Unlock()
}

func (h *termHandler) leave() {
	h.mu.Lock()
	h.handlers--
	h.mu.Unlock()
	h.maybeFinish()
}

// serverDone: the server closed the connection or let go of it (hijack).
func (h *termHandler) serverDone() {
	h.mu.Lock()
	h.over = true
	h.mu.Unlock()
	h.maybeFinish()
}

func (h *termHandler) maybeFinish() {
	h.mu.Lock()
	done := h.over && h.handlers == 0 && !h.finished
	if done {
		h.finished = true
	}
	h.mu.Unlock()
	if done {
		h.finish()
	}
}

func (h *termHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.enter()
	defer h.leave()
	start := h.p.now()
	// The log line and the status writer are one allocation.
	sw := &statusWriter{ResponseWriter: w}
	rl := &sw.line
	rl.method, rl.host, rl.path = r.Method, r.Host, r.URL.Path
	kind := policy.KindHTTP
	if h.tls {
		kind = policy.KindTLS
	}
	pol := h.p.policy.Load()
	pr := pol.ProjectFor(h.e.src.Addr())
	switch {
	case pr == nil:
		rl.d = policy.Decision{Verdict: policy.Deny, Reason: "source address is in no project"}
	case r.Method == http.MethodConnect:
		rl.d = policy.Decision{Verdict: policy.Deny, Project: pr.Name, Reason: "CONNECT is never forwarded to an origin server"}
	default:
		rd := pr.DecideRequest(policy.Request{Kind: kind, Name: h.name, Port: h.e.dst.Port(), Host: r.Host,
			Method: r.Method, Path: r.URL.Path, EscapedPath: r.URL.EscapedPath(), MethodOverrides: methodOverrides(r.Header), RawQuery: r.URL.RawQuery})
		rl.d = rd.Decision
		if rl.d.Verdict != policy.Allow && pr.Audit {
			rl.d.Verdict = WouldDeny // forwarded as is, nothing injected
		}
		if rl.d.Verdict == policy.Allow && rd.NoBodyOverride && formBody(r) {
			sw.scan = &overrideScanner{r: r.Body}
			r.Body = sw.scan
		}
		if rl.d.Verdict == policy.Allow {
			if err := h.inject(r, rd.Inject); err != nil {
				rl.d.Verdict, rl.d.Reason = verdictError, err.Error()
				rl.status = http.StatusBadGateway
				writeText(w, rl.status, fmt.Sprintf("vmegress: project %s: %v\n", rl.d.Project, err))
				h.log(rl, start)
				return
			}
		}
	}
	if rl.d.Verdict != policy.Allow && rl.d.Verdict != WouldDeny {
		rl.status = http.StatusForbidden
		w.Header().Set("X-Vmegress-Project", rl.d.Project)
		writeText(w, rl.status, fmt.Sprintf("vmegress: egress policy of project %s refused %s %s%s: %s\n", rl.d.Project, r.Method, h.name, rl.path, rl.d.Reason))
		h.log(rl, start)
		return
	}
	dropProtocolSwitch(r.Header)
	h.rp.ServeHTTP(sw, r)
	if rl.status == 0 {
		rl.status = sw.status
	}
	h.log(rl, start)
}

// inject sets the rule's headers on r, replacing any the guest sent under
// the same names. A secret that cannot be read fails the request: it is
// never sent without its credential.
func (h *termHandler) inject(r *http.Request, hs []config.Header) error {
	for _, hd := range hs {
		tm, err := secrets.Parse(hd.Value)
		if err != nil {
			return fmt.Errorf("inject %s: %w", hd.Name, err)
		}
		get := h.t.Secret
		if get == nil {
			get = func(name string) (string, error) {
				return "", fmt.Errorf("reading secret %q: %w (no secret store)", name, secrets.ErrNotFound)
			}
		}
		v, err := tm.Expand(get)
		if err != nil {
			return fmt.Errorf("inject %s: %w", hd.Name, err)
		}
		r.Header[hd.Name] = []string{v}
	}
	return nil
}

func (h *termHandler) upstreamError(w http.ResponseWriter, err error) {
	if sw, ok := w.(*statusWriter); ok {
		rl := &sw.line
		if sw.scan != nil && sw.scan.found.Load() {
			// The body named another method: cut before it ended.
			rl.d.Verdict, rl.status = policy.Deny, http.StatusForbidden
			rl.d.Reason = fmt.Sprintf("a %s field in the form body (a method override) is not allowed for %s", policy.MethodOverrideParam, h.name)
			w.Header().Set("X-Vmegress-Project", rl.d.Project)
			writeText(w, rl.status, fmt.Sprintf("vmegress: egress policy of project %s refused %s %s%s: %s\n", rl.d.Project, rl.method, h.name, rl.path, rl.d.Reason))
			return
		}
		rl.d.Verdict, rl.d.Reason, rl.status = verdictError, "upstream: "+err.Error(), http.StatusBadGateway
	}
	if errors.Is(err, context.Canceled) {
		return
	}
	writeText(w, http.StatusBadGateway, fmt.Sprintf("vmegress: upstream %s: %v\n", h.name, err))
}

// requestLine is one request's access-log line being built.
type requestLine struct {
	method, host, path string
	d                  policy.Decision
	status             int
}

// log writes one access-log line per request: method, host, path (without
// the query), verdict, rule, reason. Headers are never logged (injected
// values are secrets).
func (h *termHandler) log(rl *requestLine, start time.Time) {
	if h.p.AccessLog == nil {
		return
	}
	lh := h.p.AccessLog.Handler()
	ctx := context.Background()
	if !lh.Enabled(ctx, slog.LevelInfo) {
		return
	}
	// A record handed to the handler directly: Logger.LogAttrs would look
	// up its caller's program counter for every line, and nothing here
	// logs the source position.
	rec := slog.NewRecord(time.Now(), slog.LevelInfo, "request", 0) // as Logger's
	rec.AddAttrs(
		slog.String("project", rl.d.Project),
		slog.String("src", h.src),
		slog.String("dst", h.dst),
		slog.String("sni", h.sni),
		slog.String("host", rl.host),
		slog.String("method", rl.method),
		slog.String("path", rl.path),
		slog.String("verdict", string(rl.d.Verdict)),
		slog.String("rule", rl.d.Rule),
		slog.String("reason", rl.d.Reason),
		slog.Int("status", rl.status),
		slog.Float64("duration_ms", float64(h.p.now().Sub(start).Microseconds())/1000),
	)
	lh.Handle(ctx, rec)
}

// methodOverrides returns the values of r's method-override headers.
func methodOverrides(hd http.Header) []string {
	var out []string
	for _, k := range policy.MethodOverrideHeaders {
		out = append(out, hd.Values(k)...)
	}
	return out
}

// dropProtocolSwitch removes an Upgrade to anything but WebSocket (h2c,
// HTTP/x): after such a switch the streams would go unchecked.
func dropProtocolSwitch(hd http.Header) {
	up := hd.Values("Upgrade")
	if len(up) == 0 {
		return
	}
	if len(up) == 1 && strings.EqualFold(strings.TrimSpace(up[0]), "websocket") {
		return
	}
	hd.Del("Upgrade")
	hd.Del("Http2-Settings")
}

func writeText(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Content-Length", fmt.Sprint(len(body)))
	w.WriteHeader(status)
	io.WriteString(w, body)
}

// statusWriter records the status the reverse proxy answered with, and
// carries the request's log line to the upstream error handler.
type statusWriter struct {
	http.ResponseWriter
	line   requestLine
	status int
	// scan reads the request's form body for a method override (nil: not
	// read).
	scan *overrideScanner
}

// formBody reports whether r is a POST whose body a server parses as a
// form (Rack also parses one with no Content-Type): where servers look for
// a _method field. A Content-Type that does not parse counts.
func formBody(r *http.Request) bool {
	if r.Method != http.MethodPost {
		return false
	}
	ct := r.Header.Get("Content-Type")
	if ct == "" {
		return true
	}
	mt, _, err := mime.ParseMediaType(ct)
	return err != nil || mt == "application/x-www-form-urlencoded" || mt == "multipart/form-data"
}

// errBodyOverride fails the read of a form body that names another method.
var errBodyOverride = errors.New("the form body names another method (" + policy.MethodOverrideParam + ")")

// overrideScanLen is how much of what was read before is kept to find the
// parameter's name split across two reads: its escaped form, all but a byte.
const overrideScanLen = 3*len(policy.MethodOverrideParam) - 1

// overrideScanner passes a form body on to the origin while looking for
// policy.MethodOverrideParam in it, percent-decoded (Rails and Laravel read
// a POST's _method field as its method). When the name comes, the read
// fails before passing it on: the request to the origin is cut before its
// body ends (servers act on whole requests only), and the guest is answered
// 403 (upstreamError). Bodies are read by the transport's goroutine.
type overrideScanner struct {
	r     io.ReadCloser
	tail  []byte
	found atomic.Bool
}

func (s *overrideScanner) Read(p []byte) (int, error) {
	if s.found.Load() {
		return 0, errBodyOverride
	}
	n, err := s.r.Read(p)
	if n > 0 {
		window := append(s.tail, p[:n]...)
		if policy.QueryOverridesMethod(string(window)) {
			s.found.Store(true)
			return 0, errBodyOverride
		}
		keep := min(len(window), overrideScanLen)
		s.tail = append(s.tail[:0], window[len(window)-keep:]...)
	}
	return n, err
}

func (s *overrideScanner) Close() error { return s.r.Close() }

func (s *statusWriter) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach Flush and Hijack.
func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

// countedConn is the guest's connection: reads come from prefix (the bytes
// already peeked, let go of once read), then the socket, and bytes each way
// are counted.
type countedConn struct {
	net.Conn
	prefix  []byte
	name    string // the server name the connection was decided for
	in, out atomic.Int64
}

func (c *countedConn) Read(b []byte) (int, error) {
	var n int
	var err error
	if len(c.prefix) > 0 {
		n = copy(b, c.prefix)
		if c.prefix = c.prefix[n:]; len(c.prefix) == 0 {
			c.prefix = nil
		}
	} else {
		n, err = c.Conn.Read(b)
	}
	c.in.Add(int64(n))
	return n, err
}

func (c *countedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.out.Add(int64(n))
	return n, err
}
