package ctflow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// A hand-written decoder of conntrack events: it reads only what Watch
// needs, straight from the received bytes, without allocating (decoding
// with ti-mo/conntrack allocated a Flow, its nested structs and a netlink
// message per event). FuzzDecodeEvent checks it against ti-mo/conntrack.

// eventKind is what a conntrack event says happened to its entry.
type eventKind uint8

const (
	eventOther   eventKind = iota // a new entry, or not a conntrack event
	eventUpdate                   // IPCTNL_MSG_CT_NEW without NLM_F_CREATE|NLM_F_EXCL
	eventDestroy                  // IPCTNL_MSG_CT_DELETE
)

// event is the part of one conntrack event Watch acts on.
type event struct {
	kind eventKind
	// flow: its addresses (original direction), bytes and timestamps.
	flow  Flow
	mark  uint32
	proto uint8
	// tcpState is CTA_PROTOINFO_TCP_STATE, when hasTCPState.
	tcpState    uint8
	hasTCPState bool
	zone        uint16
	id          uint32
}

// More of conntrack's netlink layout (linux/netlink.h,
// linux/netfilter/nfnetlink_conntrack.h), for decodeEvent.
const (
	nlmsgHeaderLen = 16
	nlmFCreate     = 0x400 // NLM_F_CREATE
	nlmFExcl       = 0x200 // NLM_F_EXCL
	// nlaTypeMask keeps an attribute type's low byte: conntrack's are all
	// below 256 (the flags NLA_F_NESTED and NLA_F_NET_BYTEORDER are bits
	// 15 and 14), and ti-mo/conntrack, which FuzzDecodeMessage compares
	// with, reads them so too.
	nlaTypeMask   = 0xff
	ctMsgNew      = 0 // IPCTNL_MSG_CT_NEW: a new entry or an update
	ctaTupleZone  = 3 // CTA_TUPLE_ZONE (in a tuple)
	ctaIPv6Src    = 3
	ctaIPv6Dst    = 4
	ctaCountOrig  = 9  // CTA_COUNTERS_ORIG (nested)
	ctaCountReply = 10 // CTA_COUNTERS_REPLY (nested)
	ctaCountBytes = 2  // CTA_COUNTERS_BYTES, 64 bits
	ctaID         = 12
	ctaTimestamp  = 20 // CTA_TIMESTAMP (nested)
	ctaTSStart    = 1  // CTA_TIMESTAMP_START, ns since the epoch
	ctaTSStop     = 2
	afInet6       = 10 // AF_INET6
)

var errMalformed = errors.New("malformed conntrack event")

// attrReader walks a run of netlink attributes.
type attrReader struct {
	b   []byte
	bad bool // an attribute's length overran the run
}

// next returns the next attribute's type (flags cleared) and payload.
func (r *attrReader) next() (uint16, []byte, bool) {
	if len(r.b) < nlaHeaderLen {
		r.bad = r.bad || len(r.b) != 0
		return 0, nil, false
	}
	n := int(binary.NativeEndian.Uint16(r.b))
	if n == 0 { // never sent; read as an empty attribute, as mdlayher/netlink does
		n = nlaHeaderLen
	}
	if n < nlaHeaderLen || n > len(r.b) {
		r.bad = true
		return 0, nil, false
	}
	typ, data := binary.NativeEndian.Uint16(r.b[2:])&nlaTypeMask, r.b[nlaHeaderLen:n]
	r.b = r.b[min((n+3)&^3, len(r.b)):] // attributes are 4-byte aligned
	return typ, data, true
}

// decodeMessage decodes the netlink message at the start of b into ev and
// returns the message's length with its padding (the offset of the next).
func decodeMessage(b []byte, ev *event) (int, error) {
	*ev = event{}
	if len(b) < nlmsgHeaderLen {
		return 0, fmt.Errorf("%w: %d bytes", errMalformed, len(b))
	}
	n := int(binary.NativeEndian.Uint32(b))
	if n < nlmsgHeaderLen || n > len(b) {
		return 0, fmt.Errorf("%w: length %d of %d bytes", errMalformed, n, len(b))
	}
	next := min((n+3)&^3, len(b))
	typ, flags := binary.NativeEndian.Uint16(b[4:]), binary.NativeEndian.Uint16(b[6:])
	if typ < 0x10 { // NLMSG_NOOP, _ERROR, _DONE, _OVERRUN: no event
		return next, nil
	}
	if typ>>8 != nfnlSubsysCTNetlink {
		return next, fmt.Errorf("%w: message type %#x is not conntrack's", errMalformed, typ)
	}
	kind := eventOther
	switch typ & 0xff {
	case ctMsgNew:
		if flags&(nlmFCreate|nlmFExcl) == 0 {
			kind = eventUpdate
		}
	case ctMsgDelete:
		kind = eventDestroy
	default:
		return next, fmt.Errorf("%w: conntrack message type %d", errMalformed, typ&0xff)
	}
	if n < nlmsgHeaderLen+4 { // nfgenmsg
		return next, fmt.Errorf("%w: no nfgenmsg", errMalformed)
	}
	if err := ev.decodeFlow(b[attrsOffset:n]); err != nil {
		return next, err
	}
	ev.kind = kind // only a whole event is acted on
	return next, nil
}

