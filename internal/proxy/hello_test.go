package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// realHello returns the bytes Go's crypto/tls client sends first for
// serverName (one TLS record holding the ClientHello; with the default
// post-quantum key share it is well over 1,200 bytes).
func realHello(t testing.TB, serverName string) []byte {
	t.Helper()
	c, s := net.Pipe()
	defer s.Close()
	go func() {
		tc := tls.Client(c, &tls.Config{ServerName: serverName, InsecureSkipVerify: true})
		tc.SetDeadline(time.Now().Add(5 * time.Second))
		tc.Handshake()
		c.Close()
	}()
	hdr := make([]byte, 5)
	s.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(s, hdr); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[3:5]))
	if _, err := io.ReadFull(s, body); err != nil {
		t.Fatal(err)
	}
	return append(hdr, body...)
}

// splitRecords re-frames one handshake record as two TLS records.
func splitRecords(rec []byte, at int) []byte {
	body := rec[5:]
	out := []byte{}
	for _, part := range [][]byte{body[:at], body[at:]} {
		h := []byte{rec[0], rec[1], rec[2], 0, 0}
		binary.BigEndian.PutUint16(h[3:], uint16(len(part)))
		out = append(append(out, h...), part...)
	}
	return out
}

// oneByteReader returns at most one byte per Read, like a slow TCP stream.
type oneByteReader struct{ r io.Reader }

func (o oneByteReader) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1]
	}
	return o.r.Read(p)
}

func TestReadClientHello(t *testing.T) {
	hello := realHello(t, "www.github.com")
	if len(hello) < 1200 {
		t.Fatalf("Go's ClientHello is %d bytes; expected a post-quantum key share (>1200)", len(hello))
	}
	trailing := []byte("early data that follows")
	for _, tc := range []struct {
		name string
		r    func() io.Reader
		want []byte
	}{
		{"one read", func() io.Reader { return bytes.NewReader(hello) }, hello},
		{"one byte at a time", func() io.Reader { return oneByteReader{bytes.NewReader(hello)} }, hello},
		{"two records", func() io.Reader { return bytes.NewReader(splitRecords(hello, 100)) }, splitRecords(hello, 100)},
		{"two records, one byte at a time", func() io.Reader { return oneByteReader{bytes.NewReader(splitRecords(hello, 700))} }, splitRecords(hello, 700)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, got, err := ReadClientHello(context.Background(), tc.r())
			if err != nil {
				t.Fatal(err)
			}
			if h.ServerName != "www.github.com" {
				t.Errorf("ServerName = %q", h.ServerName)
			}
			if !bytes.Equal(got, tc.want) {
				t.Errorf("returned %d bytes, want exactly the %d read", len(got), len(tc.want))
			}
		})
	}
	t.Run("bytes after the hello are returned, not lost", func(t *testing.T) {
		in := append(append([]byte{}, hello...), trailing...)
		_, got, err := ReadClientHello(context.Background(), bytes.NewReader(in))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(in, got) || len(got) < len(hello) {
			t.Errorf("got %d bytes that are not a prefix of the stream", len(got))
		}
	})
}

func TestReadClientHelloRefusals(t *testing.T) {
	hello := realHello(t, "example.com")
	huge := make([]byte, 0, 20000)
	// A handshake record header announcing a message larger than the cap.
	huge = append(huge, 0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x50, 0x00)
	huge = append(huge, make([]byte, 19000)...)
	for _, tc := range []struct {
		name string
		in   io.Reader
		want error
	}{
		{"http", bytes.NewReader([]byte("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")), ErrNotTLS},
		{"ssh banner", bytes.NewReader([]byte("SSH-2.0-OpenSSH_9.2\r\n")), ErrNotTLS},
		{"empty", bytes.NewReader(nil), ErrNotTLS},
		{"truncated hello", bytes.NewReader(hello[:len(hello)-10]), ErrNotTLS},
		{"too large", bytes.NewReader(huge), ErrHelloTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, _, err := ReadClientHello(context.Background(), tc.in)
			if !errors.Is(err, tc.want) || h != nil {
				t.Errorf("got %v, %v; want %v", h, err, tc.want)
			}
		})
	}
	t.Run("timeout", func(t *testing.T) {
		c, s := net.Pipe()
		defer c.Close()
		go c.Write(hello[:50])
		s.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		h, got, err := ReadClientHello(context.Background(), s)
		if !errors.Is(err, ErrHelloTimeout) || h != nil || len(got) != 50 {
			t.Errorf("got %v, %d bytes, %v; want ErrHelloTimeout after 50 bytes", h, len(got), err)
		}
	})
	t.Run("no SNI", func(t *testing.T) {
		h, _, err := ReadClientHello(context.Background(), bytes.NewReader(realHello(t, "")))
		if err != nil || h.ServerName != "" {
			t.Errorf("got %+v, %v; want a hello without a name", h, err)
		}
	})
}

func FuzzReadClientHello(f *testing.F) {
	f.Add(realHello(f, "github.com"))
	f.Add(splitRecords(realHello(f, "a.b.c"), 40))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte{0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, data []byte) {
		h, got, err := ReadClientHello(context.Background(), bytes.NewReader(data))
		if !bytes.HasPrefix(data, got) {
			t.Fatalf("returned bytes are not what was read")
		}
		if len(got) > MaxHelloBytes {
			t.Fatalf("read %d bytes, over the cap", len(got))
		}
		if (h == nil) == (err == nil) {
			t.Fatalf("hello %v with error %v", h, err)
		}
	})
}

// BenchmarkReadClientHello parses a real post-quantum ClientHello, as the
// data plane does for every TLS connection.
func BenchmarkReadClientHello(b *testing.B) {
	hello := realHello(b, "www.github.com")
	b.ReportAllocs()
	b.SetBytes(int64(len(hello)))
	for b.Loop() {
		if h, _, err := ReadClientHello(context.Background(), bytes.NewReader(hello)); err != nil || h.ServerName == "" {
			b.Fatal(err)
		}
	}
}
