// Package rawhttp sends HTTP/1.1 and HTTP/2 requests byte for byte over an
// open connection, for tests that must send what no well-behaved client
// sends. The caller dials (and sets a deadline: a peer that never answers
// blocks until it expires); the functions here only write and read.
package rawhttp

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// H2Request is one request of a raw HTTP/2 exchange: its header fields in
// order, pseudo-headers included, as sent (no checks, no defaults).
type H2Request [][2]string

// HTTP1 writes raw to c as it is and returns up to n responses, each as
// its status code and body ("403 refused\n"), reading until the
// connection ends or n have come.
func HTTP1(c net.Conn, raw string, n int) []string {
	io.WriteString(c, raw)
	br := bufio.NewReader(c)
	var out []string
	for len(out) < n {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			break
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		out = append(out, fmt.Sprintf("%d %s", resp.StatusCode, b))
	}
	return out
}

// HTTP2 sends the client preface and an empty SETTINGS on c, then reqs as
// streams 1, 3, 5, ... (one HEADERS frame each, ending the stream), and
// returns each stream's status and body ("200 body"; "RST" for a reset
// stream, "" when nothing came). It acknowledges the peer's SETTINGS and
// PINGs, and stops when every stream has ended, at a GOAWAY, or when
// reading from c fails.
func HTTP2(c net.Conn, reqs ...H2Request) []string {
	io.WriteString(c, http2.ClientPreface)
	fr := http2.NewFramer(c, c)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	fr.WriteSettings()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for i, r := range reqs {
		hb.Reset()
		for _, f := range r {
			enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
		}
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*i + 1), BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true})
	}
	out := make([]string, len(reqs))
	for done := 0; done < len(reqs); {
		f, err := fr.ReadFrame()
		if err != nil {
			break
		}
		i := int(f.Header().StreamID-1) / 2
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			out[i] += f.PseudoValue("status") + " "
			if f.StreamEnded() {
				done++
			}
		case *http2.DataFrame:
			out[i] += string(f.Data())
			if f.StreamEnded() {
				done++
			}
		case *http2.RSTStreamFrame:
			out[i] += "RST"
			done++
		case *http2.GoAwayFrame:
			done = len(reqs)
		case *http2.SettingsFrame:
			if !f.IsAck() {
				fr.WriteSettingsAck()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				fr.WritePing(true, f.Data)
			}
		}
	}
	return out
}
