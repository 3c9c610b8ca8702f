// Package dns is vmegress's allowlist resolver. Guests' DNS (UDP and TCP port
// 53, to any address) is redirected to it. It answers only names the guest's
// project allows, NXDOMAIN for the rest without asking anyone (no DNS
// exfiltration), strips denied addresses (DNS rebinding) and ECH parameters
// from what upstream answers, and remembers which addresses it gave to which
// project so the data plane can dial them without a second lookup.
package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/time/rate"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/dest"
	"github.com/vmegress/vmegress/internal/metrics"
	"github.com/vmegress/vmegress/internal/policy"
)

// Per-project query rate limit (zero Rate/Burst): a resolver for sandboxes,
// not a DNS flood relay. The config's dns.rate_limit sets it.
const (
	DefaultRate  = 200 // queries per second, sustained
	DefaultBurst = 400
)

// UpstreamTimeout bounds one upstream exchange.
const UpstreamTimeout = 3 * time.Second

// Exchanger sends one query upstream (a *mdns.Client in production).
type Exchanger interface {
	ExchangeContext(ctx context.Context, m *mdns.Msg, addr string) (*mdns.Msg, time.Duration, error)
}

// Resolver answers guests' queries. Set the fields, then serve it with Serve
// (which enforces the rate limits and connection caps: ServeDNS, its
// mdns.Handler, does not) or use Lookup.
type Resolver struct {
	policy atomic.Pointer[policy.Policy]

	// Upstreams are "ip:port" resolvers tried in order.
	Upstreams []string
	// UDP and TCP exchange queries with upstreams; their sockets must carry
	// the upstream mark. Zero: plain clients.
	UDP, TCP Exchanger
	// LocalUDP and LocalTCP exchange queries with loopback upstreams (a
	// stub on the host: systemd-resolved's 127.0.0.53, dnsmasq), without the
	// upstream mark: the ruleset's output backstop drops marked packets to
	// the host's own addresses. Only the resolver talks to them, with
	// queries it built for allowed names; guests never reach loopback.
	// Zero: plain clients.
	LocalUDP, LocalTCP Exchanger
	// Answers records what was given to whom (may be nil).
	Answers *dest.Answers
	// Admit is told, before an answer leaves, the IPv4 addresses it hands
	// a project for a name and their TTL (the engine puts them in the
	// ruleset for the project's tcp rules); may be nil.
	Admit func(project, name string, addrs []netip.Addr, ttl time.Duration) error
	// GuestRange is never given out as an answer.
	GuestRange netip.Prefix
	// Rate and Burst limit each project's packets and TCP connections,
	// charged before parsing (zero: defaults).
	Rate  rate.Limit
	Burst int
	Log   *slog.Logger
	// AccessLog gets one "dns" line per query of a project (may be nil).
	AccessLog *slog.Logger
	// Metrics counts queries by verdict (may be nil).
	Metrics *metrics.Metrics

	// Now is the clock of the answer cache (zero: time.Now).
	Now func() time.Time

	mu       sync.Mutex
	limiters map[string]*rate.Limiter
	warned   map[string]*rate.Limiter // spaces "over the limit" warnings
	cache    map[cacheKey]cached
}

// The answer cache holds upstream responses (before per-project filtering)
// for their TTL, at most CacheMaxTTL, negative ones NegativeTTL.
const (
	CacheEntries = 10000
	CacheMaxTTL  = 300 * time.Second
	NegativeTTL  = 30 * time.Second
)

type cacheKey struct {
	name  string
	qtype uint16
}

type cached struct {
	msg     *mdns.Msg
	stored  time.Time
	expires time.Time
}

func (r *Resolver) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// cacheGet returns a copy of a fresh cached response, TTLs aged.
func (r *Resolver) cacheGet(k cacheKey) *mdns.Msg {
	now := r.now()
	r.mu.Lock()
	c, ok := r.cache[k]
	r.mu.Unlock()
	if !ok || now.After(c.expires) {
		return nil
	}
	m := c.msg.Copy()
	age := uint32(now.Sub(c.stored) / time.Second)
	for _, rr := range append(m.Answer, m.Ns...) {
		if h := rr.Header(); h.Ttl > age {
			h.Ttl -= age
		} else {
			h.Ttl = 0
		}
	}
	return m
}

