package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmegress/vmegress/client"
	"github.com/vmegress/vmegress/internal/world"
)

// plug connects a guest namespace to a placed project's TAP.
func (e *env) plug(p *client.Placement) *world.Guest {
	e.t.Helper()
	g, err := e.w.PlugTAP(e.ctx, p.Project, p.TAP, netip.MustParseAddr(p.GuestIP), netip.MustParseAddr(p.HostIP), p.MAC)
	if err != nil {
		e.t.Fatal(err)
	}
	return g
}

func sni(names ...string) []client.Rule {
	var rs []client.Rule
	for _, n := range names {
		rs = append(rs, client.Rule{SNI: n})
	}
	return rs
}

// TestAPILifecycle drives a whole life cycle through the API only (no
// config-file edits): two projects placed with different policies, guests
// behind real TAPs reach what theirs allows, a policy change decides the
// next connection, a denial reaches the event stream, a restart keeps
// every API project and policy, and delete leaves no trace.
func TestAPILifecycle(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, "projects: {}\n")
	e.start()
	c := client.New(e.w.APISocket())
	ctx := e.ctx
	a, err := c.PutProject(ctx, "alpha", client.ProjectSpec{Policy: &client.Policy{Allow: sni("www.github.com")}})
	if err != nil {
		t.Fatalf("placing alpha: %v", err)
	}
	b, err := c.PutProject(ctx, "beta", client.ProjectSpec{Policy: &client.Policy{Allow: sni("github.com")}})
	if err != nil {
		t.Fatalf("placing beta: %v", err)
	}
	if again, err := c.PutProject(ctx, "alpha", client.ProjectSpec{Policy: &client.Policy{Allow: sni("www.github.com")}}); err != nil || again.Changed || again.Subnet != a.Subnet {
		t.Errorf("the same PUT twice: %+v, %v; want the same project, unchanged", again, err)
	}
	ga, gb := e.plug(a), e.plug(b)
	reach := func(g *world.Guest, url string, want bool) {
		t.Helper()
		body, err := e.curlFrom(g, url)
		if got := err == nil && strings.HasPrefix(body, "hello from"); got != want {
			t.Errorf("%s -> %s: reached %v, want %v (%q, %v)", g.Name, url, got, want, body, err)
		}
	}
	reach(ga, "https://www.github.com", true)
	reach(ga, "https://github.com", false)
	reach(gb, "https://github.com", true)
	reach(gb, "https://www.github.com", false)

	// A denial shows in the event stream at once.
	evctx, stop := context.WithCancel(ctx)
	defer stop()
	got := make(chan client.Event, 16)
	go func() {
		for ev, err := range c.Events(evctx, client.EventFilter{Project: "alpha", Verdict: "deny"}) {
			if err != nil {
				t.Logf("event stream: %v", err)
				return
			}
			got <- ev
		}
	}()
	time.Sleep(200 * time.Millisecond) // the subscription is registered
	e.curlFrom(ga, "https://example.com", "--resolve", "example.com:443:"+world.ExampleIP.String())
	select {
	case ev := <-got:
		if ev.Type != "connection" || ev.Project != "alpha" || !strings.HasPrefix(ev.Dst, world.ExampleIP.String()+":") || ev.Reason == "" {
			t.Errorf("denial event %+v; want the project, the destination and a reason", ev)
		}
	case <-time.After(time.Second):
		t.Error("no denial event within a second")
	}

	// A policy change decides the next connection.
	res, err := c.SetPolicy(ctx, "alpha", client.Policy{Allow: sni("www.github.com", "github.com")})
	if err != nil || res.Generation == 0 {
		t.Fatalf("setting alpha's policy: %+v, %v", res, err)
	}
	reach(ga, "https://github.com", true)
	exs, err := c.Explain(ctx, client.ExplainRequest{Project: "alpha", Host: "github.com"})
	if err != nil || len(exs) != 1 || exs[0].Verdict != "allow" || exs[0].Rule != "sni:github.com" || !strings.Contains(exs[0].DNS, world.GitHubIP.String()) {
		t.Errorf("explain from the daemon's policy: %+v, %v", exs, err)
	}
	if exs, err := c.Explain(ctx, client.ExplainRequest{Project: "beta", Host: "www.github.com"}); err != nil || len(exs) != 1 || exs[0].Verdict != "deny" || !strings.Contains(exs[0].DNS, "NXDOMAIN") {
		t.Errorf("explain for beta: %+v, %v", exs, err)
	}

	// A restart keeps every API project and policy.
	if err := e.d.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	// As after a reboot: beta's TAP is gone; the daemon re-creates it.
	if _, err := world.Output(ctx, world.NS(e.w.Host, "ip", "link", "del", b.TAP)...); err != nil {
		t.Fatal(err)
	}
	e.start()
	if gb, err = e.w.PlugTAP(ctx, "beta", b.TAP, netip.MustParseAddr(b.GuestIP), netip.MustParseAddr(b.HostIP), b.MAC); err != nil {
		t.Fatalf("beta's TAP was not re-created at start: %v", err)
	}
	p, err := c.Project(ctx, "alpha")
	if err != nil || p.Source != "api" || p.Placement == nil || len(p.Policy.Allow) != 2 {
		t.Fatalf("alpha after a restart: %+v, %v", p, err)
	}
	reach(ga, "https://github.com", true)
	reach(gb, "https://www.github.com", false)

	// Delete leaves no trace.
	if r, err := c.DeleteProject(ctx, "alpha"); err != nil || !r.Found {
		t.Fatalf("deleting alpha: %+v, %v", r, err)
	}
	if _, err := world.Output(ctx, world.NS(e.w.Host, "ip", "link", "show", a.TAP)...); err == nil {
		t.Errorf("%s is still there", a.TAP)
	}
	st, _ := os.ReadFile(filepath.Join(e.w.StateDir(), "projects"))
	if strings.Contains(string(st), "alpha") {
		t.Errorf("the state still lists alpha:\n%s", st)
	}
	if _, err := os.Stat(filepath.Join(e.w.StateDir(), "policies", "alpha.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("alpha's policy file is still there: %v", err)
	}
	var ce *client.Error
	if _, err := c.Project(ctx, "alpha"); !errors.As(err, &ce) || ce.Status != 404 {
		t.Errorf("alpha after delete: %v; want 404", err)
	}
	reach(gb, "https://github.com", true)
}

