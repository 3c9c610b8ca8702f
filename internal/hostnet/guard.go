package hostnet

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// ForwardingGuard turns IPv4 forwarding off on guest interfaces
// (net.ipv4.conf.IF.forwarding=0: packets received there are never routed
// on), a kernel-level layer under the ruleset: should the ruleset vanish,
// guests still get nothing past the host. TPROXY and the DNS redirect
// deliver locally, so they are unaffected. The values found before are kept
// in StateFile so Restore puts them back.
type ForwardingGuard struct {
	// Patterns are interface names or prefixes ending in '*'.
	Patterns []string
	// Exclude are matching interfaces that need forwarding (NAT egress,
	// inbound SSH replies): Apply turns it on for them.
	Exclude []string
	// ExcludeAddrs: the interfaces holding one of these addresses are
	// excluded too (guests whose interface vmegress did not make: the host
	// address of a config subnet). Looked up with AddrLinks.
	ExcludeAddrs []netip.Addr
	// AddrLinks returns the interface of every local IPv4 address (needed
	// only when ExcludeAddrs is set).
	AddrLinks func() (map[netip.Addr]string, error)
	// StateFile records the original values (crash-safe: written before change).
	StateFile string
	// ProcSys is the root of the sysctl tree (zero: /proc/sys).
	ProcSys string
	// Links lists the current interface names.
	Links func() ([]string, error)
	// Forwarding returns every interface's forwarding value by name
	// (optional: LinkForwarding; zero: Links, then one sysctl read per
	// interface). When set, Links is not used by Apply.
	Forwarding func() (map[string]string, error)
}

func (g ForwardingGuard) path(ifname string) string {
	root := g.ProcSys
	if root == "" {
		root = "/proc/sys"
	}
	return filepath.Join(root, "net/ipv4/conf", ifname, "forwarding")
}

// Matches reports whether ifname matches one of the patterns.
func Matches(patterns []string, ifname string) bool {
	for _, p := range patterns {
		if prefix, ok := strings.CutSuffix(p, "*"); ok && strings.HasPrefix(ifname, prefix) || p == ifname {
			return true
		}
	}
	return false
}

func (g ForwardingGuard) load() (map[string]string, error) {
	saved := map[string]string{}
	b, err := os.ReadFile(g.StateFile)
	if errors.Is(err, os.ErrNotExist) {
		return saved, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", g.StateFile, err)
	}
	if err := json.Unmarshal(b, &saved); err != nil {
		return nil, fmt.Errorf("parsing %s: %w", g.StateFile, err)
	}
	return saved, nil
}

func (g ForwardingGuard) save(saved map[string]string) error {
	if err := os.MkdirAll(filepath.Dir(g.StateFile), 0o700); err != nil {
		return fmt.Errorf("creating state directory: %w", err)
	}
	b, _ := json.MarshalIndent(saved, "", "  ")
	tmp := g.StateFile + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("writing %s: %w", tmp, err)
	}
	return os.Rename(tmp, g.StateFile)
}

// Apply sets forwarding=0 on every matching interface that does not have it
// yet; it returns the interfaces it changed.
func (g ForwardingGuard) Apply() ([]string, error) {
	var links []string
	var cur map[string]string
	var err error
	if g.Forwarding != nil {
		// Its keys are the interfaces: no second link dump.
		if cur, err = g.Forwarding(); err != nil {
			return nil, fmt.Errorf("reading forwarding settings: %w", err)
		}
		links = slices.Sorted(maps.Keys(cur))
	} else if links, err = g.Links(); err != nil {
		return nil, fmt.Errorf("listing interfaces: %w", err)
	}
	value := func(ifname string) (string, bool) {
		if cur != nil {
			v, ok := cur[ifname]
			return v, ok
		}
		b, err := os.ReadFile(g.path(ifname))
		if err != nil {
			return "", false // gone meanwhile
		}
		return strings.TrimSpace(string(b)), true
	}
	exclude := make(map[string]bool, len(g.Exclude))
	for _, e := range g.Exclude {
		exclude[e] = true
	}
	if len(g.ExcludeAddrs) > 0 && g.AddrLinks != nil {
		byAddr, err := g.AddrLinks()
		if err != nil {
			return nil, fmt.Errorf("listing interface addresses: %w", err)
		}
		for _, a := range g.ExcludeAddrs {
			if l, ok := byAddr[a]; ok {
				exclude[l] = true
			}
		}
	}
	saved, err := g.load()
	if err != nil {
		return nil, err
	}
	var off []string
	var errs []error
	record := false
	for _, ifname := range links {
		if exclude[ifname] {
			if v, ok := value(ifname); ok && v != "1" {
				if err := os.WriteFile(g.path(ifname), []byte("1"), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
					errs = append(errs, fmt.Errorf("turning forwarding on for %s: %w", ifname, err))
				}
			}
			continue
		}
		if !Matches(g.Patterns, ifname) {
			continue
		}
		v, ok := value(ifname)
		if !ok || v == "0" {
			continue
		}
		if _, ok := saved[ifname]; !ok {
			saved[ifname] = v
			record = true
		}
		off = append(off, ifname)
	}
	// The values found are recorded once, before anything changes.
	if record {
		if err := g.save(saved); err != nil {
			return nil, err
		}
	}
	var changed []string
	for _, ifname := range off {
		if err := os.WriteFile(g.path(ifname), []byte("0"), 0o644); err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("turning forwarding off on %s: %w", ifname, err))
			}
			continue
		}
		changed = append(changed, ifname)
	}
	return changed, errors.Join(errs...)
}

// Restore puts back the recorded values on interfaces that still exist and
// forgets them.
func (g ForwardingGuard) Restore() error {
	saved, err := g.load()
	if err != nil {
		return err
	}
	var errs []error
	for ifname, v := range saved {
		if err := os.WriteFile(g.path(ifname), []byte(v), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("restoring forwarding on %s: %w", ifname, err))
		}
	}
	if err := os.Remove(g.StateFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