func (r *Resolver) cachePut(k cacheKey, m *mdns.Msg) {
	if m.Rcode != mdns.RcodeSuccess && m.Rcode != mdns.RcodeNameError {
		return
	}
	ttl := CacheMaxTTL
	if len(m.Answer) == 0 {
		ttl = NegativeTTL
	}
	for _, rr := range m.Answer {
		if t := time.Duration(rr.Header().Ttl) * time.Second; t < ttl {
			ttl = t
		}
	}
	if ttl <= 0 {
		return
	}
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cache == nil {
		r.cache = map[cacheKey]cached{}
	}
	if len(r.cache) >= CacheEntries {
		for ck, c := range r.cache {
			if now.After(c.expires) {
				delete(r.cache, ck)
			}
		}
		if len(r.cache) >= CacheEntries {
			clear(r.cache)
		}
	}
	r.cache[k] = cached{msg: m.Copy(), stored: now, expires: now.Add(ttl)}
}

// SetPolicy swaps the policy queries are answered by.
func (r *Resolver) SetPolicy(p *policy.Policy) { r.policy.Store(p) }

func (r *Resolver) limiter(project string) *rate.Limiter {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.limiters == nil {
		r.limiters = map[string]*rate.Limiter{}
	}
	l := r.limiters[project]
	if l == nil {
		lim, burst := r.Rate, r.Burst
		if lim == 0 {
			lim = DefaultRate
		}
		if burst == 0 {
			burst = DefaultBurst
		}
		l = rate.NewLimiter(lim, burst)
		r.limiters[project] = l
	}
	return l
}

func (r *Resolver) udp() Exchanger {
	if r.UDP != nil {
		return r.UDP
	}
	return &mdns.Client{Net: "udp", Timeout: UpstreamTimeout}
}

func (r *Resolver) tcp() Exchanger {
	if r.TCP != nil {
		return r.TCP
	}
	return &mdns.Client{Net: "tcp", Timeout: UpstreamTimeout}
}

func (r *Resolver) localUDP() Exchanger {
	if r.LocalUDP != nil {
		return r.LocalUDP
	}
	return &mdns.Client{Net: "udp", Timeout: UpstreamTimeout}
}

func (r *Resolver) localTCP() Exchanger {
	if r.LocalTCP != nil {
		return r.LocalTCP
	}
	return &mdns.Client{Net: "tcp", Timeout: UpstreamTimeout}
}

// exchangers returns the UDP and TCP exchangers for upstream u ("ip:port"):
// unmarked ones for a loopback address, marked ones for the rest.
func (r *Resolver) exchangers(u string) (udp, tcp Exchanger) {
	if ap, err := netip.ParseAddrPort(u); err == nil && ap.Addr().Unmap().IsLoopback() {
		return r.localUDP(), r.localTCP()
	}
	return r.udp(), r.tcp()
}

func addrOf(a net.Addr) netip.Addr {
	switch v := a.(type) {
	case *net.UDPAddr:
		return v.AddrPort().Addr().Unmap()
	case *net.TCPAddr:
		return v.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}

// Name normalises a query name: lower case, no trailing dot.
func Name(q string) string { return strings.ToLower(strings.TrimSuffix(q, ".")) }

// ServeDNS implements mdns.Handler.
func (r *Resolver) ServeDNS(w mdns.ResponseWriter, req *mdns.Msg) {
	src := addrOf(w.RemoteAddr())
	o := r.answer(context.Background(), src, req)
	r.Metrics.DNSQuery(o.project, o.verdict)
	if r.AccessLog != nil && o.project != "" && len(req.Question) == 1 {
		attrs := []slog.Attr{slog.String("project", o.project), slog.String("src", src.String()),
			slog.String("name", Name(req.Question[0].Name)), slog.String("type", mdns.TypeToString[req.Question[0].Qtype]),
			slog.String("verdict", o.verdict)}
		if o.reason != "" {
			attrs = append(attrs, slog.String("reason", o.reason))
		}
		r.AccessLog.LogAttrs(context.Background(), slog.LevelInfo, "dns", attrs...)
	}
	if o.resp == nil {
		return
	}
	if _, ok := w.RemoteAddr().(*net.UDPAddr); ok {
		size := mdns.MinMsgSize
		if opt := req.IsEdns0(); opt != nil {
			size = max(int(opt.UDPSize()), mdns.MinMsgSize)
		}
		o.resp.Truncate(size)
	}
	w.WriteMsg(o.resp)
}

func reply(req *mdns.Msg, rcode int) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetRcode(req, rcode)
	m.RecursionAvailable = true
	return m
}

