package config

import (
	"crypto/sha256"
	"fmt"
	"os"
	"sync"
)

// Cache loads a config file again only when its bytes changed. The daemon
// reloads on every `net up`/`net down` (the placed projects are part of the
// policy), and parsing thousands of projects' rules is most of a reload;
// reading and hashing the file is not. The returned Config is shared: it
// must not be changed.
type Cache struct {
	mu     sync.Mutex
	sum    [sha256.Size]byte
	path   string
	parsed *Config
}

// Load is config.Load, but returns the previous result for the same path
// and the same bytes.
func (c *Cache) Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	sum := sha256.Sum256(data)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.parsed != nil && c.path == path && c.sum == sum {
		return c.parsed, nil
	}
	cfg, err := Parse(path, data)
	if err != nil {
		return nil, err
	}
	c.sum, c.path, c.parsed = sum, path, cfg
	return cfg, nil
}
