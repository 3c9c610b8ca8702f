package world

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	mdns "github.com/miekg/dns"
)

// Hit is one connection or datagram that reached the fake internet.
type Hit struct {
	Server string // "tls:github.com", "attacker:tcp:443", ...
	Remote string // source address as the server saw it
	SNI    string
}

// AccessLog records what reached the fake internet's servers.
type AccessLog struct {
	mu   sync.Mutex
	hits []Hit
}

func (l *AccessLog) add(h Hit) {
	l.mu.Lock()
	l.hits = append(l.hits, h)
	l.mu.Unlock()
}

// Hits returns a copy of every hit so far.
func (l *AccessLog) Hits() []Hit {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Hit(nil), l.hits...)
}

// Reset forgets the hits so far.
func (l *AccessLog) Reset() {
	l.mu.Lock()
	l.hits = nil
	l.mu.Unlock()
}

// TLS server names, each on its own address, each with a certificate signed by
// the world's CA (written to CAFile for clients' --cacert).
var tlsNames = []string{"github.com", "www.github.com", "example.com"}

// AttackerTCPPorts and AttackerUDPPorts are where the attacker listens.
var (
	AttackerTCPPorts = []int{22, 80, 443, 8443}
	AttackerUDPPorts = []int{53, 443, 9999}
)

func (w *World) startServers() error {
	ca, caKey, err := newCA()
	if err != nil {
		return err
	}
	w.CAFile = filepath.Join(w.Dir, "ca.pem")
	if err := os.WriteFile(w.CAFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw}), 0o644); err != nil {
		return fmt.Errorf("writing CA: %w", err)
	}
	for _, name := range tlsNames {
		cert, err := newLeaf(ca, caKey, name)
		if err != nil {
			return err
		}
		name := name
		addr := net.JoinHostPort(Names[name].String(), "443")
		ln, err := ListenIn(w.Inet, "tcp4", addr)
		if err != nil {
			return fmt.Errorf("starting TLS server for %s: %w", name, err)
		}
		tlsCfg := &tls.Config{
			Certificates: []tls.Certificate{cert},
			GetConfigForClient: func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
				w.Log.add(Hit{Server: "tls:" + name, Remote: chi.Conn.RemoteAddr().String(), SNI: chi.ServerName})
				return nil, nil
			},
		}
		srv := &http.Server{
			Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
				fmt.Fprintf(rw, "hello from %s; you are %s\n", name, r.RemoteAddr)
			}),
			TLSConfig:         tlsCfg,
			ReadHeaderTimeout: 5 * time.Second,
			ErrorLog:          nil,
		}
		go srv.ServeTLS(ln, "", "")
		w.onClose(func() { srv.Close() })
		// Plain HTTP on port 80 of the same address.
		hln, err := ListenIn(w.Inet, "tcp4", net.JoinHostPort(Names[name].String(), "80"))
		if err != nil {
			return fmt.Errorf("starting HTTP server for %s: %w", name, err)
		}
		hsrv := &http.Server{
			Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
				w.Log.add(Hit{Server: "http:" + name, Remote: r.RemoteAddr, SNI: r.Host})
				fmt.Fprintf(rw, "hello from %s via http; you asked for %s\n", name, r.Host)
			}),
			ReadHeaderTimeout: 5 * time.Second,
		}
		go hsrv.Serve(hln)
		w.onClose(func() { hsrv.Close() })
	}
	if err := w.bannerTCP(BannerIP.String(), 22, "banner:22"); err != nil {
		return err
	}
	if err := w.lenientHTTP(LenientIP.String(), 80, "lenient:80"); err != nil {
		return err
	}
	if err := w.startDNS(); err != nil {
		return err
	}
	for _, p := range AttackerTCPPorts {
		if err := w.attackerTCP(AttackerIP.String(), p, fmt.Sprintf("attacker:tcp:%d", p)); err != nil {
			return err
		}
	}
	for _, a := range []struct {
		ip    string
		label string
	}{{PrivateIP.String(), "attacker:private"}, {MetadataIP.String(), "attacker:metadata"}} {
		for _, p := range []int{80, 443} {
			if err := w.attackerTCP(a.ip, p, fmt.Sprintf("%s:%d", a.label, p)); err != nil {
				return err
			}
		}
	}
	if err := w.attackerTCP("["+InetIP6.String()+"]", 443, "attacker6:tcp:443"); err != nil {
		return err
	}
	for _, p := range AttackerUDPPorts {
		if err := w.attackerUDP("udp4", AttackerIP.String(), p, fmt.Sprintf("attacker:udp:%d", p)); err != nil {
			return err
		}
	}
	return w.attackerUDP("udp6", "["+InetIP6.String()+"]", 9999, "attacker6:udp:9999")
}