// decodeFlow reads the top-level attributes of a conntrack message.
func (ev *event) decodeFlow(b []byte) error {
	r := attrReader{b: b}
	for typ, data, ok := r.next(); ok; typ, data, ok = r.next() {
		var err error
		switch typ {
		case ctaTupleOrig:
			err = ev.decodeTuple(data)
		case ctaProtoinfo:
			err = ev.decodeProtoinfo(data)
		case ctaMark:
			ev.mark, err = be32(data)
		case ctaZone:
			ev.zone, err = be16(data)
		case ctaID:
			ev.id, err = be32(data)
		case ctaCountOrig:
			ev.flow.Up, err = counterBytes(data)
		case ctaCountReply:
			ev.flow.Down, err = counterBytes(data)
		case ctaTimestamp:
			err = ev.decodeTimestamp(data)
		}
		if err != nil {
			return err
		}
	}
	if r.bad {
		return fmt.Errorf("%w: attribute length", errMalformed)
	}
	return nil
}

func (ev *event) decodeTuple(b []byte) error {
	var src, dst netip.Addr
	var sport, dport uint16
	r := attrReader{b: b}
	for typ, data, ok := r.next(); ok; typ, data, ok = r.next() {
		var err error
		switch typ {
		case ctaTupleIP:
			ir := attrReader{b: data}
			for t, d, ok := ir.next(); ok; t, d, ok = ir.next() {
				a, ok := netip.AddrFromSlice(d)
				if !ok {
					return fmt.Errorf("%w: address of %d bytes", errMalformed, len(d))
				}
				switch t {
				case ctaIPv4Src, ctaIPv6Src:
					src = a.Unmap()
				case ctaIPv4Dst, ctaIPv6Dst:
					dst = a.Unmap()
				}
			}
			if ir.bad {
				return fmt.Errorf("%w: ip tuple", errMalformed)
			}
		case ctaTupleProto:
			pr := attrReader{b: data}
			for t, d, ok := pr.next(); ok; t, d, ok = pr.next() {
				switch t {
				case ctaProtoNum:
					if len(d) != 1 {
						return fmt.Errorf("%w: protocol of %d bytes", errMalformed, len(d))
					}
					ev.proto = d[0]
				case ctaProtoSrcPort:
					sport, err = be16(d)
				case ctaProtoDstPort:
					dport, err = be16(d)
				}
				if err != nil {
					return err
				}
			}
			if pr.bad {
				return fmt.Errorf("%w: protocol tuple", errMalformed)
			}
		}
	}
	if r.bad {
		return fmt.Errorf("%w: tuple", errMalformed)
	}
	ev.flow.Src, ev.flow.Dst = netip.AddrPortFrom(src, sport), netip.AddrPortFrom(dst, dport)
	return nil
}

func (ev *event) decodeProtoinfo(b []byte) error {
	r := attrReader{b: b}
	for typ, data, ok := r.next(); ok; typ, data, ok = r.next() {
		if typ != ctaProtoinfoTCP {
			continue
		}
		tr := attrReader{b: data}
		for t, d, ok := tr.next(); ok; t, d, ok = tr.next() {
			if t == ctaTCPState {
				if len(d) != 1 {
					return fmt.Errorf("%w: tcp state of %d bytes", errMalformed, len(d))
				}
				ev.tcpState, ev.hasTCPState = d[0], true
			}
		}
		if tr.bad {
			return fmt.Errorf("%w: tcp protoinfo", errMalformed)
		}
	}
	if r.bad {
		return fmt.Errorf("%w: protoinfo", errMalformed)
	}
	return nil
}

func (ev *event) decodeTimestamp(b []byte) error {
	r := attrReader{b: b}
	for typ, data, ok := r.next(); ok; typ, data, ok = r.next() {
		if typ != ctaTSStart && typ != ctaTSStop {
			continue
		}
		ns, err := be64(data)
		if err != nil {
			return err
		}
		if typ == ctaTSStart {
			ev.flow.Start = time.Unix(0, int64(ns))
		} else {
			ev.flow.Stop = time.Unix(0, int64(ns))
		}
	}
	if r.bad {
		return fmt.Errorf("%w: timestamp", errMalformed)
	}
	return nil
}

