// Package state keeps vmegress's per-project host allocations (TAP, /30,
// MAC, SSH port, egress mode) in the state directory. Every change runs
// under an exclusive file lock and is written atomically (temporary file,
// fsync, rename), so concurrent `net up` calls never collide and a crash
// never leaves a half-written record.
package state

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// FileName is the state file inside the state directory; legacyFileName
// is its JSON predecessor, read when FileName is absent (the next write
// replaces it).
const (
	FileName       = "projects"
	legacyFileName = "projects.json"
)

// Egress modes of a project.
const (
	EgressProxy = "proxy" // through vmegress's interception (default)
	EgressNAT   = "nat"   // the spec's direct NAT egress, unfiltered
)

// Project is one project's host allocation.
type Project struct {
	Name    string       `json:"name"`
	TAP     string       `json:"tap"`
	Subnet  netip.Prefix `json:"subnet"`
	MAC     string       `json:"mac"`
	Owner   *uint32      `json:"owner,omitempty"`
	Group   *uint32      `json:"group,omitempty"`
	SSHPort uint16       `json:"ssh_port,omitempty"`
	Egress  string       `json:"egress"`
}

// HostIP is the host's address on the project's TAP (.1 of the /30).
func (p Project) HostIP() netip.Addr { return p.Subnet.Masked().Addr().Next() }

// GuestIP is the guest's address (.2 of the /30).
func (p Project) GuestIP() netip.Addr { return p.HostIP().Next() }

// State is every project's allocation.
type State struct {
	Projects map[string]Project `json:"projects"`
}

// Sorted returns the projects by name.
func (s *State) Sorted() []Project {
	out := make([]Project, 0, len(s.Projects))
	for _, p := range s.Projects {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Store is the state file of one state directory.
type Store struct {
	Dir string
}

func (st Store) path() string { return filepath.Join(st.Dir, FileName) }

// Load reads the state (empty if there is none yet). It takes no lock: the
// file is only ever replaced whole, so a reader sees the old or the new one.
func (st Store) Load() (*State, error) {
	b, err := os.ReadFile(st.path())
	if errors.Is(err, os.ErrNotExist) {
		return st.loadLegacy()
	}
	if err != nil {
		return nil, fmt.Errorf("reading state: %w", err)
	}
	s, err := Unmarshal(b)
	if err != nil {
		return nil, fmt.Errorf("parsing state %s: %w", st.path(), err)
	}
	return s, nil
}

func (st Store) loadLegacy() (*State, error) {
	s := &State{Projects: map[string]Project{}}
	path := filepath.Join(st.Dir, legacyFileName)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading state: %w", err)
	}
	if err := json.Unmarshal(b, s); err != nil {
		return nil, fmt.Errorf("parsing state %s: %w", path, err)
	}
	if s.Projects == nil {
		s.Projects = map[string]Project{}
	}
	for n, p := range s.Projects {
		if p.Egress == "" {
			p.Egress = EgressProxy
			s.Projects[n] = p
		}
	}
	return s, nil
}

// Lock takes the state directory's exclusive lock (a flock on its lock
// file) and returns its release.
func (st Store) Lock() (unlock func(), err error) {
	return st.lock(unix.LOCK_EX)
}

// ErrLocked is TryLock's answer when another process holds the lock (a
// running daemon holds it for its whole life).
var ErrLocked = errors.New("the state directory is locked by another process")

// TryLock takes the lock if it is free and returns ErrLocked otherwise.
func (st Store) TryLock() (unlock func(), err error) {
	unlock, err = st.lock(unix.LOCK_EX | unix.LOCK_NB)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return nil, ErrLocked
	}
	return unlock, err
}

