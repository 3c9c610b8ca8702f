package proxy

// The copy path of a spliced connection. Each direction (a half) moves
// the bytes its source has already received with splice(2) through one of
// the runtime's pooled 1 MiB pipes (F_SETPIPE_SZ), held only for the burst,
// or through a pooled buffer for small bursts. While bytes keep coming a
// half runs on its own goroutine, waiting on the runtime's poller between
// bursts; a half that has seen no byte for idleAfter gives its goroutine
// back and is parked in one epoll set shared by every connection (itself
// watched by the runtime's poller), which starts a goroutine again when
// bytes or the end arrive. An idle connection so holds no goroutine, no
// pipe and no buffer: its sockets, its log entry and a few words here.

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// defaultIdleAfter is how long a half waits on its goroutine without a byte
// before it parks: long enough that a busy connection never parks between
// bursts (a park and a wake cost two epoll_ctl calls and a goroutine), short
// enough that idle connections soon cost nothing but their sockets.
const defaultIdleAfter = time.Second

// parkEvents is how many epoll events one wake of the parking loop takes.
const parkEvents = 128

// parking is the epoll set parked halves wait in. Its descriptor is
// non-blocking and read through the runtime's poller, so waiting holds no
// thread; closing it ends the loop.
type parking struct {
	// idleAfter: a half without a byte for this long parks.
	idleAfter time.Duration

	f  *os.File
	fd int // f's descriptor, open until close
	rc syscall.RawConn

	mu     sync.Mutex
	next   uint64
	parked map[uint64]*half
}

// newParking makes the epoll set and starts its loop; halves park after
// idle without a byte.
func newParking(idle time.Duration) (*parking, error) {
	fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("creating the epoll set for idle connections: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("making the epoll set for idle connections non-blocking: %w", err)
	}
	f := os.NewFile(uintptr(fd), "vmegress-idle-epoll")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("polling the epoll set for idle connections: %w", err)
	}
	pk := &parking{idleAfter: idle, f: f, fd: fd, rc: rc, parked: map[uint64]*half{}}
	go pk.loop()
	return pk, nil
}

// close ends the loop; every half must have ended first.
func (pk *parking) close() { pk.f.Close() }

// loop starts a goroutine for each parked half whose source has bytes, its
// end or an error, until the set is closed.
func (pk *parking) loop() {
	evs := make([]unix.EpollEvent, parkEvents)
	for {
		var woken []*half
		err := pk.rc.Read(func(fd uintptr) bool {
			n, err := unix.EpollWait(int(fd), evs, 0)
			for err == unix.EINTR {
				// Retried at once: the poller's edge for what is ready has
				// passed, so waiting for it now could wait forever.
				n, err = unix.EpollWait(int(fd), evs, 0)
			}
			if err != nil || n <= 0 {
				return false // nothing ready: wait for the poller
			}
			pk.mu.Lock()
			for _, ev := range evs[:n] {
				token := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
				if h := pk.parked[token]; h != nil {
					delete(pk.parked, token)
					h.inSet = false // deleted below, before h runs
					woken = append(woken, h)
				}
			}
			pk.mu.Unlock()
			return true
		})
		for _, h := range woken {
			// Out of the set while it runs: a socket moving bytes would
			// otherwise have every wake-up also pass through this set's
			// (shared) lock. The next park adds it again.
			h.srcRC.Control(func(fd uintptr) {
				unix.EpollCtl(pk.fd, unix.EPOLL_CTL_DEL, int(fd), nil)
			})
			go h.run()
		}
		if err != nil {
			return // closed
		}
	}
}

// park puts h in the set (one-shot: one wake, then h is out again). It
// returns false when h could not be parked (its source is closed) and is
// still h's to end.
func (pk *parking) park(h *half) bool {
	pk.mu.Lock()
	if h.token == 0 {
		pk.next++
		h.token = pk.next
	}
	// h's fields are written under pk.mu, before the loop can see h: the
	// goroutine the loop starts for it reads them.
	op := unix.EPOLL_CTL_MOD
	if !h.inSet {
		op = unix.EPOLL_CTL_ADD
		h.inSet = true // undone below if parking fails
	}
	token := h.token
	pk.parked[token] = h
	pk.mu.Unlock()
	var cerr error
	err := h.srcRC.Control(func(fd uintptr) {
		ev := unix.EpollEvent{
			Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT,
			Fd:     int32(uint32(token)),
			Pad:    int32(uint32(token >> 32)),
		}
		cerr = unix.EpollCtl(pk.fd, op, int(fd), &ev)
	})
	if err == nil && cerr == nil {
		return true
	}
	// Not parked: whoever takes it out of the map ends it.
	if !pk.take(h) {
		return true
	}
	h.inSet = false // take removed it from the set: the next park adds it
	return false
}

// count returns how many halves are parked.
func (pk *parking) count() int {
	pk.mu.Lock()
	defer pk.mu.Unlock()
	return len(pk.parked)
}

