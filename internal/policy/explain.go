package policy

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/dest"
)

// WouldDeny is the verdict of an audit project's connection that enforce
// mode would refuse: it goes through and is logged. (The builtin plane's
// access log writes the same string.)
const WouldDeny Verdict = "would_deny"

// Bytes is what a client sends first on a connection, as Explain models it.
type Bytes string

// What a client may send first.
const (
	// BytesTLS: a TLS ClientHello whose server name (SNI) is Query.Name; an
	// empty Name is a ClientHello without SNI.
	BytesTLS Bytes = "tls"
	// BytesHTTP: a plain-HTTP request head whose Host is Query.Name.
	BytesHTTP Bytes = "http"
	// BytesRaw: bytes that are neither (an SSH client's banner, say). They
	// do not start with 0x16, so a port with both kinds of rule reads them
	// as HTTP, and finds no request.
	BytesRaw Bytes = "raw"
	// BytesNone: nothing; the server speaks first (SSH, SMTP), or the client
	// closes without sending.
	BytesNone Bytes = "none"
)

// ParseBytes reads a Bytes from its name.
func ParseBytes(s string) (Bytes, error) {
	switch b := Bytes(s); b {
	case BytesTLS, BytesHTTP, BytesRaw, BytesNone:
		return b, nil
	}
	return "", fmt.Errorf("kind of bytes %q is not one of tls, http, raw, none", s)
}

// String names what the data plane reads.
func (in Inspect) String() string {
	switch in {
	case InspectNone:
		return "none"
	case InspectTLS:
		return "tls"
	case InspectHTTP:
		return "http"
	case InspectEither:
		return "tls-or-http"
	}
	return fmt.Sprintf("Inspect(%d)", int(in))
}

// Query is what a connection presents to the data plane.
type Query struct {
	// Project names the project; when empty, Src finds it as the data plane
	// does (by the source address's /30).
	Project string
	Src     netip.Addr
	// Dst is the original destination. Its address may be left invalid when
	// only the name is known: then no cidr rule can match it.
	Dst netip.AddrPort
	// Name is the TLS server name or HTTP Host the client sends ("": none).
	Name string
	// Bytes is what the client sends first.
	Bytes Bytes
	// Resolved, when set, is what the resolver handed out (the daemon's
	// record): a query with only an address is decided by it for tcp rules.
	Resolved Resolved
	// Method and Path are the request on a connection the name stage
	// allows and whose requests are decided one by one (https rules, http
	// rules with methods, paths or inject); zero: GET /.
	Method, Path string
}

// Explanation is a verdict with how it was reached.
type Explanation struct {
	// Decision is the verdict the data plane logs: with the project's mode
	// applied (WouldDeny for an audit project's refusals).
	Decision
	// Inspect is what the address stage asked the data plane to read.
	Inspect Inspect
	// As is how the bytes were read (KindNone: not read, or nothing usable).
	As Kind
	// Request is the request that was decided (as "METHOD /path") when the
	// connection's requests are decided one by one; "" otherwise.
	Request string
}

// unplaced is the stand-in /30 an unplaced project is explained on: the
// verdict never depends on the source address once the project is known.
var unplaced = netip.MustParsePrefix("0.0.0.0/30")

