package main

import (
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestCompleteProjects: project arguments complete with the config's
// projects and the state's (placed by net up, or given a policy by the API).
func TestCompleteProjects(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yaml")
	os.WriteFile(cfg, []byte("api_socket: "+filepath.Join(dir, "no-daemon.sock")+"\nprojects:\n  alpha:\n    allow:\n      - sni: github.com\n  beta: {}\n"), 0o644)
	stateDir := filepath.Join(dir, "state")
	os.MkdirAll(filepath.Join(stateDir, "policies"), 0o700)
	os.WriteFile(filepath.Join(stateDir, "policies", "api-one.json"), []byte(`{}`), 0o600)
	env := map[string]string{"VMEGRESS_CONFIG": cfg, "VMEGRESS_STATE_DIR": stateDir}
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"net", "down", ""}, []string{"alpha", "api-one", "beta", ":4"}},
		{[]string{"policy", "explain", "a"}, []string{"alpha", "api-one", ":4"}},
		{[]string{"policy", "set", "b"}, []string{"beta", ":4"}},
		// The second argument of set is a file: the shell's default.
		{[]string{"policy", "set", "alpha", ""}, []string{":0"}},
	} {
		code, out, errOut := runCLI(t, env, append([]string{"__complete"}, tc.args...)...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", tc.args, code, errOut)
		}
		got := strings.Split(strings.TrimSpace(out), "\n")
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("completing %q (-want +got):\n%s", tc.args, diff)
		}
	}
}

// TestCompleteLiveProjects: with a daemon running, project arguments (and
// events --project) also complete with the projects its API lists: those
// placed through the API, which a member of api_group (who cannot read the
// state directory) only learns there.
func TestCompleteLiveProjects(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/projects" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`[{"name":"live-one","source":"api"},{"name":"alpha","source":"file"}]`))
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	cfg := filepath.Join(dir, "config.yaml")
	os.WriteFile(cfg, []byte("api_socket: "+sock+"\nprojects:\n  alpha: {}\n"), 0o644)
	env := map[string]string{"VMEGRESS_CONFIG": cfg, "VMEGRESS_STATE_DIR": filepath.Join(dir, "unreadable")}
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"net", "down", ""}, []string{"alpha", "live-one", ":4"}},
		{[]string{"policy", "explain", "l"}, []string{"live-one", ":4"}},
		{[]string{"events", "--project", ""}, []string{"alpha", "live-one", ":4"}},
	} {
		code, out, errOut := runCLI(t, env, append([]string{"__complete"}, tc.args...)...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", tc.args, code, errOut)
		}
		got := strings.Split(strings.TrimSpace(out), "\n")
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("completing %q (-want +got):\n%s", tc.args, diff)
		}
	}
}

// TestGenManAndCompletion: the packaging's generator writes a page per
// visible command (none for itself) and the three shells' completions.
func TestGenManAndCompletion(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	if code, _, errOut := runCLI(t, nil, "gen", "man", filepath.Join(dir, "man")); code != 0 {
		t.Fatalf("gen man: %d %s", code, errOut)
	}
	page, err := os.ReadFile(filepath.Join(dir, "man", "vmegress-net-down.1"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(page), `"Nov 2023"`) || !strings.Contains(string(page), "vmegress net down PROJECT") {
		t.Errorf("net down's page:\n%s", page)
	}
	if _, err := os.Stat(filepath.Join(dir, "man", "vmegress-gen.1")); err == nil {
		t.Errorf("the hidden gen command has a man page")
	}
	if code, _, errOut := runCLI(t, nil, "gen", "completion", filepath.Join(dir, "c")); code != 0 {
		t.Fatalf("gen completion: %d %s", code, errOut)
	}
	for name, want := range map[string]string{"vmegress.bash": "__start_vmegress", "_vmegress": "#compdef vmegress", "vmegress.fish": "complete -c vmegress"} {
		b, err := os.ReadFile(filepath.Join(dir, "c", name))
		if err != nil || !strings.Contains(string(b), want) {
			t.Errorf("%s lacks %q (%v)", name, want, err)
		}
	}
}