// take removes h from the set; true when h was parked there (the caller
// then owns it).
func (pk *parking) take(h *half) bool {
	pk.mu.Lock()
	_, ok := pk.parked[h.token]
	delete(pk.parked, h.token)
	pk.mu.Unlock()
	if ok {
		h.srcRC.Control(func(fd uintptr) {
			unix.EpollCtl(pk.fd, unix.EPOLL_CTL_DEL, int(fd), nil)
		})
	}
	return ok
}

// relay is one spliced connection: the guest's socket, the upstream one
// and the two halves copying between them, in one allocation (an idle
// connection costs this, its sockets and its log entry).
type relay struct {
	pk     *parking
	c, up  *net.TCPConn
	halves [2]half
	once   sync.Once
	// left counts the halves still running; end gets the bytes each
	// direction moved (guest to upstream, upstream to guest) once both
	// have ended.
	left atomic.Int32
	end  func(up, down int64)
}

// half copies src to dst until src ends.
type half struct {
	r        *relay
	dst, src *net.TCPConn
	srcRC    syscall.RawConn
	n        int64
	// token names h in the parking set; inSet says its source is in the
	// epoll set (parked now or armed before).
	token uint64
	inSet bool
}

// newRelay prepares copying c to up and up to c; start starts it, and end
// gets the bytes each direction moved once both have ended. With pk nil,
// halves never park.
func newRelay(pk *parking, c, up *net.TCPConn, end func(up, down int64)) (*relay, error) {
	r := &relay{pk: pk, c: c, up: up, end: end}
	r.left.Store(2)
	for i, src := range [2]*net.TCPConn{c, up} {
		rc, err := src.SyscallConn()
		if err != nil {
			return nil, fmt.Errorf("reaching the socket to copy from: %w", err)
		}
		dst := up
		if src == up {
			dst = c
		}
		r.halves[i] = half{r: r, dst: dst, src: src, srcRC: rc}
	}
	return r, nil
}

// start starts both halves parked: each gets a goroutine when its source
// has bytes or its end (at once for bytes already queued: adding a socket
// to the epoll set reports what is already readable). A connection that
// stays quiet after its first bytes (a ClientHello the server has not
// answered) so never holds a goroutine, nor leaves a dead one's stack
// behind.
func (r *relay) start() {
	for i := range r.halves {
		h := &r.halves[i]
		if r.pk != nil && r.pk.park(h) {
			continue
		}
		go h.run()
	}
}

// close closes both sockets, once; halves parked meanwhile end with it (on
// goroutines of their own: close may be called under the proxy's lock,
// which ending a connection takes).
func (r *relay) close() {
	r.once.Do(func() {
		var orphans []*half
		if r.pk != nil {
			for i := range r.halves {
				if h := &r.halves[i]; r.pk.take(h) {
					orphans = append(orphans, h)
				}
			}
		}
		r.c.Close()
		r.up.Close()
		for _, h := range orphans {
			go h.done()
		}
	})
}

// done ends h; the second half to end ends the relay.
func (h *half) done() {
	if h.r.left.Add(-1) == 0 {
		h.r.end(h.r.halves[0].n, h.r.halves[1].n)
	}
}

// run copies bursts until src ends (then it closes dst for writing and src
// for reading), fails (then both sockets close), or has been quiet for
// idleAfter (then it parks, and a later wake runs it again).
func (h *half) run() {
	parks := h.r.pk != nil
	var moved bool
	if parks {
		h.src.SetReadDeadline(time.Now().Add(h.r.pk.idleAfter))
	}
	for {
		avail, eof, err := waitAvailable(h.srcRC)
		if parks && errors.Is(err, os.ErrDeadlineExceeded) {
			if moved {
				moved = false
				h.src.SetReadDeadline(time.Now().Add(h.r.pk.idleAfter))
				continue
			}
			if h.r.pk.park(h) {
				return
			}
		}
		if err != nil {
			h.fail()
			return
		}
		if eof {
			h.dst.CloseWrite()
			h.src.CloseRead()
			h.done()
			return
		}
		var n int64
		ended := false
		if avail <= smallCopy {
			n, err = copyBurst(h.dst, h.src, avail)
			ended = err == nil && n == 0 // the source ended between the two looks
		} else {
			n, ended, err = spliceBurst(h.dst, h.srcRC)
		}
		h.n += n
		if n > 0 {
			moved = true
		}
		if parks && errors.Is(err, os.ErrDeadlineExceeded) {
			continue // the window ended as the burst began: no byte lost
		}
		if err != nil {
			h.fail()
			return
		}
		if ended {
			h.dst.CloseWrite()
			h.src.CloseRead()
			h.done()
			return
		}
	}
}

// fail closes the connection (so the other half ends too) and ends h.
func (h *half) fail() {
	h.r.close()
	h.done()
}

