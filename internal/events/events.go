// Package events fans vmegress's decisions (every connection and DNS verdict,
// with the access log's fields) and changes (projects placed, removed,
// policies replaced) out to live subscribers: the API's /v1/events stream.
//
// Publishing never blocks and never waits on a subscriber: each has a
// bounded queue, and one that falls behind is sent a "lagged" event and
// dropped, so a slow reader can never slow the data plane or the resolver.
package events

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Event is one JSON object of the stream. "type" is connection, dns,
// change or lagged; the other keys are the access log's (project, src, dst,
// sni, host, verdict, rule, reason, ...) or the change's.
type Event map[string]any

// Filter selects events by project and verdict ("" matches any). Changes
// pass a verdict filter; lagged events always pass.
type Filter struct {
	Project string
	Verdict string
}

func (f Filter) match(e Event) bool {
	if e["type"] == "lagged" {
		return true
	}
	if f.Project != "" && e["project"] != f.Project {
		return false
	}
	if f.Verdict != "" && e["type"] != "change" && e["verdict"] != f.Verdict {
		return false
	}
	return true
}

// QueueLen is each subscriber's queue: events a reader may fall behind by
// before it is dropped.
const QueueLen = 4096

// Hub holds the subscribers. The zero value is ready.
type Hub struct {
	mu   sync.RWMutex
	subs map[*Subscription]struct{}
	n    atomic.Int32 // subscribers, read without the lock on the hot path
}

// Subscription is one reader's queue.
type Subscription struct {
	C      <-chan Event
	c      chan Event
	filter Filter
	// Lagged is set when the queue overflowed (C is closed then).
	lagged atomic.Bool
	once   sync.Once
	hub    *Hub
}

// Lagged reports whether the subscription was dropped for falling behind.
func (s *Subscription) Lagged() bool { return s.lagged.Load() }

// Subscribe adds a reader; Close it when done.
func (h *Hub) Subscribe(f Filter) *Subscription {
	c := make(chan Event, QueueLen)
	s := &Subscription{C: c, c: c, filter: f, hub: h}
	h.mu.Lock()
	if h.subs == nil {
		h.subs = map[*Subscription]struct{}{}
	}
	h.subs[s] = struct{}{}
	h.n.Store(int32(len(h.subs)))
	h.mu.Unlock()
	return s
}

// Close removes the subscription.
func (s *Subscription) Close() {
	s.once.Do(func() {
		h := s.hub
		h.mu.Lock()
		delete(h.subs, s)
		h.n.Store(int32(len(h.subs)))
		h.mu.Unlock()
		close(s.c)
	})
}

// Active reports whether anyone listens (publishers skip building events
// when no one does).
func (h *Hub) Active() bool { return h != nil && h.n.Load() > 0 }

// Publish hands e to every matching subscriber without blocking; one whose
// queue is full is marked lagged and dropped.
func (h *Hub) Publish(e Event) {
	if !h.Active() {
		return
	}
	if _, ok := e["time"]; !ok {
		e["time"] = time.Now().UTC().Format(time.RFC3339Nano)
	}
	var full []*Subscription
	h.mu.RLock()
	for s := range h.subs {
		if !s.filter.match(e) {
			continue
		}
		select {
		case s.c <- e:
		default:
			full = append(full, s)
		}
	}
	h.mu.RUnlock()
	for _, s := range full {
		s.lagged.Store(true)
		s.Close()
	}
}

// Handler is a slog.Handler that passes records to Next and publishes each
// as an event whose type is the record's message ("connection", "dns"):
// the access log's lines, as they are written.
type Handler struct {
	Next slog.Handler
	Hub  *Hub
}

// Enabled implements slog.Handler.
func (h Handler) Enabled(ctx context.Context, l slog.Level) bool { return h.Next.Enabled(ctx, l) }

// Handle implements slog.Handler.
func (h Handler) Handle(ctx context.Context, r slog.Record) error {
	if h.Hub.Active() {
		e := Event{"type": r.Message, "time": r.Time.UTC().Format(time.RFC3339Nano)}
		r.Attrs(func(a slog.Attr) bool {
			k := a.Key
			if k == "type" {
				k = "qtype" // a DNS query's type; "type" is the event's
			}
			e[k] = a.Value.Resolve().Any()
			return true
		})
		h.Hub.Publish(e)
	}
	return h.Next.Handle(ctx, r)
}

// WithAttrs implements slog.Handler (the attributes go to Next only).
func (h Handler) WithAttrs(as []slog.Attr) slog.Handler {
	return Handler{Next: h.Next.WithAttrs(as), Hub: h.Hub}
}

// WithGroup implements slog.Handler.
func (h Handler) WithGroup(name string) slog.Handler {
	return Handler{Next: h.Next.WithGroup(name), Hub: h.Hub}
}

// LineWriter passes JSON lines (Envoy's access log) to W and publishes each
// complete line as an event, its "msg" as the type.
type LineWriter struct {
	W   io.Writer
	Hub *Hub
	// Observe, when set, is given every line's event (before it is
	// published; it must not keep or change it): the Envoy plane's metrics.
	Observe func(Event)

	mu  sync.Mutex
	buf []byte
}

// Write implements io.Writer.
func (lw *LineWriter) Write(p []byte) (int, error) {
	n, err := lw.W.Write(p)
	if !lw.Hub.Active() && lw.Observe == nil {
		return n, err
	}
	lw.mu.Lock()
	defer lw.mu.Unlock()
	lw.buf = append(lw.buf, p...)
	for {
		i := bytes.IndexByte(lw.buf, '\n')
		if i < 0 {
			break
		}
		line := lw.buf[:i]
		var e Event
		if json.Unmarshal(line, &e) == nil {
			if m, ok := e["msg"].(string); ok {
				e["type"] = m
				delete(e, "msg")
			}
			if lw.Observe != nil {
				lw.Observe(e)
			}
			lw.Hub.Publish(e)
		}
		lw.buf = lw.buf[i+1:]
	}
	if len(lw.buf) > 64<<10 {
		lw.buf = nil // not line-oriented: stop buffering
	}
	return n, err
}

// WriteStream writes sub's events to w as newline-delimited JSON until ctx
// ends or the subscription is dropped (then a lagged event is written).
// beforeWrite (may be nil) runs before each batch is written: the place to
// set a write deadline, so a reader that stops reading cannot hold the
// writer forever.
func WriteStream(ctx context.Context, w io.Writer, flush func(), sub *Subscription, beforeWrite func()) error {
	bw := bufio.NewWriter(w)
	enc := json.NewEncoder(bw)
	if beforeWrite == nil {
		beforeWrite = func() {}
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-sub.C:
			beforeWrite()
			if !ok {
				if sub.Lagged() {
					enc.Encode(Event{"type": "lagged", "reason": "the reader fell behind; reconnect to resume"})
					bw.Flush()
					flush()
				}
				return nil
			}
			if err := enc.Encode(e); err != nil {
				return err
			}
			// More queued: write them before flushing, in one go.
			for len(sub.C) > 0 {
				if err := enc.Encode(<-sub.C); err != nil {
					return err
				}
			}
			if err := bw.Flush(); err != nil {
				return err
			}
			flush()
		}
	}
}
