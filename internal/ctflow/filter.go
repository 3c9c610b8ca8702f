package ctflow

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/net/bpf"
)

// Conntrack's netlink message layout (linux/netfilter/nfnetlink_conntrack.h):
// a 16-byte nlmsghdr, a 4-byte nfgenmsg, then attributes.
const (
	nlmsgTypeOffset = 4 // nlmsghdr.nlmsg_type, host byte order
	attrsOffset     = 16 + 4
	ctMsgDelete     = 2 // IPCTNL_MSG_CT_DELETE: a destroy event
	ctaProtoinfo    = 4 // CTA_PROTOINFO (nested)
	ctaMark         = 8 // CTA_MARK, big endian
	ctaProtoinfoTCP = 1 // CTA_PROTOINFO_TCP (nested in CTA_PROTOINFO)
	ctaTCPState     = 1 // CTA_PROTOINFO_TCP_STATE, one byte
	nlaHeaderLen    = 4
)

// eventFilter is a classic BPF program for the event socket that passes
// only what Watch acts on: destroy events, and update events in TCP state
// TIME_WAIT or CLOSE, of entries whose mark has every bit of mark. The rest
// (every state change of every flow of the host: a kernel-forwarded flow
// alone makes five or six updates, a proxied one as many) is dropped in the
// kernel, before it wakes the daemon or fills the socket's buffer.
func eventFilter(mark uint32) ([]bpf.RawInstruction, error) {
	// The message type's low byte is the conntrack message (the high one
	// the subsystem): which byte comes first depends on the host.
	typeByte := uint32(nlmsgTypeOffset)
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 { // big endian
		typeByte++
	}
	const (
		accept = 0xffffffff // keep the whole message
		drop   = 0
	)
	prog := []bpf.Instruction{
		// A = offset of CTA_MARK among the top-level attributes, 0 if none.
		bpf.LoadConstant{Dst: bpf.RegA, Val: attrsOffset},
		bpf.LoadConstant{Dst: bpf.RegX, Val: ctaMark},
		bpf.LoadExtension{Num: bpf.ExtNetlinkAttr},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0, SkipTrue: 12}, // → drop
		bpf.TAX{},
		bpf.LoadIndirect{Off: nlaHeaderLen, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: mark, SkipFalse: 9}, // → drop (needs every bit: mark is one bit)
		// A destroy event of such an entry: pass.
		bpf.LoadAbsolute{Off: typeByte, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: ctMsgDelete, SkipTrue: 16}, // → accept
		// An update: pass it only in TIME_WAIT or CLOSE.
		bpf.LoadConstant{Dst: bpf.RegA, Val: attrsOffset},
		bpf.LoadConstant{Dst: bpf.RegX, Val: ctaProtoinfo},
		bpf.LoadExtension{Num: bpf.ExtNetlinkAttr},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0, SkipTrue: 3}, // → drop
		bpf.LoadConstant{Dst: bpf.RegX, Val: ctaProtoinfoTCP},
		bpf.LoadExtension{Num: bpf.ExtNetlinkAttrNested},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: 0, SkipTrue: 1}, // found: go on
		bpf.RetConstant{Val: drop},
		bpf.LoadConstant{Dst: bpf.RegX, Val: ctaTCPState},
		bpf.LoadExtension{Num: bpf.ExtNetlinkAttrNested},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0, SkipTrue: 4}, // → drop
		bpf.TAX{},
		bpf.LoadIndirect{Off: nlaHeaderLen, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: tcpTimeWait, SkipTrue: 2}, // → accept
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: tcpClose, SkipTrue: 1},    // → accept
		bpf.RetConstant{Val: drop},
		bpf.RetConstant{Val: accept},
	}
	raw, err := bpf.Assemble(prog)
	if err != nil {
		return nil, fmt.Errorf("assembling the conntrack event filter: %w", err)
	}
	return raw, nil
}

// Conntrack's netlink attributes and message types for deleteMessage.
const (
	nfnlSubsysCTNetlink = 1 // NFNL_SUBSYS_CTNETLINK
	ctaTupleOrig        = 1 // CTA_TUPLE_ORIG (nested)
	ctaTupleIP          = 1 // CTA_TUPLE_IP (nested)
	ctaTupleProto       = 2 // CTA_TUPLE_PROTO (nested)
	ctaIPv4Src          = 1 // CTA_IP_V4_SRC
	ctaIPv4Dst          = 2 // CTA_IP_V4_DST
	ctaProtoNum         = 1 // CTA_PROTO_NUM
	ctaProtoSrcPort     = 2 // CTA_PROTO_SRC_PORT
	ctaProtoDstPort     = 3 // CTA_PROTO_DST_PORT
	ctaZone             = 18
	afInet              = 2
	protoTCP            = 6
)

// dropAll is a filter that lets nothing in.
var dropAll = []bpf.RawInstruction{{Op: 0x06, K: 0}} // BPF_RET|BPF_K 0