// copyBurst moves avail bytes that src has already received to dst.
func copyBurst(dst, src *net.TCPConn, avail int) (int64, error) {
	if avail <= smallCopy {
		// Small bursts (handshakes, requests, interactive traffic) cost
		// fewer syscalls through a buffer borrowed for this burst only
		// than through splice's pipe.
		bp := copyBufs.Get().(*[]byte)
		defer copyBufs.Put(bp)
		m, err := src.Read((*bp)[:avail])
		if errors.Is(err, io.EOF) {
			err = nil // the end: n stays 0 unless bytes came with it
		}
		if m > 0 {
			w, werr := dst.Write((*bp)[:m])
			return int64(w), werr
		}
		return 0, err
	}
	// TCPConn.ReadFrom splices through a pooled pipe of 1 MiB (the runtime
	// sets F_SETPIPE_SZ), taken for this burst only.
	return dst.ReadFrom(&io.LimitedReader{R: src, N: int64(avail)})
}

// pipeSize is the capacity asked for the pipes bulk bytes are spliced
// through (F_SETPIPE_SZ; the kernel caps it at fs.pipe-max-size, 1 MiB by
// default, unless the daemon may exceed it): a burst moves up to this much
// per pair of splice calls.
const pipeSize = 1 << 20

// splicePipe is a pipe held by one half for one burst.
type splicePipe struct {
	r, w int
	// n is how many bytes are in it.
	n int
}

// pipes keeps empty pipes between bursts; one the pool drops is closed by
// its cleanup.
var pipes = sync.Pool{New: func() any {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil
	}
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize) // smaller still works
	sp := &splicePipe{r: fds[0], w: fds[1]}
	runtime.AddCleanup(sp, func(fds [2]int) { unix.Close(fds[0]); unix.Close(fds[1]) }, fds)
	return sp
}}

// spliceBurst moves what src has received, and what keeps arriving while
// it does, to dst through a pooled pipe held for this burst only. It
// fills the pipe while dst cannot take more (up to the pipe's size), so
// the upstream's window stays open while the guest reads, and it waits
// for dst only when the pipe is full or src has nothing. It returns when
// src has nothing left (the caller waits for more), has ended (ended,
// after everything before the end was written) or its read deadline has
// passed (os.ErrDeadlineExceeded, after what came was written).
func spliceBurst(dst *net.TCPConn, srcRC syscall.RawConn) (written int64, ended bool, err error) {
	dstRC, err := dst.SyscallConn()
	if err != nil {
		return 0, false, fmt.Errorf("reaching the socket to splice to: %w", err)
	}
	sp, _ := pipes.Get().(*splicePipe)
	if sp == nil {
		return 0, false, errors.New("splicing a burst: no pipe (out of descriptors?)")
	}
	drained, late := false, false
	// fill splices what src holds into the pipe, never waiting.
	fill := func() error {
		var serr error
		err := srcRC.Read(func(fd uintptr) bool {
			for sp.n < pipeSize {
				m, e := unix.Splice(int(fd), nil, sp.w, nil, pipeSize-sp.n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				switch {
				case e == unix.EINTR:
					continue
				case e == unix.EAGAIN:
					// src is empty, or the pipe full: either way the
					// pipe is emptied before the next try.
					drained = true
					return true
				case e != nil:
					serr = e
					return true
				case m == 0:
					ended = true
					return true
				}
				sp.n += int(m)
			}
			return true
		})
		if errors.Is(err, os.ErrDeadlineExceeded) {
			drained, late = true, true // the idle window ended: flush, then say so
			return nil
		}
		if err != nil {
			return err
		}
		return serr
	}
	var werr error
	for {
		if !drained && !ended && sp.n < pipeSize {
			if err := fill(); err != nil {
				werr = err
				break
			}
		}
		if sp.n == 0 {
			break // nothing left (drained or ended)
		}
		// Never SPLICE_F_MORE: the last write of a burst is not known
		// until src says EAGAIN, and a corked tail would wait for the
		// next burst or ACK.
		var serr error
		err := dstRC.Write(func(fd uintptr) bool {
			for sp.n > 0 {
				m, e := unix.Splice(sp.r, nil, int(fd), nil, sp.n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				switch {
				case e == unix.EINTR:
					continue
				case e == unix.EAGAIN:
					// dst is full: fill the pipe meanwhile if src has
					// more and there is room; else wait for dst.
					return !drained && !ended && sp.n < pipeSize
				case e != nil:
					serr = e
					return true
				}
				sp.n -= int(m)
				written += m
			}
			return true
		})
		if err == nil {
			err = serr
		}
		if err != nil {
			werr = err
			break
		}
	}
	if sp.n == 0 {
		pipes.Put(sp)
	} // else bytes are stranded in it: dropped, never handed to another connection (its cleanup closes it)
	switch {
	case werr != nil:
		return written, false, fmt.Errorf("splicing a burst: %w", werr)
	case late && !ended:
		return written, false, os.ErrDeadlineExceeded
	}
	return written, ended, nil
}
