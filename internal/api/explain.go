package api

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/vmegress/vmegress/client"
	vdns "github.com/vmegress/vmegress/internal/dns"
	"github.com/vmegress/vmegress/internal/engine"
	"github.com/vmegress/vmegress/internal/placement"
	"github.com/vmegress/vmegress/internal/policy"
)

// DNSExplainer says what the resolver would answer pr's guest for name.
type DNSExplainer func(ctx context.Context, pr *policy.Project, name string, port uint16, addrKnown bool) string

// Explain decides req with pol exactly as the data plane would (policy.Explain),
// one verdict per kind of bytes that matters on the port. The API and the
// CLI (when no daemon runs) both answer with it.
//
// resolved, when not nil, is what the running resolver handed out: an
// address's tcp rules are then decided by it, as the data plane does.
func Explain(ctx context.Context, pol *policy.Policy, req client.ExplainRequest, dns DNSExplainer, resolved policy.Resolved) ([]client.Explanation, error) {
	pr := pol.Project(req.Project)
	if pr == nil {
		return nil, fmt.Errorf("project %q: %w", req.Project, engine.ErrNotFound)
	}
	if req.Host == "" {
		return nil, &placement.Invalid{Field: "host", Err: fmt.Errorf("host is required")}
	}
	port := req.Port
	if port == 0 {
		port = 443
	}
	if req.Path != "" && !strings.HasPrefix(req.Path, "/") {
		return nil, &placement.Invalid{Field: "path", Err: fmt.Errorf("path %q does not start with /", req.Path)}
	}
	q := policy.Query{Project: pr.Name, Name: req.Host, Method: strings.ToUpper(req.Method), Path: req.Path, Resolved: resolved}
	ip, hostErr := netip.ParseAddr(req.Host)
	hostIsAddr := hostErr == nil
	if hostIsAddr {
		q.Name = ""
		if req.Addr != "" {
			return nil, &placement.Invalid{Field: "addr", Err: fmt.Errorf("addr is for a host that is a name; %s is already an address", req.Host)}
		}
		q.Dst = netip.AddrPortFrom(ip.Unmap(), port)
	} else {
		var addr netip.Addr
		if req.Addr != "" {
			a, err := netip.ParseAddr(req.Addr)
			if err != nil {
				return nil, &placement.Invalid{Field: "addr", Err: fmt.Errorf("addr %q is not an IP address", req.Addr)}
			}
			addr = a.Unmap()
		}
		q.Dst = netip.AddrPortFrom(addr, port)
	}
	var kinds []policy.Bytes
	if req.As != "" {
		b, err := policy.ParseBytes(req.As)
		if err != nil {
			return nil, &placement.Invalid{Field: "as", Err: err}
		}
		kinds = []policy.Bytes{b}
	} else {
		switch first := pol.Explain(q); first.Inspect {
		case policy.InspectNone:
			kinds = []policy.Bytes{""} // decided before any byte is read
		case policy.InspectTLS:
			kinds = []policy.Bytes{policy.BytesTLS}
		case policy.InspectHTTP:
			kinds = []policy.Bytes{policy.BytesHTTP}
		case policy.InspectEither:
			kinds = []policy.Bytes{policy.BytesTLS, policy.BytesHTTP}
		}
	}
	conn := net.JoinHostPort(req.Host, strconv.Itoa(int(port)))
	d := ""
	if q.Name != "" && dns != nil {
		d = dns(ctx, pr, q.Name, port, q.Dst.Addr().IsValid())
	}
	out := make([]client.Explanation, 0, len(kinds))
	for _, k := range kinds {
		q.Bytes = k
		ex := pol.Explain(q)
		as := string(k)
		if as == "" {
			as = "any"
		}
		out = append(out, client.Explanation{Project: pr.Name, Connection: conn, As: as, Inspect: ex.Inspect.String(),
			Verdict: string(ex.Verdict), Rule: ex.Rule, Reason: ex.Reason, DNS: d,
			NoName: hostIsAddr && req.As == "" && ex.Inspect != policy.InspectNone,
			NoAddr: !hostIsAddr && !q.Dst.Addr().IsValid(), Request: ex.Request})
	}
	return out, nil
}

// ResolverDNS explains DNS with a resolver's filtered lookup (lookup) that
// forwards to upstreams: NXDOMAIN decided locally for names the project's
// rules do not match, else what forwarding answers (always-denied addresses
// removed), noting answers a cidr rule would let through uninspected.
func ResolverDNS(lookup func(ctx context.Context, pr *policy.Project, name string) ([]netip.Addr, error), upstreams []string) DNSExplainer {
	return func(ctx context.Context, pr *policy.Project, name string, port uint16, addrKnown bool) string {
		name = vdns.Name(name)
		if !pr.AllowsName(name) {
			return "NXDOMAIN, decided locally (the query is never sent upstream)"
		}
		ups := strings.Join(upstreams, ", ")
		ctx, cancel := context.WithTimeout(ctx, 2*vdns.UpstreamTimeout)
		defer cancel()
		addrs, err := lookup(ctx, pr, name)
		if err != nil {
			return fmt.Sprintf("answered by forwarding to %s: %v", ups, err)
		}
		var s, notes []string
		for _, ad := range addrs {
			s = append(s, ad.String())
			if rule, ok := pr.CIDRAllows(ad, port); ok && !addrKnown {
				notes = append(notes, fmt.Sprintf("%s is allowed on port %d by %s without inspection", ad, port, rule))
			}
		}
		msg := fmt.Sprintf("answered by forwarding to %s: %s (after removing always-denied addresses)", ups, strings.Join(s, " "))
		if len(notes) > 0 {
			msg += "; note: " + strings.Join(notes, "; ")
		}
		return msg
	}
}
