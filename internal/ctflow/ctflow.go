// Package ctflow follows the flows the kernel forwards itself (a cidr rule
// allowed them, so no data plane sees their bytes) through their conntrack
// entries, which carry firewall.KernelCTMark: it reports each flow when it
// ends (addresses, bytes each way, start and end), for the access log and
// the metrics, and cuts the flows a new policy no longer allows by deleting
// their entries (the next packet is then decided afresh by the ruleset).
package ctflow

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"
	"github.com/ti-mo/netfilter"
	"golang.org/x/sys/unix"

	"github.com/vmegress/vmegress/internal/firewall"
)

// Flow is one ended (or, for Revoke, open) kernel-forwarded flow.
type Flow struct {
	// Src is the guest's side, Dst the destination it connected to.
	Src, Dst netip.AddrPort
	// Up and Down are the bytes (IP) the guest sent and received.
	Up, Down    uint64
	Start, Stop time.Time
	// Revoked: Revoke cut it (a new policy no longer allows it).
	Revoked bool
}

// Tracker watches and deletes kernel-forwarded flows over two conntrack
// netlink sockets of the current network namespace.
type Tracker struct {
	// events hears conntrack's update and destroy events through a BPF
	// filter (eventFilter): only those of kernel-forwarded flows that
	// Watch acts on reach it.
	events *netlink.Conn
	// dels sends the deletes of ended flows without waiting for answers
	// (a filter drops them all: an entry already gone is no error).
	dels    *netlink.Conn
	ops     *conntrack.Conn
	procSys string

	// OnError hears of errors that do not stop Watch (may be nil).
	OnError func(error)

	started bool

	mu      sync.Mutex
	revoked map[uint32]bool // entries Revoke deleted, until their event
}

// Open dials conntrack. procSys is the root of the sysctl tree (zero:
// /proc/sys), where Watch turns the flows' byte counters on.
func Open(procSys string) (*Tracker, error) {
	if procSys == "" {
		procSys = "/proc/sys"
	}
	ev, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return nil, fmt.Errorf("opening a conntrack event socket: %w", err)
	}
	ops, err := conntrack.Dial(nil)
	if err != nil {
		ev.Close()
		return nil, fmt.Errorf("opening a conntrack socket: %w", err)
	}
	dels, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err == nil {
		err = dels.SetBPF(dropAll)
	}
	if err != nil {
		ev.Close()
		ops.Close()
		if dels != nil {
			dels.Close()
		}
		return nil, fmt.Errorf("opening a conntrack socket for deletes: %w", err)
	}
	return &Tracker{events: ev, dels: dels, ops: ops, procSys: procSys}, nil
}

// Close closes the sockets (Watch returns).
func (t *Tracker) Close() error {
	return errors.Join(t.events.Close(), t.dels.Close(), t.ops.Close())
}

func kernelForwarded(f *conntrack.Flow) bool {
	return f != nil && f.Mark&firewall.KernelCTMark != 0 && f.TupleOrig.Proto.Protocol == 6 // TCP
}

func flowOf(f *conntrack.Flow) Flow {
	return Flow{
		Src:   netip.AddrPortFrom(f.TupleOrig.IP.SourceAddress.Unmap(), f.TupleOrig.Proto.SourcePort),
		Dst:   netip.AddrPortFrom(f.TupleOrig.IP.DestinationAddress.Unmap(), f.TupleOrig.Proto.DestinationPort),
		Up:    f.CountersOrig.Bytes,
		Down:  f.CountersReply.Bytes,
		Start: f.Timestamp.Start,
		Stop:  f.Timestamp.Stop,
	}
}

// TCP states of conntrack (enum tcp_conntrack) in which a flow is over:
// both sides closed (its entry lingers for minutes before it goes) or reset.
const (
	tcpTimeWait = 7
	tcpClose    = 8
)

// Start turns on the per-flow byte counters and timestamps
// (net.netfilter.nf_conntrack_acct and _timestamp, per network namespace;
// there once the ruleset, which uses conntrack, is installed) and joins the
// conntrack event groups. Flows created before it are not reported (with
// the default nf_conntrack_events=2 an entry carries events only if a
// listener existed when it was made): call it before guests are served.
func (t *Tracker) Start() error {
	for _, k := range []string{"nf_conntrack_acct", "nf_conntrack_timestamp"} {
		p := filepath.Join(t.procSys, "net/netfilter", k)
		if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
			return fmt.Errorf("turning on %s (is nf_conntrack loaded?): %w", k, err)
		}
	}
	// The filter first: no event the daemon does not need may wake it.
	prog, err := eventFilter(firewall.KernelCTMark)
	if err != nil {
		return err
	}
	if err := t.events.SetBPF(prog); err != nil {
		return fmt.Errorf("filtering conntrack events: %w", err)
	}
	// BroadcastError: a destroy event the socket cannot take is kept by
	// the kernel and delivered again (conntrack's reliable delivery), so
	// no ended flow goes unlogged; NoENOBUFS: an overrun does not fail
	// the socket (what it loses is at most an update event, so a closed
	// flow is logged when its entry times out instead of at once).
	for _, o := range []netlink.ConnOption{netlink.BroadcastError, netlink.NoENOBUFS} {
		if err := t.events.SetOption(o, true); err != nil {
			return fmt.Errorf("setting conntrack event socket option %d: %w", o, err)
		}
	}
	if err := t.events.SetReadBuffer(eventBuffer); err != nil {
		return fmt.Errorf("sizing the conntrack event socket's buffer: %w", err)
	}
	for _, g := range []netfilter.NetlinkGroup{netfilter.GroupCTUpdate, netfilter.GroupCTDestroy} {
		if err := t.events.JoinGroup(uint32(g)); err != nil {
			return fmt.Errorf("listening for conntrack events (group %d): %w", g, err)
		}
	}
	t.started = true
	return nil
}

