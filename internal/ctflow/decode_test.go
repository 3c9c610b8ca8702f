package ctflow

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/mdlayher/netlink"
	"github.com/ti-mo/conntrack"

	"github.com/vmegress/vmegress/internal/firewall"
)

// testEvent is a conntrack event as the kernel sends it, built with
// mdlayher/netlink's encoder (not decode.go's code).
type testEvent struct {
	msgType     uint16 // ctMsgNew or ctMsgDelete
	flags       uint16
	src, dst    netip.AddrPort
	mark, id    uint32
	zone        uint16
	state       uint8 // TCP state; 0: no CTA_PROTOINFO
	up, down    uint64
	start, stop uint64 // ns; 0: none
	reply       bool   // a reply tuple too
	counterPad  bool   // a CTA_COUNTERS_PAD in the counters
}

func (e testEvent) bytes(t testing.TB) []byte {
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	tuple := func(typ uint16, src, dst netip.AddrPort) {
		ae.Nested(typ, func(te *netlink.AttributeEncoder) error {
			te.Nested(ctaTupleIP, func(ip *netlink.AttributeEncoder) error {
				s, d := uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
				if !src.Addr().Is4() {
					s, d = ctaIPv6Src, ctaIPv6Dst
				}
				ip.Bytes(s, src.Addr().AsSlice())
				ip.Bytes(d, dst.Addr().AsSlice())
				return nil
			})
			te.Nested(ctaTupleProto, func(p *netlink.AttributeEncoder) error {
				p.Uint8(ctaProtoNum, protoTCP)
				p.Uint16(ctaProtoSrcPort, src.Port())
				p.Uint16(ctaProtoDstPort, dst.Port())
				return nil
			})
			return nil
		})
	}
	tuple(ctaTupleOrig, e.src, e.dst)
	if e.reply {
		tuple(2, e.dst, e.src) // CTA_TUPLE_REPLY
	}
	ae.Uint32(3, 0x188) // CTA_STATUS
	if e.state != 0 {
		ae.Nested(ctaProtoinfo, func(pi *netlink.AttributeEncoder) error {
			pi.Nested(ctaProtoinfoTCP, func(tcp *netlink.AttributeEncoder) error {
				tcp.Uint8(ctaTCPState, e.state)
				tcp.Uint8(2, 7) // CTA_PROTOINFO_TCP_WSCALE_ORIGINAL
				return nil
			})
			return nil
		})
	}
	counters := func(typ uint16, n uint64) {
		ae.Nested(typ, func(c *netlink.AttributeEncoder) error {
			c.Uint64(1, n/100) // CTA_COUNTERS_PACKETS
			c.Uint64(ctaCountBytes, n)
			if e.counterPad {
				c.Bytes(5, nil) // CTA_COUNTERS_PAD
			}
			return nil
		})
	}
	if e.msgType == ctMsgDelete {
		counters(ctaCountOrig, e.up)
		counters(ctaCountReply, e.down)
	}
	ae.Uint32(ctaMark, e.mark)
	ae.Uint32(ctaID, e.id)
	if e.zone != 0 {
		ae.Uint16(ctaZone, e.zone)
	}
	if e.start != 0 {
		ae.Nested(ctaTimestamp, func(ts *netlink.AttributeEncoder) error {
			ts.Uint64(ctaTSStart, e.start)
			if e.stop != 0 {
				ts.Uint64(ctaTSStop, e.stop)
			}
			return nil
		})
	}
	attrs, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	family := byte(afInet)
	if !e.src.Addr().Is4() {
		family = afInet6
	}
	m := netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(nfnlSubsysCTNetlink<<8 | e.msgType), Flags: netlink.HeaderFlags(e.flags)},
		Data:   append([]byte{family, 0, 0, 0}, attrs...),
	}
	m.Header.Length = uint32(nlmsgHeaderLen + len(m.Data))
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var (
	guest = netip.MustParseAddrPort("172.31.0.2:40000")
	dest  = netip.MustParseAddrPort("198.18.1.77:5001")
)