// TestAPIRefusals: invalid bodies, unknown fields, conflicting subnets, a
// too-long TAP name, a policy write for a file-owned project and a caller
// that is neither root nor in the API group each get their error, and
// nothing changes.
func TestAPIRefusals(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, "projects:\n  filed:\n    allow:\n      - sni: github.com\n")
	e.start()
	c := client.New(e.w.APISocket())
	ctx := e.ctx
	a, err := c.PutProject(ctx, "alpha", client.ProjectSpec{Policy: &client.Policy{Allow: sni("github.com")}})
	if err != nil {
		t.Fatal(err)
	}
	before, err := c.Status(ctx)
	if err != nil {
		t.Errorf("status: %v", err)
	}
	projects := func() string {
		ps, _ := c.Projects(ctx)
		b, _ := json.Marshal(ps)
		return string(b)
	}
	was := projects()
	// call returns the status and the error body of one raw request.
	call := func(method, path, body string) (string, client.ErrorBody) {
		out, _ := world.Output(ctx, "curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}", "--unix-socket", e.w.APISocket(),
			"-X", method, "-H", "Content-Type: application/json", "--data-binary", body, "http://vmegress"+path)
		out = strings.TrimSpace(out)
		i := strings.LastIndexByte(out, '\n')
		var eb client.ErrorBody
		json.Unmarshal([]byte(out[:max(i, 0)]), &eb)
		return out[i+1:], eb
	}
	for _, tc := range []struct {
		method, path, body string
		status             int
		field              string
	}{
		{"PUT", "/v1/projects/gamma", `{"policy":{"allow":[{"sni":"bad..name"}]}}`, 400, "policy.allow[0].sni"},
		{"PUT", "/v1/projects/gamma", `{"policy":{"allow":[{"cidr":"198.51.100.0/24","ports":[0]}]}}`, 400, "policy.allow[0].ports[0]"},
		{"PUT", "/v1/projects/gamma", `{"tapp":"tap-x"}`, 400, "tapp"},
		{"PUT", "/v1/projects/gamma", `{"ssh_port":"x"}`, 400, "ssh_port"},
		{"PUT", "/v1/projects/gamma", `{"subnet":"` + a.Subnet + `"}`, 409, ""},
		{"PUT", "/v1/projects/gamma", `{"tap":"tap-0123456789abc"}`, 400, "tap"},
		{"PUT", "/v1/projects/Bad%20Name", `{}`, 400, "name"},
		{"PUT", "/v1/projects/filed/policy", `{"allow":[{"sni":"example.com"}]}`, 409, ""},
		{"PUT", "/v1/projects/nobody/policy", `{"allow":[]}`, 404, ""},
	} {
		status, eb := call(tc.method, tc.path, tc.body)
		if status != strconv.Itoa(tc.status) || eb.Error == "" || (tc.field != "" && eb.Field != tc.field) {
			t.Errorf("%s %s %s: status %s, %+v; want %d with field %q", tc.method, tc.path, tc.body, status, eb, tc.status, tc.field)
		}
	}
	// Not root and not in the API group: the socket (0660) refuses the connection.
	if out, err := world.Output(ctx, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
		"curl", "-sS", "--max-time", "5", "--unix-socket", e.w.APISocket(), "-X", "DELETE", "http://vmegress/v1/projects/alpha"); err == nil {
		t.Errorf("an unprivileged caller was answered: %s", out)
	}
	// And with the socket opened to everyone, the peer check still refuses.
	os.Chmod(filepath.Dir(e.w.APISocket()), 0o755)
	os.Chmod(e.w.APISocket(), 0o666)
	out, _ := world.Output(ctx, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
		"curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--unix-socket", e.w.APISocket(), "-X", "DELETE", "http://vmegress/v1/projects/alpha")
	if strings.TrimSpace(out) != "403" {
		t.Errorf("an unprivileged caller on an open socket got %q; want 403", out)
	}
	// A member of the API group (the socket's group) may call, by its
	// supplementary groups as the kernel recorded them (SO_PEERGROUPS).
	var st syscall.Stat_t
	if err := syscall.Stat(e.w.APISocket(), &st); err != nil {
		t.Fatal(err)
	}
	out, _ = world.Output(ctx, "setpriv", "--reuid=65534", "--regid=65534", "--groups="+strconv.Itoa(int(st.Gid)),
		"curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--unix-socket", e.w.APISocket(), "http://vmegress/v1/status")
	if strings.TrimSpace(out) != "200" {
		t.Errorf("a member of the API group (gid %d) got %q; want 200", st.Gid, out)
	}
	if now := projects(); now != was {
		t.Errorf("refused calls changed the projects:\n%s\n%s", was, now)
	}
	if after, _ := c.Status(ctx); before == nil || after == nil || after.Generation != before.Generation {
		t.Errorf("refused calls made a new generation: %+v -> %+v", before, after)
	}
}
