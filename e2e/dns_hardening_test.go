package e2e

import (
	"crypto/tls"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// TestDNSEscapedLabels: with the rule *.github.com, a name whose first label
// holds a dot ("secret\.github.com" is the labels [secret.github, com], a
// name outside github.com) is refused by the resolver on its wire labels: no
// query for it reaches the fake internet's DNS server.
func TestDNSEscapedLabels(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for _, args := range [][]string{
		{"dig", "+time=3", "+tries=1", `secret\.github.com`},
		{"dig", "+time=3", "+tries=1", "+tcp", `secret\046github.com`},
		{"dig", "+time=3", "+tries=1", `a\032b.www.github.com`},
	} {
		out, err := e.guest(args...)
		if err != nil || !strings.Contains(out, "status: NXDOMAIN") {
			t.Errorf("%v: %v\n%s", args, err, out)
		}
	}
	e.accessLine("project", "alpha", "name", `secret\.github.com`, "verdict", "deny")
	// The valid name still works, and it is the only github.com query.
	if out, err := e.guest("dig", "+short", "www.github.com"); err != nil || strings.TrimSpace(out) != world.WWWGitHubIP.String() {
		t.Errorf("www.github.com: %q, %v", out, err)
	}
	noHostileQueries(t, e)
}

// noHostileQueries fails if a name with an escaped byte reached the fake
// internet's DNS server.
func noHostileQueries(t *testing.T, e *env) {
	t.Helper()
	for _, q := range e.w.Log.Queries() {
		if strings.Contains(q, "secret") || strings.Contains(q, `\`) {
			t.Errorf("a hostile name was forwarded upstream: %q (all: %q)", q, e.w.Log.Queries())
		}
	}
}

// TestSNIEscapedLabels: the same name as a TLS server name, to github.com's
// address, is refused by the data plane, which never resolves it.
func TestSNIEscapedLabels(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	err := world.InNS(e.g.NS, func() error {
		d := &net.Dialer{Timeout: 5 * time.Second}
		c, err := tls.DialWithDialer(d, "tcp4", world.GitHubIP.String()+":443",
			&tls.Config{ServerName: `secret\.github.com`, InsecureSkipVerify: true})
		if err == nil {
			c.Close()
			t.Errorf(`a TLS connection with server name secret\.github.com was allowed`)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	noHostileQueries(t, e)
}
