package main

import (
	"fmt"
	"io"
	"os"
	"sync"
)

// reopenFile is an append-only log file that can be reopened (after a
// rotation moved it away) without losing lines.
type reopenFile struct {
	path string
	mu   sync.Mutex
	f    *os.File
}

func openLog(path string) (*reopenFile, error) {
	r := &reopenFile{path: path}
	return r, r.Reopen()
}

// Reopen opens the path again and closes the previous file.
func (r *reopenFile) Reopen() error {
	f, err := os.OpenFile(r.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return fmt.Errorf("opening access log: %w", err)
	}
	r.mu.Lock()
	old := r.f
	r.f = f
	r.mu.Unlock()
	if old != nil {
		old.Close()
	}
	return nil
}

func (r *reopenFile) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.f.Write(p)
}

func (r *reopenFile) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.f.Close()
}

var _ io.Writer = (*reopenFile)(nil)
