package hostnet

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TCP states as inet_diag reports them (include/net/tcp_states.h).
const (
	tcpListen = 10
)

// Listener is a TCP socket listening on a port of this network namespace,
// and the process holding it when one was found.
type Listener struct {
	Addr    netip.AddrPort
	Inode   uint32
	PID     int    // 0: not found (a socket of another PID namespace, or gone)
	Process string // the process's comm
}

func (l Listener) String() string {
	if l.PID == 0 {
		return fmt.Sprintf("a socket on %s (inode %d, process not found)", l.Addr, l.Inode)
	}
	return fmt.Sprintf("%s (pid %d) on %s", l.Process, l.PID, l.Addr)
}

// TCPListeners returns the listening TCP sockets (IPv4 and IPv6) on port in
// nl's network namespace, with the processes holding them, found by their
// socket inodes under procRoot (zero: /proc). nl must have been opened with
// NETLINK_INET_DIAG among its families (netlink.NewHandle(unix.NETLINK_INET_DIAG)).
func TCPListeners(nl *netlink.Handle, port uint16, procRoot string) ([]Listener, error) {
	var out []Listener
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := nl.SocketDiagTCP(fam)
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return nil, fmt.Errorf("listing TCP sockets: %w", err)
		}
		for _, s := range socks {
			if s.State != tcpListen || s.ID.SourcePort != port {
				continue
			}
			a, _ := netip.AddrFromSlice(s.ID.Source)
			out = append(out, Listener{Addr: netip.AddrPortFrom(a.Unmap(), port), Inode: s.INode})
		}
	}
	if len(out) == 0 {
		return nil, nil
	}
	owners, err := socketOwners(procRoot, out)
	if err != nil {
		return out, err
	}
	for i := range out {
		if o, ok := owners[out[i].Inode]; ok {
			out[i].PID, out[i].Process = o.pid, o.comm
		}
	}
	return out, nil
}

type owner struct {
	pid  int
	comm string
}

// socketOwners finds, for each listener's socket inode, a process with a
// descriptor on it (the lowest PID): /proc/PID/fd/N links to "socket:[INODE]".
func socketOwners(procRoot string, ls []Listener) (map[uint32]owner, error) {
	if procRoot == "" {
		procRoot = "/proc"
	}
	want := map[string]uint32{}
	for _, l := range ls {
		want["socket:["+strconv.FormatUint(uint64(l.Inode), 10)+"]"] = l.Inode
	}
	ents, err := os.ReadDir(procRoot)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", procRoot, err)
	}
	var pids []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	found := map[uint32]owner{}
	for _, pid := range pids {
		dir := filepath.Join(procRoot, strconv.Itoa(pid), "fd")
		fds, err := os.ReadDir(dir)
		if err != nil {
			continue // gone, or a kernel thread
		}
		for _, fd := range fds {
			target, err := os.Readlink(filepath.Join(dir, fd.Name()))
			if err != nil {
				continue
			}
			ino, ok := want[target]
			if !ok {
				continue
			}
			if _, done := found[ino]; done {
				continue
			}
			comm, _ := os.ReadFile(filepath.Join(procRoot, strconv.Itoa(pid), "comm"))
			found[ino] = owner{pid: pid, comm: strings.TrimSpace(string(comm))}
		}
		if len(found) == len(want) {
			break
		}
	}
	return found, nil
}

// ErrPortInUse is wrapped by CheckPortFree's refusal.
var ErrPortInUse = errors.New("a host process listens on the port")

// CheckPortFree refuses a port on which the host (nl's namespace) has a
// listening TCP socket, naming the processes: an inbound forward of that
// port (SSH DNAT to a guest) would take the host's service over.
func CheckPortFree(nl *netlink.Handle, port uint16, procRoot string) error {
	ls, err := TCPListeners(nl, port, procRoot)
	if err != nil {
		return fmt.Errorf("checking whether the host listens on port %d: %w", port, err)
	}
	if len(ls) == 0 {
		return nil
	}
	names := make([]string, len(ls))
	for i, l := range ls {
		names[i] = l.String()
	}
	return fmt.Errorf("port %d: %w: %s", port, ErrPortInUse, strings.Join(names, ", "))
}
