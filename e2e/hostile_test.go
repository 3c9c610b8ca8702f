package e2e

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// exitCode is the exit status carried by err from world.Output (0: none).
func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// netList returns the projects `net list --json` reports.
func (e *env) netList() []string {
	e.t.Helper()
	out, err := e.vmegress("--config", e.cfg, "net", "list", "--json")
	if err != nil {
		e.t.Fatalf("net list: %v", err)
	}
	var infos []struct{ Project string }
	if err := json.Unmarshal([]byte(out), &infos); err != nil {
		e.t.Fatalf("net list --json: %v\n%s", err, out)
	}
	var names []string
	for _, in := range infos {
		names = append(names, in.Project)
	}
	return names
}

// hostLinks lists the interface names of the world's host namespace.
func (e *env) hostLinks() string {
	e.t.Helper()
	out, err := world.Output(e.ctx, world.NS(e.w.Host, "ip", "-o", "link", "show")...)
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

// TestHostileNames (issue 12, item 9): project and TAP names outside the
// documented rule are refused with exit 2 naming the rule, and a refused or
// failed net up records nothing: no state, no interface, the daemon starts.
func TestHostileNames(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, projectsConfig)
	for _, c := range []struct {
		args []string
		rule string
	}{
		{[]string{"a*", "--egress", "nat"}, "project name"},
		{[]string{"#x"}, "project name"},
		{[]string{"a/b"}, "project name"},
		{[]string{"a b"}, "project name"},
		{[]string{"../../etc"}, "project name"},
		{[]string{"delta", "--tap", "tap-a*", "--egress", "nat"}, "TAP name"},
		{[]string{"delta", "--tap", "tap-a/b"}, "TAP name"},
		{[]string{"delta", "--tap", "tap-a b"}, "TAP name"},
		{[]string{"delta", "--tap", "tap-0123456789ab"}, "TAP name"}, // 16 characters: over IFNAMSIZ
	} {
		out, err := e.vmegress(append([]string{"--config", e.cfg, "net", "up"}, c.args...)...)
		if code := exitCode(err); code != 2 || !strings.Contains(err.Error(), c.rule) || !strings.Contains(err.Error(), "must be 1-") {
			t.Errorf("net up %q: exit %d, %v, %q; want exit 2 naming the %s rule", c.args, code, err, out, c.rule)
		}
	}
	// Valid names, a host change that fails: an existing interface that is
	// not a TAP (another guest's veth). Refused, and nothing recorded.
	if err := world.Run(e.ctx, world.NS(e.w.Host, "ip", "link", "add", "tap-rtv-a", "type", "veth", "peer", "name", "rtv-b")...); err != nil {
		t.Fatal(err)
	}
	if _, err := e.vmegress("--config", e.cfg, "net", "up", "t2", "--tap", "tap-rtv-a"); err == nil {
		t.Error("net up onto another guest's veth succeeded")
	}
	if got := e.netList(); len(got) != 0 {
		t.Errorf("refused net up calls left projects in the state: %q", got)
	}
	links := e.hostLinks()
	for _, bad := range []string{"tap-a*", "tap-#x", "tap-a/b", "tap-a b", "tap-delta"} {
		if strings.Contains(links, " "+bad+":") || strings.Contains(links, " "+bad+"@") {
			t.Errorf("interface %q left behind:\n%s", bad, links)
		}
	}
	if !strings.Contains(links, "tap-rtv-a@") {
		t.Errorf("the other guest's veth is gone:\n%s", links)
	}
	// The host still works: a project goes up with NAT egress, the daemon starts.
	if _, err := e.vmegress("--config", e.cfg, "net", "up", "beta", "--egress", "nat"); err != nil {
		t.Fatalf("net up beta after the refusals: %v", err)
	}
	if got := e.netList(); len(got) != 1 || got[0] != "beta" {
		t.Errorf("projects after net up beta: %q", got)
	}
	// A state file holding a name an older vmegress accepted is refused on
	// read, naming the line and the rule, not skipped.
	dir := t.TempDir()
	bad := "# vmegress projects, format 1: name\ttap\tsubnet\tmac\tegress\tssh_port\towner\tgroup\n" +
		"a*\ttap-a*\t172.31.0.8/30\t02:00:00:00:00:01\tnat\t0\t-\t-\n"
	if err := os.WriteFile(filepath.Join(dir, "projects"), []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := world.Output(e.ctx, world.NS(e.w.Host, binary, "--state-dir", dir, "--config", e.cfg, "net", "list")...)
	if err == nil || !strings.Contains(err.Error(), "line 2") || !strings.Contains(err.Error(), `project name "a*" must be 1-63`) {
		t.Errorf("net list over a state with a hostile name: %v", err)
	}
	e.start()
}

// TestNetDownDeletesOnlyItsOwn (issue 12, item 10): net up onto another
// guest's interface is refused (exit 2) and not recorded; net down of a
// project whose record names an interface vmegress did not create (an older
// vmegress recorded it) removes the record and leaves the interface.
func TestNetDownDeletesOnlyItsOwn(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, projectsConfig)
	for _, name := range []string{"tap-rtv-a", "tap-rtv-c"} {
		if err := world.Run(e.ctx, world.NS(e.w.Host, "ip", "link", "add", name, "type", "veth", "peer", "name", name+"p")...); err != nil {
			t.Fatal(err)
		}
	}
	_, err := e.vmegress("--config", e.cfg, "net", "up", "t2", "--tap", "tap-rtv-a")
	if code := exitCode(err); code != 2 || !strings.Contains(err.Error(), "not a TAP") {
		t.Errorf("net up t2 onto another guest's veth: exit %d, %v; want 2", code, err)
	}
	if out, err := e.vmegress("--config", e.cfg, "net", "down", "t2"); err != nil || !strings.Contains(out, "not up") {
		t.Errorf("net down t2 after the refusal: %q, %v", out, err)
	}
	// A record an older vmegress wrote for an interface it refused.
	rec := "# vmegress projects, format 1: name\ttap\tsubnet\tmac\tegress\tssh_port\towner\tgroup\n" +
		"t3\ttap-rtv-c\t172.31.0.8/30\t02:00:00:00:00:03\tproxy\t0\t-\t-\n"
	if err := os.MkdirAll(e.w.StateDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.w.StateDir(), "projects"), []byte(rec), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := e.vmegress("--config", e.cfg, "net", "down", "t3"); err != nil {
		t.Errorf("net down t3: %v", err)
	}
	if got := e.netList(); len(got) != 0 {
		t.Errorf("projects after net down t3: %q", got)
	}
	links := e.hostLinks()
	for _, name := range []string{"tap-rtv-a@", "tap-rtv-c@"} {
		if !strings.Contains(links, name) {
			t.Errorf("%s was deleted:\n%s", strings.TrimSuffix(name, "@"), links)
		}
	}
	// vmegress's own TAP still goes with net down.
	if _, err := e.vmegress("--config", e.cfg, "net", "up", "alpha"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.vmegress("--config", e.cfg, "net", "down", "alpha"); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(e.hostLinks(), " tap-alpha:") {
		t.Error("net down alpha left tap-alpha")
	}
}

// TestSSHPortNotAHostService (issue 12, item 11): --ssh-port refuses a port
// on which the host listens (exit 2, naming the process), and ports below
// 1024 unless --allow-privileged-ssh-port; through the in-process engine
// and through the daemon's API.
func TestSSHPortNotAHostService(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, projectsConfig)
	me, _ := os.ReadFile("/proc/self/comm")
	var ports []string
	for _, addr := range []string{":22", "127.0.0.1:0"} {
		ln, err := world.ListenIn(e.w.Host, "tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		_, port, _ := net.SplitHostPort(ln.Addr().String())
		ports = append(ports, port)
	}
	owner := fmt.Sprintf("%s (pid %d)", strings.TrimSpace(string(me)), os.Getpid())
	check := func(when string) {
		t.Helper()
		for _, c := range []struct {
			args []string
			want string
		}{
			{[]string{"--ssh-port", "22"}, "below 1024"},
			{[]string{"--ssh-port", "22", "--allow-privileged-ssh-port"}, owner},
			{[]string{"--ssh-port", ports[1]}, owner},
		} {
			_, err := e.vmegress(append([]string{"--config", e.cfg, "net", "up", "delta"}, c.args...)...)
			if code := exitCode(err); code != 2 || !strings.Contains(fmt.Sprint(err), c.want) {
				t.Errorf("%s: net up delta %q: exit %d, %v; want exit 2 naming %q", when, c.args, code, err, c.want)
			}
		}
		if got := e.netList(); len(got) != 0 {
			t.Errorf("%s: refused net up calls left projects: %q", when, got)
		}
	}
	check("no daemon")
	e.start()
	check("daemon")
	if _, err := e.vmegress("--config", e.cfg, "net", "up", "delta", "--ssh-port", "2299"); err != nil {
		t.Errorf("a free port: %v", err)
	}
}

// shortHTTPS makes n HTTPS/1.0 requests for name from namespace ns to
// addr, over workers goroutines. The server closes first (HTTP/1.0), so the
// proxy closes the guest's side first and that side of each connection ends
// in TIME_WAIT on the host, its local address being addr.
func shortHTTPS(ns, addr, name string, n, workers int) error {
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- world.InNS(ns, func() error {
				for i := w; i < n; i += workers {
					c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
					if err != nil {
						return err
					}
					tc := tls.Client(c, &tls.Config{ServerName: name, InsecureSkipVerify: true})
					tc.SetDeadline(time.Now().Add(5 * time.Second))
					_, err = io.WriteString(tc, "GET / HTTP/1.0\r\nHost: "+name+"\r\n\r\n")
					if err == nil {
						_, err = io.Copy(io.Discard, tc) // until the proxy's FIN
					}
					c.Close()
					if err != nil {
						return fmt.Errorf("request %d: %w", i, err)
					}
				}
				return nil
			})
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// TestRestoreNATAfterHeavyUse (issue 12, item 12): after thousands of
// proxied connections, `down --restore-nat` leaves no proxy socket that
// would swallow the guest's next SYNs: every following connection works.
func TestRestoreNATAfterHeavyUse(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, projectsConfig)
	e.start()
	beta, _ := e.netUp("beta") // the daemon's change: in effect on return
	server := netip.AddrPortFrom(world.WWWGitHubIP, 443).String()
	// The guest picks source ports for one destination in sequence over its
	// ephemeral range; a range of 1,000 ports makes the next connections reuse
	// the 4-tuples of the proxy's recent TIME_WAIT sockets, as a busy guest
	// does after one pass over the default range (28,000 ports).
	if err := world.Run(e.ctx, world.NS(beta.NS, "sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40999")...); err != nil {
		t.Fatal(err)
	}
	const proxied = 2000
	if err := shortHTTPS(beta.NS, server, "www.github.com", proxied, 8); err != nil {
		t.Fatal(err)
	}
	tw, err := world.Output(e.ctx, world.NS(e.w.Host, "ss", "-Htn4", "state", "time-wait", "src", world.WWWGitHubIP.String())...)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(tw, "\n"); n < 400 {
		t.Fatalf("only %d of the proxy's sockets in TIME_WAIT: the test would show nothing", n)
	}
	if err := e.d.Stop(5 * time.Second); err != nil {
		t.Logf("stopping the daemon: %v", err)
	}
	if out, err := e.vmegress("--config", e.cfg, "down", "--restore-nat"); err != nil {
		t.Fatalf("down --restore-nat: %v\n%s", err, out)
	}
	failed := 0
	err = world.InNS(beta.NS, func() error {
		for range 60 {
			// A SYN the host drops is retransmitted after 1 s: 2 s is enough
			// for a connection the host forwards.
			c, err := net.DialTimeout("tcp4", server, 2*time.Second)
			if err != nil {
				failed++
				continue
			}
			c.Close()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if failed > 0 {
		t.Errorf("%d of 60 connections after --restore-nat failed", failed)
	}
}
