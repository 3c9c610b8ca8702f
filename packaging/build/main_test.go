package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// wantFiles is every regular file the packages ship (man pages: the two the
// fake generator writes), by format.
var wantFiles = map[string][]string{
	"deb": {
		"/etc/logrotate.d/vmegress",
		"/etc/vmegress/config.yaml",
		"/usr/bin/vmegress",
		"/usr/lib/systemd/system/vmegress.service",
		"/usr/lib/sysusers.d/vmegress.conf",
		"/usr/lib/tmpfiles.d/vmegress.conf",
		"/usr/share/bash-completion/completions/vmegress",
		"/usr/share/fish/vendor_completions.d/vmegress.fish",
		"/usr/share/man/man1/vmegress-net-down.1.gz",
		"/usr/share/man/man1/vmegress.1.gz",
		"/usr/share/vmegress/grafana/vmegress.json",
		"/usr/share/vmegress/prometheus/alerts.yml",
		"/usr/share/vmegress/systemd/envoy-microvm-egress.service",
		"/usr/share/zsh/vendor-completions/_vmegress",
	},
}

func init() {
	rpm := slices.Clone(wantFiles["deb"])
	rpm[len(rpm)-1] = "/usr/share/zsh/site-functions/_vmegress"
	slices.Sort(rpm)
	wantFiles["rpm"] = rpm
}

// fakeTree makes what build makes before packaging: a binary and the
// generated man pages and completions.
func fakeTree(t *testing.T) (bin, gen string) {
	dir := t.TempDir()
	bin = filepath.Join(dir, "vmegress")
	os.WriteFile(bin, []byte("#!/bin/sh\necho vmegress test\n"), 0o755)
	gen = filepath.Join(dir, "gen")
	os.MkdirAll(filepath.Join(gen, "man"), 0o755)
	os.MkdirAll(filepath.Join(gen, "completion"), 0o755)
	for _, m := range []string{"vmegress.1", "vmegress-net-down.1"} {
		os.WriteFile(filepath.Join(gen, "man", m), []byte(".TH VMEGRESS 1\n"), 0o644)
	}
	if err := gzipAll(filepath.Join(gen, "man"), ".1"); err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{"vmegress.bash", "_vmegress", "vmegress.fish"} {
		os.WriteFile(filepath.Join(gen, "completion", c), []byte("# "+c+"\n"), 0o644)
	}
	return bin, gen
}

// repoRoot: the package description's paths are relative to it.
func repoRoot(t *testing.T) {
	t.Chdir("../..")
}

// TestDebContents: the .deb holds exactly the expected files, the config
// files are conffiles, and the scriptlets are there.
func TestDebContents(t *testing.T) {
	bin, gen := fakeTree(t)
	out := t.TempDir()
	repoRoot(t)
	b := &builder{out: out, spec: "packaging/nfpm.yaml"}
	path, err := b.pack(map[string]string{"ARCH": "amd64", "VERSION": "1.2.3", "BIN": bin, "GEN": gen}, "deb", "1700000000")
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(path) != "vmegress_1.2.3-1_amd64.deb" {
		t.Errorf("package name %s", filepath.Base(path))
	}
	members := readAr(t, path)
	data := tarFiles(t, members["data.tar.gz"])
	var files []string
	for name, hdr := range data {
		if hdr.Typeflag == tar.TypeReg {
			files = append(files, name)
		}
	}
	slices.Sort(files)
	if diff := cmp.Diff(wantFiles["deb"], files); diff != "" {
		t.Errorf("files (-want +got):\n%s", diff)
	}
	if m := data["/usr/bin/vmegress"].Mode; m&0o777 != 0o755 {
		t.Errorf("/usr/bin/vmegress mode %o", m)
	}
	control := tarFiles(t, members["control.tar.gz"])
	for _, s := range []string{"/postinst", "/prerm", "/postrm"} {
		if _, ok := control[s]; !ok {
			t.Errorf("no %s scriptlet", s)
		}
	}
	if _, ok := control["/preinst"]; ok {
		t.Error("an unexpected preinst")
	}
	conffiles := strings.Fields(string(control["/conffiles"].body))
	if diff := cmp.Diff([]string{"/etc/logrotate.d/vmegress", "/etc/vmegress/config.yaml"}, conffiles); diff != "" {
		t.Errorf("conffiles (-want +got):\n%s", diff)
	}
}