// Explain decides q exactly as the builtin data plane decides a connection
// (internal/proxy's handle and inspect): Connect on the addresses; if it
// asks for inspection, what that reading yields from q.Bytes (a port with
// both sni and http rules tells them by the first byte, 0x16 being TLS);
// Decide on the name learnt; then the project's mode. Out of scope: the
// project's connection cap and the vetting of the address to dial (the
// resolver's answers, the always-denied set), which come after the verdict.
//
// tcp rules depend on what the resolver handed the project at run time,
// which Explain does not know: a query with a name is decided as if the
// guest had resolved it and connects to an address of its answer ("allow
// once resolved", said in Reason); a query with only an address is decided
// as if the resolver had handed it out for nothing, and Reason says which
// tcp rules would allow it had it been.
func (p *Policy) Explain(q Query) Explanation {
	view, src := p, q.Src
	if q.Project != "" {
		pr := p.Project(q.Project)
		if pr == nil {
			return Explanation{Decision: Decision{Verdict: Deny, Reason: fmt.Sprintf("no project %q", q.Project)}}
		}
		if pr.Subnet.IsValid() {
			src = pr.Subnet.Addr()
		} else {
			view = &Policy{bySubnet: map[netip.Prefix]*Project{unplaced: pr}, byName: p.byName}
			src = unplaced.Addr()
		}
	}
	var resolved Resolved
	var names []string
	if norm, err := config.NormalizeName(q.Name); q.Name != "" && err == nil && !strings.HasPrefix(norm, "*.") {
		names = []string{norm}
		resolved = func(string, netip.Addr) []string { return names }
	} else if q.Name == "" && q.Resolved != nil {
		resolved = q.Resolved
	}
	d, in := view.ConnectWith(src, q.Dst, resolved)
	if pr := view.ProjectFor(src); pr != nil {
		if td, ok := pr.tcpDecision(q.Dst, names, false); ok && d.Verdict == Allow && td.Rule == d.Rule {
			d.Reason = fmt.Sprintf("allow once resolved: the guest connects to an address the resolver handed it for %s (until the answer's TTL plus %s runs out); other addresses on port %d are not allowed by this rule", names[0], dest.Grace, q.Dst.Port())
		}
	}
	ex := Explanation{Decision: d, Inspect: in}
	if in != InspectNone {
		ex.As = readAs(in, q.Bytes)
		if ex.As != KindNone {
			ex.Decision = view.Decide(Facts{Src: src, Dst: q.Dst, Kind: ex.As, Name: q.Name})
		}
	}
	if pr := view.ProjectFor(src); pr != nil && ex.Verdict == Allow && ex.As != KindNone && pr.Terminates(ex.As, q.Name, q.Dst.Port()) {
		method, path := q.Method, q.Path
		if method == "" {
			method = "GET"
		}
		if path == "" {
			path = "/"
		}
		rd := pr.DecideRequest(Request{Kind: ex.As, Name: q.Name, Port: q.Dst.Port(), Host: q.Name, Method: method, Path: path, EscapedPath: path})
		ex.Decision, ex.Request = rd.Decision, method+" "+path
	}
	if pr := view.ProjectFor(src); pr != nil && ex.Verdict != Allow && q.Name == "" && q.Dst.Addr().IsValid() {
		if rules := pr.TCPRules(q.Dst.Port()); len(rules) > 0 && q.Resolved != nil {
			ex.Reason += fmt.Sprintf("; the resolver has not handed %s to the project for a name matching %s (or the answer expired)", q.Dst.Addr(), strings.Join(rules, " or "))
		} else if len(rules) > 0 {
			ex.Reason += fmt.Sprintf("; allowed if the resolver handed %s to the project for a name matching %s", q.Dst.Addr(), strings.Join(rules, " or "))
		}
	}
	if pr := view.ProjectFor(src); pr != nil && pr.Audit && ex.Verdict != Allow {
		ex.Verdict = WouldDeny
	}
	return ex
}

// readAs is what reading b yields when in is asked for: a name of some
// kind, or KindNone (not a ClientHello, not a request, nothing at all).
func readAs(in Inspect, b Bytes) Kind {
	if in == InspectEither {
		switch b {
		case BytesNone:
			return KindNone // the first byte never comes
		case BytesTLS:
			in = InspectTLS
		default:
			in = InspectHTTP
		}
	}
	switch {
	case in == InspectTLS && b == BytesTLS:
		return KindTLS
	case in == InspectHTTP && b == BytesHTTP:
		return KindHTTP
	}
	return KindNone
}
