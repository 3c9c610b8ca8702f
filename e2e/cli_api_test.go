package e2e

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// TestCLIPolicySetAndEvents: the CLI's policy set and events go through the
// running daemon's API: a policy file (errors as file:line:col, exit 2,
// nothing changed) replaces an API project's policy for its next
// connection, and vmegress events shows the denial as it happens.
func TestCLIPolicySetAndEvents(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, "projects: {}\n")
	e.start()
	_, info := e.netUp("alpha")
	g := e.w.Guest("alpha")
	if g == nil {
		t.Fatalf("no guest for alpha: %v", info)
	}
	bad := filepath.Join(e.w.Dir, "bad.yaml")
	os.WriteFile(bad, []byte("allow:\n  - sni: github.com\n  - cidr: 198.51.100.0/24\n"), 0o644)
	out, err := e.vmegress("--config", e.cfg, "policy", "set", "alpha", bad)
	if err == nil || !strings.Contains(out+err.Error(), "bad.yaml:3") || !strings.Contains(err.Error(), "exit status 2") {
		t.Errorf("policy set with a bad file: %v\n%s; want exit 2 naming bad.yaml:3", err, out)
	}
	if body, err := e.curlFrom(g, "https://github.com"); err == nil {
		t.Errorf("a refused policy file took effect: %q", body)
	}

	// Follow the events of alpha's denials with the CLI.
	ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", world.NS(e.w.Host, binary, "--state-dir", e.w.StateDir(), "--api-socket", e.w.APISocket(),
		"--config", e.cfg, "events", "--project", "alpha", "--verdict", "deny")[1:]...)
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); cmd.Wait() }()
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	time.Sleep(300 * time.Millisecond) // subscribed

	good := filepath.Join(e.w.Dir, "good.yaml")
	os.WriteFile(good, []byte("allow:\n  - sni: github.com\n"), 0o644)
	if out, err := e.vmegress("--config", e.cfg, "policy", "set", "alpha", good); err != nil || !strings.Contains(out, "generation") {
		t.Fatalf("policy set: %v\n%s", err, out)
	}
	if body, err := e.curlFrom(g, "https://github.com"); err != nil || !strings.HasPrefix(body, "hello from github.com") {
		t.Errorf("after policy set, github.com: %q, %v", body, err)
	}
	e.curlFrom(g, "https://example.com", "--resolve", "example.com:443:"+world.ExampleIP.String())
	deadline := time.After(5 * time.Second)
	for {
		select {
		case l := <-lines:
			if strings.Contains(l, `"type":"connection"`) && strings.Contains(l, world.ExampleIP.String()+":443") {
				return
			}
			if strings.Contains(l, `"verdict":"allow"`) {
				t.Errorf("the verdict filter let an allow through: %s", l)
			}
		case <-deadline:
			t.Fatal("vmegress events did not show the denial")
		}
	}
}