// TestRPMContents: the same for the .rpm, read back with rpm (when installed).
func TestRPMContents(t *testing.T) {
	if _, err := exec.LookPath("rpm"); err != nil {
		t.Skip("rpm is not installed")
	}
	bin, gen := fakeTree(t)
	out := t.TempDir()
	repoRoot(t)
	b := &builder{out: out, spec: "packaging/nfpm.yaml"}
	path, err := b.pack(map[string]string{"ARCH": "arm64", "VERSION": "1.2.3", "BIN": bin, "GEN": gen}, "rpm", "1700000000")
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(path) != "vmegress-1.2.3-1.aarch64.rpm" {
		t.Errorf("package name %s", filepath.Base(path))
	}
	q, err := exec.Command("rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILEFLAGS:fflags} %{FILENAMES}\n]", path).Output()
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	flags := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(string(q)), "\n") {
		f := strings.Fields(l)
		if len(f) == 2 { // no flags
			f = []string{f[0], "", f[1]}
		}
		if strings.HasPrefix(f[0], "-") {
			files = append(files, f[2])
			flags[f[2]] = f[1]
		}
	}
	slices.Sort(files)
	if diff := cmp.Diff(wantFiles["rpm"], files); diff != "" {
		t.Errorf("files (-want +got):\n%s", diff)
	}
	for _, c := range []string{"/etc/vmegress/config.yaml", "/etc/logrotate.d/vmegress"} {
		if flags[c] != "cn" {
			t.Errorf("%s: flags %q, want cn (%%config(noreplace))", c, flags[c])
		}
	}
	scripts, _ := exec.Command("rpm", "-qp", "--scripts", path).Output()
	for _, s := range []string{"postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet", "try-restart vmegress.service", "vmegress down"} {
		if !bytes.Contains(scripts, []byte(s)) {
			t.Errorf("rpm scripts lack %q", s)
		}
	}
}

// TestGitVersion: a tag wins; else a dev version that grows with commits.
func TestGitVersion(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  runner
		want string
	}{
		{"tag", func(_ context.Context, _ []string, _ string, args ...string) (string, error) {
			if args[0] == "describe" {
				return "v1.4.0\n", nil
			}
			return "", errors.New("unexpected")
		}, "1.4.0"},
		{"no tag", func(_ context.Context, _ []string, _ string, args ...string) (string, error) {
			if args[0] == "rev-list" {
				return "124\n", nil
			}
			return "", errors.New("no tags")
		}, "0.0.0-dev.124"},
		{"no git", func(context.Context, []string, string, ...string) (string, error) {
			return "", errors.New("not a repository")
		}, "0.0.0-dev.0"},
	} {
		b := &builder{run: tc.run}
		if got := b.gitVersion(context.Background()); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

type tarFile struct {
	*tar.Header
	body []byte
}

// readAr reads the members of an ar archive (a .deb).
func readAr(t *testing.T, path string) map[string][]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := bufio.NewReader(f)
	magic := make([]byte, 8)
	if _, err := io.ReadFull(r, magic); err != nil || string(magic) != "!<arch>\n" {
		t.Fatalf("not an ar archive: %q %v", magic, err)
	}
	out := map[string][]byte{}
	for {
		hdr := make([]byte, 60) // ar member header
		if _, err := io.ReadFull(r, hdr); err == io.EOF {
			return out
		} else if err != nil {
			t.Fatal(err)
		}
		name := strings.TrimSuffix(strings.TrimSpace(string(hdr[:16])), "/")
		var size int
		for _, c := range strings.TrimSpace(string(hdr[48:58])) {
			size = size*10 + int(c-'0')
		}
		body := make([]byte, size)
		if _, err := io.ReadFull(r, body); err != nil {
			t.Fatal(err)
		}
		if size%2 == 1 { // members are 2-byte aligned
			r.ReadByte()
		}
		out[name] = body
	}
}

// tarFiles reads a .tar.gz, by absolute path ("./x" and "x" are "/x").
func tarFiles(t *testing.T, tgz []byte) map[string]tarFile {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(tgz))
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	out := map[string]tarFile{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(tr)
		out["/"+strings.TrimPrefix(strings.TrimPrefix(h.Name, "./"), "/")] = tarFile{h, body}
	}
}