// outcome is answer's result: the response (nil: none) and, for logs, the
// verdict, the project and why a query was refused.
type outcome struct {
	resp    *mdns.Msg
	verdict string
	project string
	reason  string
}

// answer builds the response for one query.
func (r *Resolver) answer(ctx context.Context, src netip.Addr, req *mdns.Msg) outcome {
	pol := r.policy.Load()
	pr := pol.ProjectFor(src)
	if pr == nil {
		return outcome{resp: reply(req, mdns.RcodeRefused), verdict: "refused", reason: "source in no project"}
	}
	log := r.Log.With("project", pr.Name, "src", src.String())
	if req.Opcode != mdns.OpcodeQuery || len(req.Question) != 1 {
		return outcome{reply(req, mdns.RcodeNotImplemented), "refused", pr.Name, "not a query with one question"}
	}
	q := req.Question[0]
	switch q.Qtype {
	case mdns.TypeAXFR, mdns.TypeIXFR, mdns.TypeANY:
		return outcome{reply(req, mdns.RcodeRefused), "refused", pr.Name, "query type " + mdns.TypeToString[q.Qtype] + " is never answered"}
	}
	// NXDOMAIN, decided here: the name never leaves the host.
	nx := func(reason string) outcome {
		log.Debug("dns query denied", "name", Name(q.Name), "type", mdns.TypeToString[q.Qtype], "reason", reason)
		m := reply(req, mdns.RcodeNameError)
		m.Authoritative = true
		return outcome{m, "deny", pr.Name, reason}
	}
	// Decided on the wire labels, in every mode: what is checked is what
	// would be sent.
	name, err := QueryName(q.Name)
	if err != nil {
		return nx(fmt.Sprintf("not a valid host name: %v", err))
	}
	if q.Qclass != mdns.ClassINET {
		return nx("query class is not IN")
	}
	verdict := "allow"
	if d := pr.Resolve(name); d.Verdict != policy.Allow {
		if !pr.Audit {
			return nx(d.Reason)
		}
		verdict = "would_deny" // audit: answered, but enforcement would not
	}
	up := new(mdns.Msg)
	up.SetQuestion(mdns.Fqdn(name), q.Qtype)
	up.RecursionDesired = true
	up.SetEdns0(1232, false)
	resp, err := r.exchange(ctx, up)
	if err != nil {
		log.Warn("dns upstream failed", "name", name, "err", err)
		return outcome{reply(req, mdns.RcodeServerFailure), "error", pr.Name, "no upstream answered"}
	}
	out := reply(req, resp.Rcode)
	out.Answer = r.filter(pr, name, resp.Answer)
	out.Ns = resp.Ns
	log.Debug("dns query answered", "name", name, "type", mdns.TypeToString[q.Qtype], "answers", len(out.Answer), "verdict", verdict)
	return outcome{resp: out, verdict: verdict, project: pr.Name}
}

// exchange answers from the cache or asks each upstream in turn, over TCP
// when the UDP answer is truncated. The result is the caller's to modify.
func (r *Resolver) exchange(ctx context.Context, m *mdns.Msg) (*mdns.Msg, error) {
	k := cacheKey{Name(m.Question[0].Name), m.Question[0].Qtype}
	if c := r.cacheGet(k); c != nil {
		return c, nil
	}
	resp, err := r.ask(ctx, m)
	if err == nil {
		r.cachePut(k, resp)
	}
	return resp, err
}