// counterBytes is CTA_COUNTERS_BYTES of a CTA_COUNTERS_* attribute.
func counterBytes(b []byte) (uint64, error) {
	var n uint64
	r := attrReader{b: b}
	for typ, data, ok := r.next(); ok; typ, data, ok = r.next() {
		if typ == ctaCountBytes {
			var err error
			if n, err = be64(data); err != nil {
				return 0, err
			}
		}
	}
	if r.bad {
		return 0, fmt.Errorf("%w: counters", errMalformed)
	}
	return n, nil
}

func be16(b []byte) (uint16, error) {
	if len(b) != 2 {
		return 0, fmt.Errorf("%w: 16-bit value of %d bytes", errMalformed, len(b))
	}
	return binary.BigEndian.Uint16(b), nil
}

func be32(b []byte) (uint32, error) {
	if len(b) != 4 {
		return 0, fmt.Errorf("%w: 32-bit value of %d bytes", errMalformed, len(b))
	}
	return binary.BigEndian.Uint32(b), nil
}

func be64(b []byte) (uint64, error) {
	if len(b) != 8 {
		return 0, fmt.Errorf("%w: 64-bit value of %d bytes", errMalformed, len(b))
	}
	return binary.BigEndian.Uint64(b), nil
}

// appendDelete appends to b the request deleting the TCP conntrack entry
// whose original tuple is src → dst in zone, with no answer asked for (a
// failure's answer goes to the delete socket, whose filter drops it).
// Several of them sent at once are handled one after the other.
func appendDelete(b []byte, src, dst netip.AddrPort, zone uint16) []byte {
	family, ipLen := byte(afInet), 4
	srcType, dstType := uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
	if !src.Addr().Is4() {
		family, ipLen = afInet6, 16
		srcType, dstType = ctaIPv6Src, ctaIPv6Dst
	}
	const nested = 0x8000 // NLA_F_NESTED
	ipAttrs := 2 * (nlaHeaderLen + ipLen)
	protoAttrs := 3 * (nlaHeaderLen + 4) // a u8 and two u16, each padded to 4
	orig := nlaHeaderLen + (nlaHeaderLen + ipAttrs) + (nlaHeaderLen + protoAttrs)
	n := nlmsgHeaderLen + 4 + orig
	if zone != 0 {
		n += nlaHeaderLen + 4
	}
	ne := binary.NativeEndian
	b = ne.AppendUint32(b, uint32(n))
	b = ne.AppendUint16(b, nfnlSubsysCTNetlink<<8|ctMsgDelete)
	b = ne.AppendUint16(b, 1)      // NLM_F_REQUEST
	b = ne.AppendUint32(b, 0)      // sequence
	b = ne.AppendUint32(b, 0)      // port id: the kernel fills it in
	b = append(b, family, 0, 0, 0) // nfgenmsg: family, version 0, resource id 0
	attr := func(b []byte, typ uint16, payload int) []byte {
		b = ne.AppendUint16(b, uint16(nlaHeaderLen+payload))
		return ne.AppendUint16(b, typ)
	}
	b = attr(b, ctaTupleOrig|nested, orig-nlaHeaderLen)
	b = attr(b, ctaTupleIP|nested, ipAttrs)
	b = attr(b, srcType, ipLen)
	b = appendAddr(b, src.Addr(), ipLen)
	b = attr(b, dstType, ipLen)
	b = appendAddr(b, dst.Addr(), ipLen)
	b = attr(b, ctaTupleProto|nested, protoAttrs)
	b = attr(b, ctaProtoNum, 1)
	b = append(b, protoTCP, 0, 0, 0)
	b = attr(b, ctaProtoSrcPort, 2)
	b = binary.BigEndian.AppendUint16(b, src.Port())
	b = append(b, 0, 0)
	b = attr(b, ctaProtoDstPort, 2)
	b = binary.BigEndian.AppendUint16(b, dst.Port())
	b = append(b, 0, 0)
	if zone != 0 {
		b = attr(b, ctaZone, 2)
		b = binary.BigEndian.AppendUint16(b, zone)
		b = append(b, 0, 0)
	}
	return b
}

// appendAddr appends a's n bytes (4 for IPv4, 16 otherwise).
func appendAddr(b []byte, a netip.Addr, n int) []byte {
	if n == 4 {
		v := a.As4()
		return append(b, v[:]...)
	}
	v := a.As16()
	return append(b, v[:]...)
}