// serveTCP logs every connection to host:port (IPv6 hosts in brackets) as a
// hit labelled label and hands it to serve.
func (w *World) serveTCP(host string, port int, label string, serve func(net.Conn)) error {
	network := "tcp4"
	if host[0] == '[' {
		network = "tcp6"
	}
	ln, err := ListenIn(w.Inet, network, host+":"+strconv.Itoa(port))
	if err != nil {
		return fmt.Errorf("starting %s: %w", label, err)
	}
	w.onClose(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			w.Log.add(Hit{Server: label, Remote: c.RemoteAddr().String()})
			go func() {
				defer c.Close()
				serve(c)
			}()
		}
	}()
	return nil
}

// attackerTCP logs every connection on host:port, answers as if it had
// leaked and reads a little.
func (w *World) attackerTCP(host string, port int, label string) error {
	return w.serveTCP(host, port, label, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write([]byte("HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nleaked"))
		c.Read(make([]byte, 4096))
	})
}

// bannerTCP is a server-first service: it speaks first, like SSH or SMTP,
// then echoes until the client closes.
func (w *World) bannerTCP(host string, port int, label string) error {
	return w.serveTCP(host, port, label, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(30 * time.Second))
		c.Write([]byte(Banner))
		io.Copy(c, c)
	})
}

// LenientIP serves lenient.test: plain HTTP on port 80 read as leniently as
// some real servers do (see lenientHTTP).
var LenientIP = netip.MustParseAddr("198.18.1.80")

// lenientHTTP is an HTTP/1.x server as lenient as the ones request
// smuggling goes through: bare LF line ends, empty lines before a request
// skipped (RFC 9112 2.2, as nginx does), the Host header obeyed whatever the
// request target says, a body on GET or HEAD never read (as Python's
// http.server does, so it is read as the next request), Upgrade ignored.
// Every request it reads is a hit whose SNI field is the Host asked for;
// the answer says "you asked for HOST".
func (w *World) lenientHTTP(host string, port int, label string) error {
	return w.serveTCP(host, port, label+":conn", func(c net.Conn) {
		c.SetDeadline(time.Now().Add(30 * time.Second))
		br := bufio.NewReader(c)
		for {
			line := ""
			for line == "" {
				l, err := br.ReadString('\n')
				if err != nil {
					return
				}
				line = strings.TrimRight(l, "\r\n")
			}
			method, _, _ := strings.Cut(line, " ")
			vhost, length, closing := "", 0, false
			for {
				l, err := br.ReadString('\n')
				if err != nil {
					return
				}
				l = strings.TrimRight(l, "\r\n")
				if l == "" {
					break
				}
				k, v, _ := strings.Cut(l, ":")
				v = strings.TrimSpace(v)
				switch strings.ToLower(strings.TrimSpace(k)) {
				case "host":
					vhost = v
				case "content-length":
					length, _ = strconv.Atoi(v)
				case "connection":
					closing = strings.EqualFold(v, "close")
				}
			}
			if method != "GET" && method != "HEAD" && length > 0 {
				if _, err := io.CopyN(io.Discard, br, int64(length)); err != nil {
					return
				}
			}
			w.Log.add(Hit{Server: label, Remote: c.RemoteAddr().String(), SNI: vhost})
			body := "you asked for " + vhost + "\n"
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
			if closing {
				return
			}
		}
	})
}

// Banner is what the server-first service says on connect.
const Banner = "SSH-2.0-fakeinet_banner\r\n"

// ECHConfig is the (dummy) ech parameter of github.com's HTTPS record.
var ECHConfig = []byte{0x00, 0x08, 0xfe, 0x0d, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef}