func (r *Resolver) ask(ctx context.Context, m *mdns.Msg) (*mdns.Msg, error) {
	if len(r.Upstreams) == 0 {
		return nil, errors.New("no upstream resolvers configured")
	}
	var errs []error
	for _, u := range r.Upstreams {
		resp, err := r.askOne(ctx, m, u)
		if err == nil {
			return resp, nil
		}
		errs = append(errs, err)
	}
	return nil, errors.Join(errs...)
}

// askOne exchanges m with upstream u, over TCP when the UDP answer is
// truncated.
func (r *Resolver) askOne(ctx context.Context, m *mdns.Msg, u string) (*mdns.Msg, error) {
	udp, tcp := r.exchangers(u)
	ctx, cancel := context.WithTimeout(ctx, UpstreamTimeout)
	defer cancel()
	resp, _, err := udp.ExchangeContext(ctx, m, u)
	if err == nil && resp.Truncated {
		resp, _, err = tcp.ExchangeContext(ctx, m, u)
	}
	if err != nil {
		return nil, fmt.Errorf("asking %s: %w", u, err)
	}
	return resp, nil
}

// Probe asks upstream u for the root's name servers exactly as guests'
// queries are sent (marked, or unmarked to a loopback stub): nil if it
// answers, whatever the answer, except REFUSED.
func (r *Resolver) Probe(ctx context.Context, u string) error {
	m := new(mdns.Msg)
	m.SetQuestion(".", mdns.TypeNS)
	m.RecursionDesired = true
	resp, err := r.askOne(ctx, m, u)
	if err != nil {
		return err
	}
	if resp.Rcode == mdns.RcodeRefused {
		return fmt.Errorf("asking %s: refused", u)
	}
	return nil
}

// allowedAddr reports whether an answer may carry addr for project pr.
func (r *Resolver) allowedAddr(pr *policy.Project, a netip.Addr) bool {
	a = a.Unmap()
	if r.GuestRange.IsValid() && r.GuestRange.Contains(a) {
		return false
	}
	if _, denied := pr.DeniesAddr(a); denied {
		return false
	}
	return dest.AlwaysDenied(a) == "" || pr.CIDRNames(a)
}

// filter drops denied addresses (rebinding) and ECH parameters from an
// answer section and records the addresses given out for name.
func (r *Resolver) filter(pr *policy.Project, name string, rrs []mdns.RR) []mdns.RR {
	out := rrs[:0:0]
	var admit []netip.Addr
	minTTL := time.Duration(-1)
	for _, rr := range rrs {
		var ip net.IP
		switch v := rr.(type) {
		case *mdns.A:
			ip = v.A
		case *mdns.AAAA:
			ip = v.AAAA
		case *mdns.HTTPS:
			v.Value = r.filterSVCB(pr, v.Value)
		case *mdns.SVCB:
			v.Value = r.filterSVCB(pr, v.Value)
		}
		if ip != nil {
			a, ok := netip.AddrFromSlice(ip)
			if !ok || !r.allowedAddr(pr, a) {
				continue
			}
			ttl := time.Duration(rr.Header().Ttl) * time.Second
			if r.Answers != nil {
				r.Answers.Record(pr.Name, name, a, ttl)
			}
			if a.Unmap().Is4() {
				admit = append(admit, a.Unmap())
				if minTTL < 0 || ttl < minTTL {
					minTTL = ttl
				}
			}
		}
		out = append(out, rr)
	}
	if r.Admit != nil && len(admit) > 0 {
		if err := r.Admit(pr.Name, name, admit, minTTL); err != nil && r.Log != nil {
			// The answer still leaves (other rule kinds may need it); the
			// kernel refuses the tcp rule's connections: fail closed.
			r.Log.Error("admitting resolved addresses for tcp rules", "project", pr.Name, "name", name, "err", err.Error())
		}
	}
	return out
}

// filterSVCB removes ech (the client must show the real name in SNI) and
// denied address hints.
func (r *Resolver) filterSVCB(pr *policy.Project, kvs []mdns.SVCBKeyValue) []mdns.SVCBKeyValue {
	out := kvs[:0:0]
	for _, kv := range kvs {
		switch v := kv.(type) {
		case *mdns.SVCBECHConfig:
			continue
		case *mdns.SVCBIPv4Hint:
			v.Hint = r.filterIPs(pr, v.Hint)
			if len(v.Hint) == 0 {
				continue
			}
		case *mdns.SVCBIPv6Hint:
			v.Hint = r.filterIPs(pr, v.Hint)
			if len(v.Hint) == 0 {
				continue
			}
		}
		out = append(out, kv)
	}
	return out
}

