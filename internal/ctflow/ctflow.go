// Package ctflow follows the flows the kernel forwards itself (a cidr rule
// allowed them, so no data plane sees their bytes) through their conntrack
// entries, which carry firewall.KernelCTMark: it reports each flow when it
// ends (addresses, bytes each way, start and end), for the access log and
// the metrics, and cuts the flows a new policy no longer allows by deleting
// their entries (the next packet is then decided afresh by the ruleset).
package ctflow

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
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
	// (a filter drops them all: an entry already gone is no error),
	// several in one write.
	dels    *netlink.Conn
	ops     *conntrack.Conn
	procSys string

	// OnError hears of errors that do not stop Watch (may be nil).
	OnError func(error)

	// Coalesce is how long Watch waits after acting on a batch of events
	// before it reads again, so that one wake-up, one send of deletes and
	// one call of ended serve every flow that ended meanwhile (zero:
	// DefaultCoalesce; negative: no wait).
	Coalesce time.Duration

	started bool
	closed  atomic.Bool

	mu      sync.Mutex
	revoked map[uint32]bool // entries Revoke deleted, until their event
	revokes atomic.Int64    // len(revoked), read without mu
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
	t.closed.Store(true)
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
	t.mu.Lock()
	t.started = true
	t.mu.Unlock()
	return nil
}

// eventBuffer is the event socket's receive buffer: 4 MiB holds some
// 10,000 filtered events (about 400 bytes each), several seconds of new
// connections at this machine's rate, should the daemon be descheduled.
const eventBuffer = 4 << 20

// DefaultCoalesce is Tracker.Coalesce's zero value: 5 ms keeps the wake-ups
// to at most 200 a second under load, each serving every flow that ended
// meanwhile, while a flow's line comes at most that much later.
const DefaultCoalesce = 5 * time.Millisecond

// Bounds of one batch: events read before the batch is acted on, and
// read-then-delete rounds before its flows are reported (the destroy
// events of the entries a round deleted are read in the next).
const (
	maxBatchEvents = 1024
	maxRounds      = 4
	// recvBufferLen holds any one event (conntrack sizes them well under
	// 4 KiB; a longer datagram would be cut and reported as malformed).
	recvBufferLen = 64 << 10
)