// startDNS serves Names (A), an HTTPS record with ech for github.com, and
// NXDOMAIN for the rest, logging every query as a "dns:NAME" hit.
func (w *World) startDNS() error {
	h := mdns.HandlerFunc(func(rw mdns.ResponseWriter, req *mdns.Msg) {
		m := new(mdns.Msg)
		m.SetReply(req)
		m.Authoritative = true
		if len(req.Question) != 1 {
			m.Rcode = mdns.RcodeFormatError
			rw.WriteMsg(m)
			return
		}
		q := req.Question[0]
		name := strings.ToLower(strings.TrimSuffix(q.Name, "."))
		w.Log.add(Hit{Server: "dns:" + name, Remote: rw.RemoteAddr().String()})
		a, ok := Names[name]
		if w.search != "" && strings.HasSuffix(name, "."+w.search) {
			a, ok = AttackerIP, true
		}
		if !ok {
			m.Rcode = mdns.RcodeNameError
			rw.WriteMsg(m)
			return
		}
		hdr := mdns.RR_Header{Name: q.Name, Class: mdns.ClassINET, Ttl: 60}
		switch q.Qtype {
		case mdns.TypeA:
			hdr.Rrtype = mdns.TypeA
			m.Answer = append(m.Answer, &mdns.A{Hdr: hdr, A: a.AsSlice()})
		case mdns.TypeHTTPS:
			hdr.Rrtype = mdns.TypeHTTPS
			m.Answer = append(m.Answer, &mdns.HTTPS{SVCB: mdns.SVCB{Hdr: hdr, Priority: 1, Target: ".", Value: []mdns.SVCBKeyValue{
				&mdns.SVCBAlpn{Alpn: []string{"h2"}},
				&mdns.SVCBIPv4Hint{Hint: []net.IP{a.AsSlice()}},
				&mdns.SVCBECHConfig{ECH: ECHConfig},
			}}})
		}
		rw.WriteMsg(m)
	})
	addr := net.JoinHostPort(DNSIP.String(), "53")
	pc, err := ListenPacketIn(w.Inet, "udp4", addr)
	if err != nil {
		return fmt.Errorf("starting DNS server: %w", err)
	}
	ln, err := ListenIn(w.Inet, "tcp4", addr)
	if err != nil {
		pc.Close()
		return fmt.Errorf("starting DNS server: %w", err)
	}
	udp := &mdns.Server{PacketConn: pc, Handler: h}
	tcp := &mdns.Server{Listener: ln, Handler: h}
	go udp.ActivateAndServe()
	go tcp.ActivateAndServe()
	w.onClose(func() { udp.Shutdown(); tcp.Shutdown() })
	return nil
}

// Queries returns the names the fake internet's DNS server was asked.
func (l *AccessLog) Queries() []string {
	var out []string
	for _, h := range l.Hits() {
		if n, ok := strings.CutPrefix(h.Server, "dns:"); ok {
			out = append(out, n)
		}
	}
	return out
}

func (w *World) attackerUDP(network, host string, port int, label string) error {
	pc, err := ListenPacketIn(w.Inet, network, host+":"+strconv.Itoa(port))
	if err != nil {
		return fmt.Errorf("starting %s: %w", label, err)
	}
	w.onClose(func() { pc.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			w.Log.add(Hit{Server: label, Remote: from.String()})
			pc.WriteTo(buf[:n], from)
		}
	}()
	return nil
}

// startProbe counts, in the fake internet, every packet whose source is a
// guest address (IPv4 or IPv6): whatever the host does, such a packet means
// guest traffic left the host without the proxy.
func (w *World) startProbe(ctx context.Context) error {
	rules := `table inet probe {
	counter guest_v4 {}
	counter guest_v6 {}
	chain pre {
		type filter hook prerouting priority raw - 10; policy accept;
		ip saddr 172.31.0.0/16 counter name guest_v4
		ip6 saddr 2001:db8:1::/48 counter name guest_v6
	}
}
`
	f := filepath.Join(w.Dir, "probe.nft")
	if err := os.WriteFile(f, []byte(rules), 0o644); err != nil {
		return fmt.Errorf("writing probe rules: %w", err)
	}
	return Run(ctx, NS(w.Inet, "nft", "-f", f)...)
}

var packetsRE = regexp.MustCompile(`packets (\d+)`)

// LeakedPackets returns how many packets with a guest source address (IPv4,
// IPv6) have reached the fake internet since the world was built.
func (w *World) LeakedPackets(ctx context.Context) (v4, v6 int, err error) {
	for _, c := range []struct {
		name string
		dst  *int
	}{{"guest_v4", &v4}, {"guest_v6", &v6}} {
		out, err := Output(ctx, NS(w.Inet, "nft", "list", "counter", "inet", "probe", c.name)...)
		if err != nil {
			return 0, 0, err
		}
		m := packetsRE.FindStringSubmatch(out)
		if m == nil {
			return 0, 0, fmt.Errorf("reading probe counter %s: no packet count in %q", c.name, out)
		}
		*c.dst, _ = strconv.Atoi(m[1])
	}
	return v4, v6, nil
}

func newCA() (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating CA key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "vmegress test world CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("creating CA: %w", err)
	}
	ca, err := x509.ParseCertificate(der)
	return ca, key, err
}

func newLeaf(ca *x509.Certificate, caKey *ecdsa.PrivateKey, name string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generating key for %s: %w", name, err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("creating certificate for %s: %w", name, err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