// eventBuffer is the event socket's receive buffer: 4 MiB holds some
// 10,000 filtered events (about 400 bytes each), several seconds of new
// connections at this machine's rate, should the daemon be descheduled.
const eventBuffer = 4 << 20

// Watch calls ended once for every kernel-forwarded flow that is over, when
// its entry goes: at once when it enters TIME_WAIT or CLOSE (the flow closed
// or was reset; Watch deletes the entry, which would linger for minutes),
// else when it times out or is revoked. It runs until ctx ends or the
// socket fails.
//
// It first turns on the per-flow byte counters and timestamps
// (net.netfilter.nf_conntrack_acct and _timestamp, per network namespace;
// there once the ruleset, which uses conntrack, is installed).
func (t *Tracker) Watch(ctx context.Context, ended func(Flow)) error {
	if !t.started {
		if err := t.Start(); err != nil {
			return err
		}
	}
	stop := context.AfterFunc(ctx, func() { t.events.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	for {
		msgs, err := t.events.Receive()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, os.ErrClosed) || errors.Is(err, unix.EBADF) {
				return nil
			}
			if errors.Is(err, unix.ENOBUFS) { // NoENOBUFS should prevent it; keep going
				if t.OnError != nil {
					t.OnError(fmt.Errorf("conntrack events were lost (socket buffer full)"))
				}
				continue
			}
			return fmt.Errorf("reading conntrack events: %w", err)
		}
		for _, m := range msgs {
			var ev conntrack.Event
			if err := ev.Unmarshal(m); err != nil {
				if t.OnError != nil {
					t.OnError(fmt.Errorf("decoding a conntrack event: %w", err))
				}
				continue
			}
			t.handle(ev, ended)
		}
	}
}

// handle acts on one event (the filter let through only kernel-forwarded
// flows' closing updates and destroys; checked again here).
func (t *Tracker) handle(ev conntrack.Event, ended func(Flow)) {
	if !kernelForwarded(ev.Flow) {
		return
	}
	switch ev.Type {
	case conntrack.EventUpdate:
		if tcp := ev.Flow.ProtoInfo.TCP; tcp == nil || (tcp.State != tcpTimeWait && tcp.State != tcpClose) {
			return
		}
		// Over, but the entry would linger for minutes; update events
		// carry no byte counters. Deleting it brings the destroy event,
		// with the counters, now. (A late packet of the flow is decided
		// afresh by the ruleset.)
		// Sent without waiting for the kernel's answer: a round trip
		// per flow was the daemon's largest cost at high connection rates.
		f := flowOf(ev.Flow)
		m, err := deleteMessage(f.Src, f.Dst, ev.Flow.Zone)
		if err == nil {
			_, err = t.dels.Send(m)
		}
		if err != nil && t.OnError != nil {
			t.OnError(fmt.Errorf("deleting the entry of an ended flow: %w", err))
		}
	case conntrack.EventDestroy:
		t.mu.Lock()
		revoked := t.revoked[ev.Flow.ID]
		delete(t.revoked, ev.Flow.ID)
		t.mu.Unlock()
		fl := flowOf(ev.Flow)
		fl.Revoked = revoked
		ended(fl)
	}
}

// Revoke deletes the entries of the open kernel-forwarded flows for which
// keep is false, and returns how many it deleted.
func (t *Tracker) Revoke(keep func(Flow) bool) (int, error) {
	flows, err := t.ops.DumpFilter(conntrack.NewFilter().Mark(firewall.KernelCTMark).MarkMask(firewall.KernelCTMark), nil)
	if err != nil {
		return 0, fmt.Errorf("listing kernel-forwarded flows: %w", err)
	}
	n := 0
	var errs []error
	for i := range flows {
		f := &flows[i]
		if !kernelForwarded(f) || keep(flowOf(f)) {
			continue
		}
		t.mu.Lock()
		if t.revoked == nil {
			t.revoked = map[uint32]bool{}
		}
		t.revoked[f.ID] = true
		t.mu.Unlock()
		if err := t.ops.Delete(*f); err != nil {
			errs = append(errs, fmt.Errorf("deleting the conntrack entry of %s -> %s: %w", flowOf(f).Src, flowOf(f).Dst, err))
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}
