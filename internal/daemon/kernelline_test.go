package daemon

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func sampleKernelLines() []kernelLine {
	src, dst := netip.MustParseAddrPort("172.31.0.2:40000"), netip.MustParseAddrPort("198.18.1.77:5001")
	return []kernelLine{
		{project: "alpha", verdict: "allow", rule: "cidr:198.18.1.77/32", src: src, dst: dst, up: 1234, down: 567890, durationMS: 12.345},
		{verdict: "allow", src: src, dst: dst},
		{project: "beta", verdict: "revoked", reason: "closed: the new policy no longer allows it", rule: "tcp:db.example.com",
			resolved: "db.example.com,db2.example.com", src: netip.MustParseAddrPort("[fd00::2]:1"), dst: netip.MustParseAddrPort("[2001:db8::1]:443"),
			up: 1 << 40, down: 0, durationMS: 0.001},
		{project: "q\"uo\\te\n\r\t\x01\x7f<&>é\u2028\u2029\xff", verdict: "allow", src: src, dst: dst, durationMS: 1e-7},
		{project: "big", verdict: "allow", src: src, dst: dst, durationMS: 1e22},
		{project: "mid", verdict: "allow", src: src, dst: dst, durationMS: 123456789.5},
	}
}

// TestKernelLineMatchesSlog: appendKernelLine writes what slog's
// JSONHandler writes for the same record, byte for byte.
func TestKernelLineMatchesSlog(t *testing.T) {
	now := time.Date(2026, 11, 30, 6, 2, 53, 123456789, time.FixedZone("X", 3600))
	for i, l := range sampleKernelLines() {
		var want bytes.Buffer
		r := slog.NewRecord(now, slog.LevelInfo, "connection", 0)
		r.AddAttrs(l.attrs()...)
		if err := slog.NewJSONHandler(&want, nil).Handle(context.Background(), r); err != nil {
			t.Fatal(err)
		}
		got := appendKernelLine(nil, now, &l)
		if d := cmp.Diff(want.String(), string(got)); d != "" {
			t.Errorf("line %d (-slog +appendKernelLine):\n%s", i, d)
		}
		var keys []string
		for _, a := range l.attrs() {
			keys = append(keys, a.Key)
		}
		if d := cmp.Diff(kernelLineKeys, keys); d != "" {
			t.Errorf("attributes' keys (-kernelLineKeys +attrs):\n%s", d)
		}
	}
}

// BenchmarkKernelLine is the per-flow cost of the access-log line of a
// kernel-forwarded flow: through slog (before) and appended.
func BenchmarkKernelLine(b *testing.B) {
	l := sampleKernelLines()[0]
	b.Run("slog", func(b *testing.B) {
		b.ReportAllocs()
		log := slog.New(slog.NewJSONHandler(io.Discard, nil))
		for b.Loop() {
			log.LogAttrs(context.Background(), slog.LevelInfo, "connection", l.attrs()...)
		}
	})
	b.Run("append", func(b *testing.B) {
		b.ReportAllocs()
		buf := make([]byte, 0, 1024)
		now := time.Now()
		for b.Loop() {
			buf = appendKernelLine(buf[:0], now, &l)
		}
	})
}
