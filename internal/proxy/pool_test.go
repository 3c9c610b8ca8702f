package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/policy"
)

// countingOrigin is an HTTPS origin that counts the connections it
// accepted and the ones that closed.
type countingOrigin struct {
	addr            string
	accepts, closed atomic.Int64
}

func startCountingOrigin(t *testing.T, cert *tls.Certificate) *countingOrigin {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := &countingOrigin{addr: ln.Addr().String()}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") }),
		ConnState: func(_ net.Conn, s http.ConnState) {
			switch s {
			case http.StateNew:
				o.accepts.Add(1)
			case http.StateClosed, http.StateHijacked:
				o.closed.Add(1)
			}
		},
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{*cert}, NextProtos: []string{"h2", "http/1.1"}},
		ErrorLog:  log.New(io.Discard, "", 0),
	}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return o
}

// twoProjects compiles projects alpha (127.0.0.0/30) and beta
// (127.0.0.4/30), each with an https rule for api.example.com on port.
func twoProjects(t *testing.T, port int) *policy.Policy {
	t.Helper()
	rule := fmt.Sprintf("    allow:\n      - https: api.example.com\n        ports: [%d]\n", port)
	cfg, err := config.Parse("t.yaml", []byte("vm_cidr: 127.0.0.0/16\nprojects:\n  alpha:\n    subnet: 127.0.0.0/30\n"+rule+
		"  beta:\n    subnet: 127.0.0.4/30\n"+rule))
	if err != nil {
		t.Fatal(err)
	}
	pol, err := policy.Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return pol
}

// TestTerminatePoolReuse: two guest connections of one project to the same
// name share one upstream connection; a guest of another project never
// gets it; a policy change with drop closes the pooled connections, and a
// project that goes takes its keys with it.
func TestTerminatePoolReuse(t *testing.T) {
	certs := newTermCerts(t)
	origin := startCountingOrigin(t, certs.originLeaf)
	p := &Proxy{Termination: &Termination{Leaf: certs.ca.Leaf, UpstreamRoots: certs.originRoots}}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	p.SetPolicy(twoProjects(t, port), false)
	startProxy(t, p, ln, origin.addr)

	// get makes one request on a guest connection of its own, from src
	// (alpha is 127.0.0.1, beta 127.0.0.5), and closes it.
	get := func(src string) {
		t.Helper()
		tr := &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
				return d.DialContext(ctx, "tcp4", ln.Addr().String())
			},
			TLSClientConfig: &tls.Config{RootCAs: certs.guestCAs},
		}
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get(fmt.Sprintf("https://api.example.com:%d/", port))
		if err != nil {
			t.Fatalf("GET from %s: %v", src, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET from %s: %s", src, resp.Status)
		}
	}
	get("127.0.0.1")
	get("127.0.0.1")
	if n := origin.accepts.Load(); n != 1 {
		t.Errorf("two guest connections of alpha made %d upstream connections; want 1 (pooled)", n)
	}
	get("127.0.0.5")
	if n := origin.accepts.Load(); n != 2 {
		t.Errorf("after a guest of beta: %d upstream connections; want 2 (never shared across projects)", n)
	}
	if n := p.pool.size(); n != 2 {
		t.Errorf("pool holds %d keys; want 2 (alpha's and beta's)", n)
	}

	// A policy change with drop (both projects compiled anew) closes the
	// pooled connections; the next guest connection dials anew.
	p.SetPolicy(twoProjects(t, port), true)
	waitFor(t, "the pooled upstream connections to close after a policy change with drop", func() bool { return origin.closed.Load() == 2 })
	get("127.0.0.1")
	if n := origin.accepts.Load(); n != 3 {
		t.Errorf("after the change: %d upstream connections; want 3 (a new one)", n)
	}

	// Without drop, a project that goes takes its keys; the others stay.
	get("127.0.0.5")
	pol, err := p.policy.Load().Update(nil, []string{"beta"})
	if err != nil {
		t.Fatal(err)
	}
	p.SetPolicy(pol, false)
	waitFor(t, "beta's upstream connection to close when beta goes", func() bool { return origin.closed.Load() == 3 })
	if n := p.pool.size(); n != 1 {
		t.Errorf("after beta went the pool holds %d keys; want 1 (alpha's, unchanged)", n)
	}
	get("127.0.0.1")
	if n := origin.accepts.Load(); n != 4 {
		t.Errorf("alpha after a change that left it alone: %d upstream connections; want 4 (its pooled one reused)", n)
	}
}
