package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"time"
)

// MaxHelloBytes caps how much is read while looking for a complete
// ClientHello: enough for post-quantum key shares, small enough that a guest
// cannot make the proxy buffer without bound.
const MaxHelloBytes = 16 << 10

// Errors of ReadClientHello; callers branch on them for the deny reason.
var (
	ErrNotTLS        = errors.New("not a TLS ClientHello")
	ErrHelloTooLarge = errors.New("ClientHello larger than 16 KiB")
	ErrHelloTimeout  = errors.New("no complete ClientHello before the deadline")
)

// errGotHello stops the handshake once the ClientHello has been parsed.
var errGotHello = errors.New("got ClientHello")

// Hello is what the proxy learned from a ClientHello.
type Hello struct {
	ServerName string
	ALPN       []string
}

// ReadClientHello reads from r until it holds one complete TLS ClientHello
// (which may span TCP segments and TLS records), at most MaxHelloBytes, and
// parses it with crypto/tls. It returns every byte it read, so the caller can
// send them on unchanged: the hello is peeked, not consumed. Nothing is ever
// written to r. The caller sets any read deadline on the connection first.
func ReadClientHello(ctx context.Context, r io.Reader) (*Hello, []byte, error) {
	rc := &recordingConn{r: io.LimitReader(r, MaxHelloBytes)}
	var hello *Hello
	cfg := &tls.Config{
		GetConfigForClient: func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
			hello = &Hello{ServerName: chi.ServerName, ALPN: append([]string(nil), chi.SupportedProtos...)}
			return nil, errGotHello
		},
	}
	// The handshake always fails: with errGotHello once the hello is parsed,
	// or with the reason there is none; what was read tells which.
	_ = tls.Server(rc, cfg).HandshakeContext(ctx)
	if hello != nil {
		return hello, rc.buf.Bytes(), nil
	}
	var ne net.Error
	switch {
	case rc.buf.Len() >= MaxHelloBytes:
		return nil, rc.buf.Bytes(), ErrHelloTooLarge
	case errors.As(rc.readErr, &ne) && ne.Timeout(), errors.Is(rc.readErr, context.DeadlineExceeded), ctx.Err() != nil:
		return nil, rc.buf.Bytes(), ErrHelloTimeout
	}
	return nil, rc.buf.Bytes(), ErrNotTLS
}

// recordingConn is the net.Conn crypto/tls reads the hello from: reads come
// from r and are recorded; writes (alerts) are discarded, never sent.
type recordingConn struct {
	r       io.Reader
	buf     bytes.Buffer
	readErr error
}

func (c *recordingConn) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.buf.Write(p[:n])
	if err != nil && c.readErr == nil {
		c.readErr = err
	}
	return n, err
}

func (c *recordingConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *recordingConn) Close() error                     { return nil }
func (c *recordingConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *recordingConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *recordingConn) SetDeadline(time.Time) error      { return nil }
func (c *recordingConn) SetReadDeadline(time.Time) error  { return nil }
func (c *recordingConn) SetWriteDeadline(time.Time) error { return nil }