func (r *Resolver) filterIPs(pr *policy.Project, ips []net.IP) []net.IP {
	out := ips[:0:0]
	for _, ip := range ips {
		if a, ok := netip.AddrFromSlice(ip); ok && r.allowedAddr(pr, a) {
			out = append(out, ip)
		}
	}
	return out
}

// Lookup resolves name's IPv4 addresses upstream for the data plane's own
// use (vetted dialing), filtered as a guest's answer would be.
func (r *Resolver) Lookup(ctx context.Context, pr *policy.Project, name string) ([]netip.Addr, error) {
	name, err := config.HostName(name)
	if err != nil {
		return nil, fmt.Errorf("resolving: %w", err)
	}
	m := new(mdns.Msg)
	m.SetQuestion(mdns.Fqdn(name), mdns.TypeA)
	m.RecursionDesired = true
	m.SetEdns0(1232, false)
	resp, err := r.exchange(ctx, m)
	if err != nil {
		return nil, err
	}
	if resp.Rcode != mdns.RcodeSuccess {
		return nil, fmt.Errorf("resolving %s: %s", name, mdns.RcodeToString[resp.Rcode])
	}
	var addrs []netip.Addr
	for _, rr := range r.filter(pr, name, resp.Answer) {
		if a, ok := rr.(*mdns.A); ok {
			if ip, ok := netip.AddrFromSlice(a.A); ok {
				addrs = append(addrs, ip.Unmap())
			}
		}
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("resolving %s: no usable address", name)
	}
	return addrs, nil
}

// UpstreamsFromResolvConf reads the nameservers of a resolv.conf file as
// "ip:port" strings. Only the nameserver lines count: search domains and
// ndots never apply, every name vmegress sends is fully qualified.
func UpstreamsFromResolvConf(path string) ([]string, error) {
	cc, err := mdns.ClientConfigFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading upstream resolvers from %s: %w", path, err)
	}
	var out []string
	for _, s := range cc.Servers {
		if a, err := netip.ParseAddr(s); err == nil {
			out = append(out, net.JoinHostPort(a.String(), cc.Port))
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no nameserver in %s", path)
	}
	return out, nil
}

// ResolvedConf is where systemd-resolved lists the servers its stub
// forwards to (systemd-resolved.service(8)).
const ResolvedConf = "/run/systemd/resolve/resolv.conf"

// resolvedStub reports whether u is a systemd-resolved stub listener:
// 127.0.0.53 (the stub) or 127.0.0.54 (its proxy-only twin).
func resolvedStub(u string) bool {
	ap, err := netip.ParseAddrPort(u)
	if err != nil {
		return false
	}
	a := ap.Addr().Unmap()
	return a == netip.AddrFrom4([4]byte{127, 0, 0, 53}) || a == netip.AddrFrom4([4]byte{127, 0, 0, 54})
}

// HostUpstreams returns the host's resolvers, the default of dns.upstreams:
// the nameservers of resolvConf; when these are only systemd-resolved's
// stub, the servers it forwards to, from resolvedConf (zero: ResolvedConf)
// if that names any that are not the stub. A loopback upstream left over is
// asked without the upstream mark (Resolver.LocalUDP).
func HostUpstreams(resolvConf, resolvedConf string) ([]string, error) {
	ups, err := UpstreamsFromResolvConf(resolvConf)
	if err != nil {
		return nil, err
	}
	if !slices.ContainsFunc(ups, func(u string) bool { return !resolvedStub(u) }) {
		if resolvedConf == "" {
			resolvedConf = ResolvedConf
		}
		real, err := UpstreamsFromResolvConf(resolvedConf)
		if err == nil && slices.ContainsFunc(real, func(u string) bool { return !resolvedStub(u) }) {
			return slices.DeleteFunc(real, resolvedStub), nil
		}
	}
	return ups, nil
}
