package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/world"
)

// TestAuditSurvivesChanges: an audit project's would_deny connection stays
// open through another project's net up and a config reload that does not
// touch it (re-deciding open connections uses the project's mode).
func TestAuditSurvivesChanges(t *testing.T) {
	t.Parallel()
	e := newWorld(t)
	cfg := `projects:
  alpha:
    subnet: 172.31.0.0/30
    mode: audit
    allow:
      - sni: github.com
  beta:
    allow:
      - sni: github.com
`
	e.writeConfig(cfg)
	if onEnvoy() {
		// Envoy has no audit mode: the config is refused at load (TestAuditThenEnforce).
		if _, err := e.w.StartDaemon(e.ctx, binary, e.cfg); err == nil || !strings.Contains(err.Error(), "mode audit needs dataplane builtin") {
			t.Errorf("audit with Envoy: %v; want the config refused", err)
		}
		return
	}
	e.start()
	c, r := e.tlsConn() // www.github.com: only the apex is allowed, so would_deny
	if err := get(c, r, "www.github.com"); err != nil {
		t.Fatalf("audit let the connection through, but a request failed: %v", err)
	}
	e.netUp("beta")
	e.writeConfig(cfg + "      - sni: example.com\n")
	if !waitFor(5*time.Second, func() bool { return strings.Contains(e.d.Stderr(), `"policy reloaded"`) }) {
		t.Fatalf("the config change did not load:\n%s", e.d.Stderr())
	}
	if err := get(c, r, "www.github.com"); err != nil {
		t.Errorf("the audit project's open connection did not survive other changes: %v", err)
	}
	for _, m := range e.d.AccessLog() {
		if m["verdict"] == "revoked" {
			t.Errorf("an audit connection was revoked: %v", m)
		}
	}
}

// TestPlacementAvoidsHostNetworks: a /30 some interface of the host already
// holds (a TAP from the spec's own script, a Docker bridge) is skipped by
// net up, an explicit --subnet on it is refused naming the interface, and
// doctor reports the overlap with a fix.
func TestPlacementAvoidsHostNetworks(t *testing.T) {
	t.Parallel()
	e := newWorldWith(t, nil, projectsConfig)
	for _, argv := range [][]string{
		{"ip", "tuntap", "add", "dev", "spec-tap0", "mode", "tap"},
		{"ip", "addr", "add", "172.31.0.1/30", "dev", "spec-tap0"},
		{"ip", "link", "set", "spec-tap0", "up"},
	} {
		mustOutput(t, e, argv...)
	}
	e.start()
	_, info := e.netUp("alpha")
	if info["subnet"] == "172.31.0.0/30" {
		t.Errorf("net up placed alpha on the /30 spec-tap0 holds: %v", info)
	}
	out, err := e.vmegress("--config", e.cfg, "net", "up", "beta", "--subnet", "172.31.0.0/30")
	if err == nil || !strings.Contains(out+err.Error(), "spec-tap0") || !strings.Contains(err.Error(), "exit status 2") {
		t.Errorf("net up on a /30 the host holds: %v\n%s; want exit 2 naming spec-tap0", err, out)
	}
	if list, _ := e.vmegress("--config", e.cfg, "net", "list"); strings.Contains(list, "beta") {
		t.Errorf("a refused placement was recorded:\n%s", list)
	}
	out, _ = e.vmegress("--config", e.cfg, "doctor")
	if !strings.Contains(out, "[FAIL] vm_cidr and host routes") || !strings.Contains(out, "spec-tap0") {
		t.Errorf("doctor did not report the overlap:\n%s", out)
	}
	_ = world.AttackerIP
}
