package events

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
)

func TestHubFilterAndLag(t *testing.T) {
	var h Hub
	all := h.Subscribe(Filter{})
	deny := h.Subscribe(Filter{Project: "a", Verdict: "deny"})
	h.Publish(Event{"type": "connection", "project": "a", "verdict": "allow"})
	h.Publish(Event{"type": "connection", "project": "a", "verdict": "deny"})
	h.Publish(Event{"type": "connection", "project": "b", "verdict": "deny"})
	h.Publish(Event{"type": "change", "project": "a", "change": "policy"})
	if len(all.C) != 4 || len(deny.C) != 2 {
		t.Fatalf("queued %d and %d, want 4 and 2", len(all.C), len(deny.C))
	}
	// A reader that never reads is dropped once its queue is full; the
	// publisher never waits.
	for i := 0; i < QueueLen; i++ {
		h.Publish(Event{"type": "dns", "project": "b", "verdict": "allow"})
	}
	if !all.Lagged() || deny.Lagged() {
		t.Errorf("lagged: all %v, deny %v; want only the full one dropped", all.Lagged(), deny.Lagged())
	}
	var out bytes.Buffer
	WriteStream(context.Background(), &out, func() {}, all, nil)
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if !strings.Contains(lines[len(lines)-1], `"type":"lagged"`) {
		t.Errorf("the stream did not end with a lagged event: %s", lines[len(lines)-1])
	}
	deny.Close()
	if h.Active() {
		t.Error("subscribers left after closing")
	}
}

func TestHandlerPublishesAccessLog(t *testing.T) {
	var h Hub
	sub := h.Subscribe(Filter{})
	var buf bytes.Buffer
	log := slog.New(Handler{Next: slog.NewJSONHandler(&buf, nil), Hub: &h})
	log.Info("dns", "project", "a", "name", "example.com", "type", "A", "verdict", "deny")
	e := <-sub.C
	if e["type"] != "dns" || e["qtype"] != "A" || e["verdict"] != "deny" {
		t.Errorf("event %v", e)
	}
	if !strings.Contains(buf.String(), `"type":"A"`) {
		t.Errorf("the access log line changed: %s", buf.String())
	}
	lw := &LineWriter{W: &bytes.Buffer{}, Hub: &h}
	line, _ := json.Marshal(map[string]any{"msg": "connection", "project": "a", "verdict": "allow"})
	lw.Write(line[:5])
	lw.Write(append(line[5:], '\n'))
	if e := <-sub.C; e["type"] != "connection" || e["project"] != "a" {
		t.Errorf("envoy line event %v", e)
	}
}

// TestLineWriterObserves: every complete line reaches Observe (the Envoy
// plane's metrics), with or without subscribers, and W gets the bytes.
func TestLineWriterObserves(t *testing.T) {
	var got []Event
	var out bytes.Buffer
	lw := &LineWriter{W: &out, Hub: &Hub{}, Observe: func(e Event) { got = append(got, e) }}
	lw.Write([]byte(`{"msg":"connection","project":"a","verdict":"deny"}` + "\n" + `{"msg":"conn`))
	lw.Write([]byte(`ection","project":"b","verdict":"allow"}` + "\nnot json\n"))
	if len(got) != 2 || got[0]["type"] != "connection" || got[0]["project"] != "a" || got[1]["project"] != "b" {
		t.Errorf("observed %v", got)
	}
	if !strings.Contains(out.String(), "not json") {
		t.Errorf("W got %q", out.String())
	}
}