// sampleEvents: a closing update and a destroy of a kernel-forwarded
// flow, a new entry, IPv6, a zone, a flow of another mark.
func sampleEvents() []testEvent {
	return []testEvent{
		{msgType: ctMsgNew, src: guest, dst: dest, mark: firewall.KernelCTMark, id: 7, state: tcpTimeWait, reply: true},
		{msgType: ctMsgDelete, src: guest, dst: dest, mark: firewall.KernelCTMark, id: 7, state: tcpTimeWait, reply: true,
			up: 1234, down: 56789, start: 1_700_000_000_000_000_000, stop: 1_700_000_000_250_000_000},
		{msgType: ctMsgNew, flags: nlmFCreate | nlmFExcl, src: guest, dst: dest, mark: firewall.KernelCTMark, state: 1},
		{msgType: ctMsgDelete, src: netip.MustParseAddrPort("[fd00::2]:40001"), dst: netip.MustParseAddrPort("[2001:db8::7]:443"),
			mark: firewall.KernelCTMark, zone: 3, up: 1, down: 2, start: 5, counterPad: true},
		{msgType: ctMsgDelete, src: guest, dst: dest, mark: 0x1, id: 9, up: 10, down: 20, start: 3, stop: 4},
	}
}

// fromTiMo is what ti-mo/conntrack, which Watch used before, decodes of b.
func fromTiMo(b []byte) (event, error) {
	var m netlink.Message
	if err := m.UnmarshalBinary(b); err != nil {
		return event{}, err
	}
	var ev conntrack.Event
	if err := ev.Unmarshal(m); err != nil {
		return event{}, err
	}
	if ev.Flow == nil {
		return event{}, errors.New("an expectation event")
	}
	e := event{flow: flowOf(ev.Flow), mark: ev.Flow.Mark, proto: ev.Flow.TupleOrig.Proto.Protocol, zone: ev.Flow.Zone, id: ev.Flow.ID}
	switch ev.Type {
	case conntrack.EventUpdate:
		e.kind = eventUpdate
	case conntrack.EventDestroy:
		e.kind = eventDestroy
	}
	if tcp := ev.Flow.ProtoInfo.TCP; tcp != nil {
		e.tcpState, e.hasTCPState = tcp.State, true
	}
	return e, nil
}

var cmpEvent = cmp.Options{cmp.AllowUnexported(event{}), cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b }),
	cmp.Comparer(func(a, b time.Time) bool { return a.Equal(b) })}

func TestDecodeMessageAgreesWithTiMo(t *testing.T) {
	for i, te := range sampleEvents() {
		b := te.bytes(t)
		var got event
		n, err := decodeMessage(b, &got)
		if err != nil || n != len(b) {
			t.Fatalf("event %d: decodeMessage = %d, %v; want %d, nil", i, n, err, len(b))
		}
		want, err := fromTiMo(b)
		if err != nil {
			t.Fatalf("event %d: ti-mo: %v", i, err)
		}
		if d := cmp.Diff(want, got, cmpEvent); d != "" {
			t.Errorf("event %d: decodeMessage differs from ti-mo/conntrack (-ti-mo +ours):\n%s", i, d)
		}
	}
	// The destroy event's fields, spelled out.
	var got event
	decodeMessage(sampleEvents()[1].bytes(t), &got)
	want := event{kind: eventDestroy, mark: firewall.KernelCTMark, proto: protoTCP, id: 7, tcpState: tcpTimeWait, hasTCPState: true,
		flow: Flow{Src: guest, Dst: dest, Up: 1234, Down: 56789,
			Start: time.Unix(0, 1_700_000_000_000_000_000), Stop: time.Unix(0, 1_700_000_000_250_000_000)}}
	if d := cmp.Diff(want, got, cmpEvent); d != "" {
		t.Errorf("destroy event (-want +got):\n%s", d)
	}
}

func TestDecodeMessageMalformed(t *testing.T) {
	b := sampleEvents()[1].bytes(t)
	for _, cut := range []int{0, 10, 19, 30, len(b) - 3} {
		c := append([]byte(nil), b[:cut]...)
		if cut >= 4 {
			binary.NativeEndian.PutUint32(c, uint32(cut)) // a consistent header, cut attributes
		}
		var ev event
		if _, err := decodeMessage(c, &ev); err == nil && cut > 0 {
			t.Errorf("cut at %d: no error", cut)
		}
		if ev.kind != eventOther {
			t.Errorf("cut at %d: kind %d, want eventOther", cut, ev.kind)
		}
	}
}