func (st Store) lock(how int) (unlock func(), err error) {
	if err := os.MkdirAll(st.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating state directory: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(st.Dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening state lock: %w", err)
	}
	if err := unix.Flock(int(lock.Fd()), how); err != nil {
		lock.Close()
		return nil, fmt.Errorf("locking state: %w", err)
	}
	return func() { lock.Close() }, nil // closing the last descriptor releases the flock
}

// Update runs f on the current state under the exclusive lock and writes
// the result atomically if f succeeds. f's error aborts without writing.
// Then, still under the lock, each of then runs (bringing the host in line
// with the new state), so a reader holding the lock sees both or neither.
func (st Store) Update(f func(*State) error, then ...func() error) error {
	unlock, err := st.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	if err := st.write(f); err != nil {
		return err
	}
	for _, g := range then {
		if err := g(); err != nil {
			return err
		}
	}
	return nil
}

func (st Store) write(f func(*State) error) error {
	s, err := st.Load()
	if err != nil {
		return err
	}
	if err := f(s); err != nil {
		return err
	}
	return st.Save(s)
}

// Save writes s atomically (temporary file, fsync, rename). The caller
// holds the lock.
func (st Store) Save(s *State) error {
	if err := os.MkdirAll(st.Dir, 0o700); err != nil {
		return fmt.Errorf("creating state directory: %w", err)
	}
	b, err := Marshal(s)
	if err != nil {
		return fmt.Errorf("writing state: %w", err)
	}
	tmp, err := os.CreateTemp(st.Dir, FileName+".*")
	if err != nil {
		return fmt.Errorf("writing state: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("writing state: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("writing state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing state: %w", err)
	}
	if err := os.Rename(tmp.Name(), st.path()); err != nil {
		return fmt.Errorf("writing state: %w", err)
	}
	if err := os.Remove(filepath.Join(st.Dir, legacyFileName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the old state file: %w", err)
	}
	return nil
}

// MAC derives a stable, locally administered unicast MAC for a project's
// guest: 02 followed by five bytes of SHA-256 of the project name.
func MAC(project string) string {
	h := sha256.Sum256([]byte("vmegress:" + project))
	return net.HardwareAddr{0x02, h[0], h[1], h[2], h[3], h[4]}.String()
}

// TAPName is the default TAP name of a project: "tap-" and the name, or a
// hashed form when that would exceed the kernel's 15 characters.
func TAPName(project string) string {
	if n := "tap-" + project; len(n) <= 15 {
		return n
	}
	h := sha256.Sum256([]byte(project))
	return fmt.Sprintf("tap-%.6s%x", project, h[:2])
}

// ErrNoFreeSubnet is returned when vm_cidr has no free /30 left.
var ErrNoFreeSubnet = errors.New("no free /30 left in vm_cidr")

// Allocate returns the first /30 of vmCIDR that overlaps none of used. It
// marks the used /30s in a bitmap of vmCIDR's slots (a /16 has 16,384: 2 KiB),
// so it costs one pass over used, not a lookup per candidate.
func Allocate(vmCIDR netip.Prefix, used []netip.Prefix) (netip.Prefix, error) {
	vmCIDR = vmCIDR.Masked()
	if !vmCIDR.Addr().Is4() || vmCIDR.Bits() > 30 {
		return netip.Prefix{}, ErrNoFreeSubnet
	}
	base := be32(vmCIDR.Addr())
	slots := uint64(1) << (30 - vmCIDR.Bits())
	taken := make([]uint64, (slots+63)/64)
	for _, u := range used {
		if !u.IsValid() || !u.Addr().Is4() || !vmCIDR.Overlaps(u) {
			continue
		}
		// Every slot the prefix touches (a /30 touches one).
		first, last := be32(u.Masked().Addr()), be32(u.Masked().Addr())|(1<<(32-u.Bits())-1)
		if u.Bits() == 0 {
			last = ^uint32(0)
		}
		for a := uint64(max(first, base)) >> 2; a <= uint64(min(last, base|uint32(slots*4-1)))>>2; a++ {
			i := a - uint64(base>>2)
			taken[i/64] |= 1 << (i % 64)
		}
	}
	for i := uint64(0); i < slots; i++ {
		if taken[i/64]&(1<<(i%64)) == 0 {
			return netip.PrefixFrom(from32(base+uint32(i*4)), 30), nil
		}
	}
	return netip.Prefix{}, ErrNoFreeSubnet
}

func be32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func from32(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Clone returns a copy of s that shares no map with it.
func (s *State) Clone() *State {
	c := &State{Projects: make(map[string]Project, len(s.Projects))}
	for k, v := range s.Projects {
		c.Projects[k] = v
	}
	return c
}

// With returns a copy of s with p added or replaced.
func (s *State) With(p Project) *State {
	c := s.Clone()
	c.Projects[p.Name] = p
	return c
}

// Without returns a copy of s without the named project.
func (s *State) Without(name string) *State {
	c := s.Clone()
	delete(c.Projects, name)
	return c
}

// policyDir holds the policies of projects the API owns, one file each.
const policyDir = "policies"

// PolicyPath is the file holding an API project's policy.
func (st Store) PolicyPath(name string) string {
	return filepath.Join(st.Dir, policyDir, name+".json")
}

// SavePolicy writes an API project's policy atomically. The caller holds
// the lock.
func (st Store) SavePolicy(name string, data []byte) error {
	dir := filepath.Join(st.Dir, policyDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("writing the policy of %s: %w", name, err)
	}
	if err := writeAtomic(dir, name+".json", data); err != nil {
		return fmt.Errorf("writing the policy of %s: %w", name, err)
	}
	return nil
}

// RemovePolicy removes an API project's policy (absent: not an error).
func (st Store) RemovePolicy(name string) error {
	if err := os.Remove(st.PolicyPath(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the policy of %s: %w", name, err)
	}
	return nil
}

// LoadPolicies reads every API project's policy, by project name.
func (st Store) LoadPolicies() (map[string][]byte, error) {
	dir := filepath.Join(st.Dir, policyDir)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return map[string][]byte{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading policies: %w", err)
	}
	out := make(map[string][]byte, len(entries))
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || e.IsDir() {
			continue // temporary files of an interrupted write
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("reading policies: %w", err)
		}
		out[name] = b
	}
	return out, nil
}

// writeAtomic replaces dir/name with data: temporary file, fsync, rename,
// fsync of the directory.
func writeAtomic(dir, name string, data []byte) error {
	tmp, err := os.CreateTemp(dir, "."+name+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), filepath.Join(dir, name)); err != nil {
		return err
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
