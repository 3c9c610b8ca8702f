package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runCLI(t *testing.T, env map[string]string, args ...string) (int, string, string) {
	t.Helper()
	for k, v := range env {
		t.Setenv(k, v)
	}
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), args, &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func TestExitCodes(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte("projects:\n  a:\n    subnet: 172.31.0.0/30\n    allow:\n      - sni: github.com\n"), 0o644)
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("projects:\n  a:\n    subnet: 172.31.0.0/30\n    allow:\n      - sni: a..b\n"), 0o644)

	for _, tc := range []struct {
		name       string
		env        map[string]string
		args       []string
		code       int
		out, errSS string
	}{
		{"version", nil, []string{"version"}, 0, "vmegress dev\n", ""},
		{"check ok", nil, []string{"policy", "check", good}, 0, good + ": ok (1 projects, 1 rules)\n", ""},
		{"check via --config", nil, []string{"--config", good, "policy", "check"}, 0, good + ": ok", ""},
		{"check via VMEGRESS_CONFIG", map[string]string{"VMEGRESS_CONFIG": good}, []string{"policy", "check"}, 0, good + ": ok", ""},
		{"invalid config", nil, []string{"policy", "check", bad}, 2, "", bad + `:5:14: sni: "a..b": empty label (two dots in a row?)` + "\n"},
		{"invalid config for up", nil, []string{"--config", bad, "up"}, 2, "", bad + ":5:14:"},
		{"missing config", nil, []string{"policy", "check", filepath.Join(dir, "nope.yaml")}, 2, "", "does not exist"},
		{"unknown command", nil, []string{"frobnicate"}, 2, "", `unknown command "frobnicate"`},
		{"unknown flag", nil, []string{"run", "--frob"}, 2, "", "unknown flag: --frob"},
		{"extra argument", nil, []string{"version", "x"}, 2, "", "unknown command"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := runCLI(t, tc.env, tc.args...)
			if code != tc.code {
				t.Errorf("exit %d, want %d (stderr %q)", code, tc.code, errOut)
			}
			if !strings.HasPrefix(out, tc.out) {
				t.Errorf("stdout %q, want prefix %q", out, tc.out)
			}
			if !strings.Contains(errOut, tc.errSS) {
				t.Errorf("stderr %q, want %q in it", errOut, tc.errSS)
			}
		})
	}
}
