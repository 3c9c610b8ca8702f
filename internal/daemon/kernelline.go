package daemon

import (
	"encoding/json"
	"log/slog"
	"math"
	"net/netip"
	"strconv"
	"time"
	"unicode/utf8"

	"github.com/vmegress/vmegress/internal/events"
)

// kernelLine is the access-log line of one kernel-forwarded flow.
type kernelLine struct {
	project, verdict, rule, reason, resolved string
	src, dst                                 netip.AddrPort
	up, down                                 int64
	durationMS                               float64
}

// attrs are l's attributes for slog, in kernelLineKeys' order.
func (l *kernelLine) attrs() []slog.Attr {
	return []slog.Attr{
		slog.String("project", l.project),
		slog.String("src", l.src.String()),
		slog.String("dst", l.dst.String()),
		slog.String("verdict", l.verdict),
		slog.String("rule", l.rule),
		slog.String("reason", l.reason),
		slog.String("path", "kernel"),
		slog.Int64("bytes_up", l.up),
		slog.Int64("bytes_down", l.down),
		slog.Float64("duration_ms", l.durationMS),
		slog.String("resolved", l.resolved),
	}
}

// event is l as events.Handler publishes a logged line.
func (l *kernelLine) event(now time.Time) events.Event {
	e := events.Event{"type": "connection", "time": now.UTC().Format(time.RFC3339Nano)}
	for _, a := range l.attrs() {
		e[a.Key] = a.Value.Resolve().Any()
	}
	return e
}

// kernelLineKeys are the line's keys after time, level and msg, in order.
var kernelLineKeys = []string{"project", "src", "dst", "verdict", "rule", "reason", "path", "bytes_up", "bytes_down", "duration_ms", "resolved"}

// appendKernelLine appends l as the JSON line slog's JSONHandler writes for
// a "connection" record with kernelLineKeys' attributes, byte for byte
// (TestKernelLineMatchesSlog), without its costs: an attribute slice, a
// record, a json.Marshal of the float and a write per line.
func appendKernelLine(b []byte, now time.Time, l *kernelLine) []byte {
	b = append(b, `{"time":"`...)
	b = now.AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","level":"INFO","msg":"connection","project":`...)
	b = appendJSONString(b, l.project)
	b = append(b, `,"src":"`...)
	b = l.src.AppendTo(b)
	b = append(b, `","dst":"`...)
	b = l.dst.AppendTo(b)
	b = append(b, `","verdict":`...)
	b = appendJSONString(b, l.verdict)
	b = append(b, `,"rule":`...)
	b = appendJSONString(b, l.rule)
	b = append(b, `,"reason":`...)
	b = appendJSONString(b, l.reason)
	b = append(b, `,"path":"kernel","bytes_up":`...)
	b = strconv.AppendInt(b, l.up, 10)
	b = append(b, `,"bytes_down":`...)
	b = strconv.AppendInt(b, l.down, 10)
	b = append(b, `,"duration_ms":`...)
	b = appendJSONFloat(b, l.durationMS)
	b = append(b, `,"resolved":`...)
	b = appendJSONString(b, l.resolved)
	return append(b, "}\n"...)
}

// appendJSONFloat appends f as encoding/json writes it (slog's JSONHandler
// calls json.Marshal for floats): 'f' formatting from 1e-6 to 1e21, which
// holds every duration; json.Marshal itself outside.
func appendJSONFloat(b []byte, f float64) []byte {
	if a := math.Abs(f); f == 0 || (a >= 1e-6 && a < 1e21) {
		return strconv.AppendFloat(b, f, 'f', -1, 64)
	}
	j, err := json.Marshal(f)
	if err != nil { // NaN or an infinity: slog writes the error
		return append(b, `"!ERROR:`+err.Error()+`"`...)
	}
	return append(b, j...)
}

// appendJSONString appends s quoted as slog's JSONHandler quotes strings:
// '"', '\\' and control characters escaped, invalid UTF-8 as U+FFFD,
// U+2028 and U+2029 escaped, the rest (HTML characters too) as it is.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, `\n`...)
			case '\r':
				b = append(b, `\r`...)
			case '\t':
				b = append(b, `\t`...)
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(b, s[start:i]...)
			b = append(b, `\u202`...)
			b = append(b, hex[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