// FuzzDecodeMessage: decodeMessage never panics, never reads past its
// message, and agrees with ti-mo/conntrack on whatever that decodes.
func FuzzDecodeMessage(f *testing.F) {
	for _, te := range sampleEvents() {
		f.Add(te.bytes(f))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var got event
		n, err := decodeMessage(b, &got)
		if n > len(b) {
			t.Fatalf("decodeMessage consumed %d of %d bytes", n, len(b))
		}
		want, terr := fromTiMo(b)
		if terr != nil || len(b) < nlmsgHeaderLen {
			return
		}
		if l := int(binary.NativeEndian.Uint32(b)); l != len(b) {
			return // ti-mo reads the first of several messages differently
		}
		if err != nil {
			t.Fatalf("ti-mo/conntrack decodes it, decodeMessage fails: %v", err)
		}
		if d := cmp.Diff(want, got, cmpEvent); d != "" {
			t.Errorf("decodeMessage differs from ti-mo/conntrack (-ti-mo +ours):\n%s", d)
		}
	})
}

// deleteMessage is the delete request built with mdlayher/netlink's
// encoder, as Watch sent it before appendDelete.
func deleteMessage(t testing.TB, src, dst netip.AddrPort, zone uint16) []byte {
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	ae.Nested(ctaTupleOrig, func(te *netlink.AttributeEncoder) error {
		te.Nested(ctaTupleIP, func(ip *netlink.AttributeEncoder) error {
			s, d := uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
			if !src.Addr().Is4() {
				s, d = ctaIPv6Src, ctaIPv6Dst
			}
			ip.Bytes(s, src.Addr().AsSlice())
			ip.Bytes(d, dst.Addr().AsSlice())
			return nil
		})
		te.Nested(ctaTupleProto, func(p *netlink.AttributeEncoder) error {
			p.Uint8(ctaProtoNum, protoTCP)
			p.Uint16(ctaProtoSrcPort, src.Port())
			p.Uint16(ctaProtoDstPort, dst.Port())
			return nil
		})
		return nil
	})
	if zone != 0 {
		ae.Uint16(ctaZone, zone)
	}
	attrs, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	family := byte(afInet)
	if !src.Addr().Is4() {
		family = afInet6
	}
	m := netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(nfnlSubsysCTNetlink<<8 | ctMsgDelete), Flags: netlink.Request},
		Data:   append([]byte{family, 0, 0, 0}, attrs...),
	}
	m.Header.Length = uint32(nlmsgHeaderLen + len(m.Data))
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestAppendDelete(t *testing.T) {
	v6s, v6d := netip.MustParseAddrPort("[fd00::2]:40001"), netip.MustParseAddrPort("[2001:db8::7]:443")
	var all, want []byte
	for _, c := range []struct {
		src, dst netip.AddrPort
		zone     uint16
	}{{guest, dest, 0}, {guest, dest, 5}, {v6s, v6d, 0}} {
		w := deleteMessage(t, c.src, c.dst, c.zone)
		got := appendDelete(nil, c.src, c.dst, c.zone)
		if d := cmp.Diff(w, got); d != "" {
			t.Errorf("appendDelete(%s, %s, %d) (-encoder +ours):\n%s", c.src, c.dst, c.zone, d)
		}
		all, want = appendDelete(all, c.src, c.dst, c.zone), append(want, w...)
	}
	if d := cmp.Diff(want, all); d != "" {
		t.Errorf("appended deletes (-want +got):\n%s", d)
	}
}

// BenchmarkEvent is the per-event cost of reading what Watch needs from
// a destroy event: ti-mo/conntrack's decoding (before) against
// decodeMessage, and of the delete a closing update calls for.
func BenchmarkEvent(b *testing.B) {
	msg := sampleEvents()[1].bytes(b)
	b.Run("decode/ti-mo", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var m netlink.Message
			if err := m.UnmarshalBinary(msg); err != nil {
				b.Fatal(err)
			}
			var ev conntrack.Event
			if err := ev.Unmarshal(m); err != nil {
				b.Fatal(err)
			}
			_ = flowOf(ev.Flow)
		}
	})
	b.Run("decode/ctflow", func(b *testing.B) {
		b.ReportAllocs()
		var ev event
		for b.Loop() {
			if _, err := decodeMessage(msg, &ev); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("delete/encoder", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			deleteMessage(b, guest, dest, 0)
		}
	})
	b.Run("delete/ctflow", func(b *testing.B) {
		b.ReportAllocs()
		buf := make([]byte, 0, 256)
		for b.Loop() {
			buf = appendDelete(buf[:0], guest, dest, 0)
		}
	})
}