// Watch calls ended with the kernel-forwarded flows that are over, when
// their entries go: at once when one enters TIME_WAIT or CLOSE (the flow
// closed or was reset; Watch deletes the entry, which would linger for
// minutes), else when it times out or is revoked. It reads the events in
// batches (see Coalesce) and calls ended once per batch; ended must not
// keep the slice. It runs until ctx ends or the socket fails.
//
// It first calls Start, if that was not done.
func (t *Tracker) Watch(ctx context.Context, ended func([]Flow)) error {
	t.mu.Lock()
	started := t.started
	t.mu.Unlock()
	if !started {
		if err := t.Start(); err != nil {
			return err
		}
	}
	evs, err := t.events.SyscallConn()
	if err != nil {
		return fmt.Errorf("reading conntrack events: %w", err)
	}
	dels, err := t.dels.SyscallConn()
	if err != nil {
		return fmt.Errorf("deleting conntrack entries: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { t.events.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	coalesce := t.Coalesce
	if coalesce == 0 {
		coalesce = DefaultCoalesce
	}
	var pause *time.Timer
	if coalesce > 0 {
		pause = time.NewTimer(coalesce)
		pause.Stop()
	}
	b := &batch{buf: make([]byte, recvBufferLen)}
	// emit reports the batch's ended flows.
	emit := func() {
		if len(b.flows) > 0 {
			ended(b.flows)
			clear(b.flows) // no reference kept to what ended was given
			b.flows = b.flows[:0]
		}
	}
	// stopping reports what was read and, when ctx ended, what is still
	// queued (without waiting): the flows that ended during the last pause.
	stopping := func() {
		if ctx.Err() != nil && !t.closed.Load() {
			t.events.SetReadDeadline(time.Time{})
			t.rounds(evs, dels, b, false)
		}
		emit()
	}
	for {
		if err := t.rounds(evs, dels, b, true); err != nil {
			if ctx.Err() != nil || t.closed.Load() || errors.Is(err, os.ErrClosed) || errors.Is(err, unix.EBADF) {
				stopping()
				return nil
			}
			emit()
			return fmt.Errorf("reading conntrack events: %w", err)
		}
		emit()
		if pause != nil {
			pause.Reset(coalesce)
			select {
			case <-ctx.Done():
				pause.Stop()
				stopping()
				return nil
			case <-pause.C:
			}
		}
	}
}

// rounds reads a batch of events (waiting for the first when wait) and
// sends the deletes they call for, then reads the destroy events those
// bring, and so on for at most maxRounds.
func (t *Tracker) rounds(evs, dels syscall.RawConn, b *batch, wait bool) error {
	for round := 0; round < maxRounds; round++ {
		if err := t.receive(evs, b, wait && round == 0); err != nil {
			return err
		}
		if len(b.dels) == 0 {
			return nil
		}
		// The kernel deletes the entries and queues their destroy events
		// while it handles the write: the next round reads them.
		if err := sendDeletes(dels, b.dels); err != nil && t.OnError != nil {
			t.OnError(fmt.Errorf("deleting the entries of ended flows: %w", err))
		}
		b.dels = b.dels[:0]
	}
	return nil
}

// batch is what Watch gathers from the events read at once.
type batch struct {
	buf   []byte // one datagram
	dels  []byte // delete requests, sent at once
	flows []Flow // ended flows
	ev    event
}

// receive reads the events queued on the event socket (at most
// maxBatchEvents), waiting for the first when wait, and adds what they
// call for to b.
func (t *Tracker) receive(rc syscall.RawConn, b *batch, wait bool) error {
	var rerr error
	got := 0
	err := rc.Read(func(fd uintptr) bool {
		for got < maxBatchEvents {
			n, err := unix.Read(int(fd), b.buf)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return got > 0 || !wait
			case err == unix.ENOBUFS: // NoENOBUFS should prevent it; keep going
				if t.OnError != nil {
					t.OnError(errors.New("conntrack events were lost (socket buffer full)"))
				}
				continue
			case err != nil:
				rerr = err
				return true
			}
			got++
			t.handleDatagram(b.buf[:n], b)
		}
		return true
	})
	if err != nil {
		return err
	}
	return rerr
}

// handleDatagram acts on the conntrack messages of one datagram.
func (t *Tracker) handleDatagram(d []byte, b *batch) {
	for len(d) > 0 {
		n, err := decodeMessage(d, &b.ev)
		if err != nil && t.OnError != nil {
			t.OnError(fmt.Errorf("decoding a conntrack event: %w", err))
		}
		if n == 0 {
			return
		}
		d = d[n:]
		if err == nil {
			t.handle(&b.ev, b)
		}
	}
}

// handle acts on one event (the filter let through only kernel-forwarded
// flows' closing updates and destroys; checked again here).
func (t *Tracker) handle(ev *event, b *batch) {
	if ev.mark&firewall.KernelCTMark == 0 || ev.proto != protoTCP {
		return
	}
	switch ev.kind {
	case eventUpdate:
		if !ev.hasTCPState || (ev.tcpState != tcpTimeWait && ev.tcpState != tcpClose) {
			return
		}
		// Over, but the entry would linger for minutes; update events
		// carry no byte counters. Deleting it brings the destroy event,
		// with the counters, now. (A late packet of the flow is decided
		// afresh by the ruleset.) The deletes of a batch go in one send,
		// without waiting for the kernel's answers.
		if ev.flow.Src.Addr().Is4() == ev.flow.Dst.Addr().Is4() && ev.flow.Src.IsValid() && ev.flow.Dst.IsValid() {
			b.dels = appendDelete(b.dels, ev.flow.Src, ev.flow.Dst, ev.zone)
		}
	case eventDestroy:
		f := ev.flow
		if t.revokes.Load() > 0 {
			t.mu.Lock()
			f.Revoked = t.revoked[ev.id]
			delete(t.revoked, ev.id)
			t.revokes.Store(int64(len(t.revoked)))
			t.mu.Unlock()
		}
		b.flows = append(b.flows, f)
	}
}

// maxDeleteSend bounds one send of delete requests (each is 72 to 104
// bytes), well under a netlink socket's default send buffer.
const maxDeleteSend = 32 << 10

// sendDeletes sends the delete requests of reqs (whole messages), in as
// few writes as maxDeleteSend allows.
func sendDeletes(rc syscall.RawConn, reqs []byte) error {
	var errs []error
	for len(reqs) > 0 {
		n := 0
		for n < len(reqs) {
			l := int(binary.NativeEndian.Uint32(reqs[n:]))
			if n > 0 && n+l > maxDeleteSend {
				break
			}
			n += l
		}
		var werr error
		err := rc.Write(func(fd uintptr) bool {
			_, werr = unix.Write(int(fd), reqs[:n])
			return werr != unix.EAGAIN
		})
		if err == nil {
			err = werr
		}
		if err != nil {
			errs = append(errs, err)
		}
		reqs = reqs[n:]
	}
	return errors.Join(errs...)
}

// Open returns the open kernel-forwarded flows, as conntrack holds them
// now (one dump, filtered by mark in the kernel).
func (t *Tracker) Open() ([]Flow, error) {
	flows, err := t.ops.DumpFilter(conntrack.NewFilter().Mark(firewall.KernelCTMark).MarkMask(firewall.KernelCTMark), nil)
	if err != nil {
		return nil, fmt.Errorf("listing kernel-forwarded flows: %w", err)
	}
	out := make([]Flow, 0, len(flows))
	for i := range flows {
		if kernelForwarded(&flows[i]) {
			out = append(out, flowOf(&flows[i]))
		}
	}
	return out, nil
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
		// Remembered until its destroy event, which only a started
		// tracker hears (a cut at the daemon's start comes before).
		if t.started {
			if t.revoked == nil {
				t.revoked = map[uint32]bool{}
			}
			t.revoked[f.ID] = true
			t.revokes.Store(int64(len(t.revoked)))
		}
		t.mu.Unlock()
		if err := t.ops.Delete(*f); err != nil {
			errs = append(errs, fmt.Errorf("deleting the conntrack entry of %s -> %s: %w", flowOf(f).Src, flowOf(f).Dst, err))
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}
