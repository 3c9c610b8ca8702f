// Command build makes vmegress's .deb and .rpm packages:
//
//	go run ./packaging/build [-version 1.2.3] [-arch amd64,arm64] [-format deb,rpm] [-out dist]
//
// run from the repository root. For each architecture it cross-compiles a
// static binary (CGO_ENABLED=0), generates the man pages and shell
// completions from the cobra commands of a binary built for this machine
// (so they cannot go stale), and packages everything that
// packaging/nfpm.yaml lists with nfpm, used as a library. Output:
// dist/vmegress_VERSION-1_ARCH.deb and dist/vmegress-VERSION-1.ARCH.rpm.
package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/goreleaser/nfpm/v2"
	_ "github.com/goreleaser/nfpm/v2/deb" // registers the deb packager
	_ "github.com/goreleaser/nfpm/v2/rpm" // registers the rpm packager
)

func main() {
	var (
		version = flag.String("version", "", "package version (default: from git describe, else 0.0.0-dev.<commit count>)")
		arches  = flag.String("arch", "amd64,arm64", "GOARCHes to build, comma-separated")
		formats = flag.String("format", "deb,rpm", "package formats, comma-separated")
		out     = flag.String("out", "dist", "output directory")
		spec    = flag.String("config", "packaging/nfpm.yaml", "nfpm package description")
	)
	flag.Parse()
	b := &builder{run: runCmd, out: *out, spec: *spec, logf: func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }}
	paths, err := b.build(context.Background(), *version, split(*arches), split(*formats))
	if err != nil {
		fmt.Fprintln(os.Stderr, "packaging/build:", err)
		os.Exit(1)
	}
	for _, p := range paths {
		fmt.Println(p)
	}
}

