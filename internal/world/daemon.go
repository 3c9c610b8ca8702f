package world

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// syncBuffer is a bytes.Buffer safe for one writer and many readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Daemon is a `vmegress run` process in the world's host namespace.
type Daemon struct {
	Cmd    *exec.Cmd
	stdout syncBuffer // access log
	stderr syncBuffer // daemon log
	done   chan struct{}
	err    error
}

// WriteConfig writes a config file into the world's directory and returns its path.
func (w *World) WriteConfig(name, body string) (string, error) {
	p := filepath.Join(w.Dir, name)
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		return "", fmt.Errorf("writing config: %w", err)
	}
	return p, nil
}

// Vmegress runs `binary args...` in the host namespace and returns its output.
// The state directory is the world's own.
func (w *World) Vmegress(ctx context.Context, binary string, args ...string) (string, error) {
	return Output(ctx, NS(w.Host, append([]string{binary, "--state-dir", w.StateDir(), "--api-socket", w.APISocket()}, args...)...)...)
}

// StateDir is the vmegress state directory of the world.
func (w *World) StateDir() string { return filepath.Join(w.Dir, "state") }

// APISocket is the world's vmegress API socket (unix sockets are not per
// network namespace: each world needs its own).
func (w *World) APISocket() string { return filepath.Join(w.Dir, "api.sock") }

// StartDaemon starts `binary run --config config` in the host namespace and
// waits until it logs that it is ready.
func (w *World) StartDaemon(ctx context.Context, binary, config string, env ...string) (*Daemon, error) {
	d := &Daemon{done: make(chan struct{})}
	d.Cmd = exec.Command("ip", NS(w.Host, binary, "run", "--config", config, "--state-dir", w.StateDir(), "--api-socket", w.APISocket())[1:]...)
	d.Cmd.Env = append(os.Environ(), env...)
	d.Cmd.WaitDelay = 2 * time.Second // children holding the pipes must not hang Wait
	d.Cmd.Stdout, d.Cmd.Stderr = &d.stdout, &d.stderr
	if err := d.Cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting vmegress run: %w", err)
	}
	go func() { d.err = d.Cmd.Wait(); close(d.done) }()
	w.onClose(func() { d.Kill() })
	deadline := time.NewTimer(20 * time.Second)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !strings.Contains(d.stderr.String(), `"vmegress ready"`) {
		select {
		case <-d.done:
			return nil, fmt.Errorf("vmegress run exited before it was ready (%v):\n%s", d.err, d.stderr.String())
		case <-deadline.C:
			d.Kill()
			return nil, fmt.Errorf("vmegress run not ready after 20s:\n%s", d.stderr.String())
		case <-ctx.Done():
			d.Kill()
			return nil, ctx.Err()
		case <-tick.C:
		}
	}
	return d, nil
}

// Stop sends SIGTERM and waits for the daemon to exit; it returns its exit error.
func (d *Daemon) Stop(timeout time.Duration) error {
	d.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
		return d.err
	case <-time.After(timeout):
		d.Kill()
		return fmt.Errorf("vmegress run did not stop within %s after SIGTERM", timeout)
	}
}

// Kill sends SIGKILL (a crash) and waits for the process to go.
func (d *Daemon) Kill() {
	if d.Cmd.Process != nil {
		d.Cmd.Process.Kill()
	}
	<-d.done
}

// Exited reports whether the daemon process has ended.
func (d *Daemon) Exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// Stderr is the daemon's log so far.
func (d *Daemon) Stderr() string { return d.stderr.String() }

// AccessLog returns the access-log lines so far, decoded.
func (d *Daemon) AccessLog() []map[string]any {
	var out []map[string]any
	for _, line := range strings.Split(d.stdout.String(), "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// RawAccessLog is the access log as written.
func (d *Daemon) RawAccessLog() string { return d.stdout.String() }

// WaitAccessLog waits until a line for which match is true is logged.
func (d *Daemon) WaitAccessLog(timeout time.Duration, match func(map[string]any) bool) (map[string]any, bool) {
	end := time.Now().Add(timeout)
	for {
		for _, m := range d.AccessLog() {
			if match(m) {
				return m, true
			}
		}
		if time.Now().After(end) {
			return nil, false
		}
		time.Sleep(20 * time.Millisecond)
	}
}