func split(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// runner runs a command with extra environment and returns its stdout; the
// error carries the argv and stderr.
type runner func(ctx context.Context, env []string, name string, args ...string) (string, error)

func runCmd(ctx context.Context, env []string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(append(os.Environ(), "LC_ALL=C"), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("running %s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

type builder struct {
	run  runner
	out  string // output directory; binaries and generated files go to out/build
	spec string // the nfpm YAML
	logf func(format string, args ...any)
}

// build makes every format for every arch and returns the package paths.
func (b *builder) build(ctx context.Context, version string, arches, formats []string) ([]string, error) {
	if len(arches) == 0 || len(formats) == 0 {
		return nil, errors.New("building packages: no architecture or no format given")
	}
	if version == "" {
		version = b.gitVersion(ctx)
	}
	epoch := b.sourceDateEpoch(ctx)
	env := []string{"SOURCE_DATE_EPOCH=" + epoch}
	work := filepath.Join(b.out, "build")
	if err := os.RemoveAll(work); err != nil {
		return nil, fmt.Errorf("cleaning %s: %w", work, err)
	}
	// Man pages and completions come from a binary this machine can run.
	host, err := b.compile(ctx, version, runtime.GOARCH, env)
	if err != nil {
		return nil, err
	}
	gen := filepath.Join(work, "gen")
	if _, err := b.run(ctx, env, host, "gen", "man", filepath.Join(gen, "man")); err != nil {
		return nil, fmt.Errorf("generating man pages: %w", err)
	}
	if err := gzipAll(filepath.Join(gen, "man"), ".1"); err != nil {
		return nil, err
	}
	if _, err := b.run(ctx, env, host, "gen", "completion", filepath.Join(gen, "completion")); err != nil {
		return nil, fmt.Errorf("generating completions: %w", err)
	}
	var paths []string
	for _, arch := range arches {
		bin := host
		if arch != runtime.GOARCH {
			if bin, err = b.compile(ctx, version, arch, env); err != nil {
				return nil, err
			}
		}
		vars := map[string]string{"ARCH": arch, "VERSION": version, "BIN": bin, "GEN": gen}
		for _, format := range formats {
			p, err := b.pack(vars, format, epoch)
			if err != nil {
				return nil, err
			}
			b.logf("built %s", p)
			paths = append(paths, p)
		}
	}
	return paths, nil
}

// compile builds a static vmegress for arch into out/build/linux-ARCH.
func (b *builder) compile(ctx context.Context, version, arch string, env []string) (string, error) {
	bin := filepath.Join(b.out, "build", "linux-"+arch, "vmegress")
	b.logf("compiling %s", bin)
	_, err := b.run(ctx, append(env, "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+arch),
		"go", "build", "-trimpath", "-ldflags", "-s -w -X main.version="+version, "-o", bin, "./cmd/vmegress")
	if err != nil {
		return "", fmt.Errorf("compiling vmegress for %s: %w", arch, err)
	}
	return bin, nil
}

// pack writes one package of format with the spec's variables set to vars.
func (b *builder) pack(vars map[string]string, format, epoch string) (string, error) {
	f, err := os.Open(b.spec)
	if err != nil {
		return "", fmt.Errorf("reading the package description: %w", err)
	}
	defer f.Close()
	cfg, err := nfpm.ParseWithEnvMapping(f, func(k string) string { return vars[k] })
	if err != nil {
		return "", fmt.Errorf("parsing %s: %w", b.spec, err)
	}
	info, err := cfg.Get(format)
	if err != nil {
		return "", fmt.Errorf("package description for %s: %w", format, err)
	}
	info = nfpm.WithDefaults(info)
	if sec, err := strconv.ParseInt(epoch, 10, 64); err == nil {
		info.MTime = unix(sec)
	}
	if err := nfpm.PrepareForPackager(info, format); err != nil {
		return "", fmt.Errorf("preparing the %s package: %w", format, err)
	}
	pkgr, err := nfpm.Get(format)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(b.out, 0o755); err != nil {
		return "", fmt.Errorf("making %s: %w", b.out, err)
	}
	path := filepath.Join(b.out, pkgr.ConventionalFileName(info))
	w, err := os.Create(path)
	if err != nil {
		return "", fmt.Errorf("writing %s: %w", path, err)
	}
	if err := pkgr.Package(info, w); err != nil {
		w.Close()
		return "", fmt.Errorf("writing %s: %w", path, err)
	}
	if err := w.Close(); err != nil {
		return "", fmt.Errorf("writing %s: %w", path, err)
	}
	return path, nil
}

// gitVersion is the version of an untagged tree: the last v* tag, else
// 0.0.0-dev.N with N the commit count (so later commits sort higher).
func (b *builder) gitVersion(ctx context.Context) string {
	if out, err := b.run(ctx, nil, "git", "describe", "--tags", "--match", "v[0-9]*", "--abbrev=0"); err == nil {
		return strings.TrimPrefix(strings.TrimSpace(out), "v")
	}
	if out, err := b.run(ctx, nil, "git", "rev-list", "--count", "HEAD"); err == nil {
		return "0.0.0-dev." + strings.TrimSpace(out)
	}
	return "0.0.0-dev.0"
}

// sourceDateEpoch is SOURCE_DATE_EPOCH, else the last commit's time, so the
// same tree gives the same files and dates.
func (b *builder) sourceDateEpoch(ctx context.Context) string {
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		return s
	}
	if out, err := b.run(ctx, nil, "git", "log", "-1", "--format=%ct"); err == nil && strings.TrimSpace(out) != "" {
		return strings.TrimSpace(out)
	}
	return "0"
}

// gzipAll replaces every dir/*ext with dir/*ext.gz (man pages are shipped
// compressed, with no name or time in the gzip header).
func gzipAll(dir, ext string) error {
	files, err := filepath.Glob(filepath.Join(dir, "*"+ext))
	if err != nil || len(files) == 0 {
		return fmt.Errorf("compressing man pages: none in %s (%v)", dir, err)
	}
	for _, name := range files {
		if err := gzipFile(name); err != nil {
			return fmt.Errorf("compressing %s: %w", name, err)
		}
	}
	return nil
}

func gzipFile(name string) error {
	in, err := os.Open(name)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(name + ".gz")
	if err != nil {
		return err
	}
	zw, _ := gzip.NewWriterLevel(out, gzip.BestCompression)
	if _, err := io.Copy(zw, in); err != nil {
		out.Close()
		return err
	}
	if err := zw.Close(); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Remove(name)
}

func unix(sec int64) time.Time { return time.Unix(sec, 0).UTC() }
