// Package policy compiles the config's per-project allowlists into a matcher
// and decides, for one connection's facts, whether it may leave the host.
//
// A project's deny rules are evaluated before its allow rules at every
// stage: a deny rule that matches decides, whatever an allow rule says.
//
// A decision has two stages. Connect looks only at addresses: it settles
// cidr rules and tcp rules (never inspected) and unknown ports at once, and
// otherwise says what the data plane must read (a TLS ClientHello, an HTTP
// request head). Decide then settles the name. Both are pure: no I/O, no
// clock; what the resolver handed out (for tcp rules) is given to
// ConnectWith by the caller.
package policy

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/vmegress/vmegress/internal/config"
)

// Verdict is the outcome of a decision.
type Verdict string

// Verdicts.
const (
	Allow Verdict = "allow"
	Deny  Verdict = "deny"
)

// Decision says what to do with a connection and why.
type Decision struct {
	Verdict Verdict
	// Project is the project the source address belongs to ("" if none).
	Project string
	// Rule is the rule that decided, as written in the config: the allow
	// rule that matched, or the deny rule that matched prefixed "deny/"
	// ("" when no rule matched). A preset's rule reads
	// "preset:NAME/KIND:VALUE".
	Rule string
	// Reason explains a denial in words an operator can act on.
	Reason string
}

// Inspect is what the data plane must read before the name stage.
type Inspect int

// What to read.
const (
	// InspectNone: the Connect decision is final.
	InspectNone Inspect = iota
	// InspectTLS: read a ClientHello, then Decide with KindTLS.
	InspectTLS
	// InspectHTTP: read an HTTP request head, then Decide with KindHTTP.
	InspectHTTP
	// InspectEither: the port has both sni and http rules; tell by the first byte.
	InspectEither
)

// Kind is the protocol a name came from.
type Kind string

// Kinds of Facts.
const (
	KindNone Kind = ""
	KindTLS  Kind = "tls"
	KindHTTP Kind = "http"
)

// Facts are what the data plane knows about a connection at the name stage.
type Facts struct {
	Src netip.Addr
	Dst netip.AddrPort
	// Kind is how Name was learnt (KindNone: nothing usable was read).
	Kind Kind
	// Name is the TLS server name or the HTTP Host (without port).
	Name string
}

// Policy is the compiled policy of every project. It is immutable; a reload
// compiles a new one.
type Policy struct {
	bySubnet map[netip.Prefix]*Project
	byName   map[string]*Project
}

// Project is one project's compiled allowlist.
type Project struct {
	Name           string
	Subnet         netip.Prefix
	MaxConnections int
	// Audit: allow everything, log what enforcement would refuse.
	Audit     bool
	sni, http nameMatcher
	// tcp are the tcp rules: names on ports, allowed by address (the
	// resolver's answers), never inspected.
	tcp       nameMatcher
	tcpPorts  map[uint16]bool
	cidrs     []cidrRule
	sniPorts  map[uint16]bool
	httpPorts map[uint16]bool
	// The deny rules; a rule with no ports applies on every port.
	denySNI, denyHTTP, denyTCP nameMatcher
	denyCIDRs                  []cidrRule
	// req are the https rules and the request rules of http rules (https.go).
	req requestRules
	// kernel is Kernel(), derived once at compile.
	kernel Kernel
}

type cidrRule struct {
	prefix netip.Prefix
	ports  []uint16 // nil (deny rules only): every port
	rule   string
}

// DenyPrefix marks a deny rule in Decision.Rule.
const DenyPrefix = "deny/"

// Compile builds the matcher for every project of cfg.
func Compile(cfg *config.Config) (*Policy, error) {
	p := &Policy{bySubnet: make(map[netip.Prefix]*Project, len(cfg.Projects)), byName: make(map[string]*Project, len(cfg.Projects))}
	for _, cp := range cfg.Projects {
		pr, err := CompileProject(cp)
		if err != nil {
			return nil, err
		}
		if err := p.add(pr); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// CompileProject builds one project's matcher.
func CompileProject(cp config.Project) (*Project, error) {
	pr := &Project{
		Name: cp.Name, MaxConnections: cp.MaxConnections, Audit: cp.Mode == "audit",
		sni: newNameMatcher(), http: newNameMatcher(),
		sniPorts: map[uint16]bool{}, httpPorts: map[uint16]bool{},
		denySNI: newNameMatcher(), denyHTTP: newNameMatcher(),
		tcp: newNameMatcher(), denyTCP: newNameMatcher(), tcpPorts: map[uint16]bool{},
		req: newRequestRules(),
	}
	for _, r := range cp.Deny {
		ports, rule := r.Ports, DenyPrefix+r.String() // no ports: every port
		switch r.Kind {
		case config.KindSNI:
			pr.denySNI.add(r.Name, ports, rule)
		case config.KindHTTP:
			pr.denyHTTP.add(r.Name, ports, rule)
		case config.KindTCP:
			pr.denyTCP.add(r.Name, ports, rule)
		case config.KindCIDR:
			pr.denyCIDRs = append(pr.denyCIDRs, cidrRule{r.Prefix, ports, rule})
		default:
			return nil, fmt.Errorf("compiling project %q: deny rule kind %q is not supported", cp.Name, r.Kind)
		}
	}
	for _, r := range cp.Allow {
		ports := r.EffectivePorts()
		switch r.Kind {
		case config.KindSNI:
			pr.sni.add(r.Name, ports, r.String())
			for _, pt := range ports {
				pr.sniPorts[pt] = true
			}
		case config.KindHTTP:
			pr.http.add(r.Name, ports, r.String())
			pr.req.add(r)
			for _, pt := range ports {
				pr.httpPorts[pt] = true
			}
		case config.KindHTTPS:
			pr.req.add(r) // read as TLS, decided by https.go
			for _, pt := range ports {
				pr.sniPorts[pt] = true
			}
		case config.KindTCP:
			pr.tcp.add(r.Name, ports, r.String())
			for _, pt := range ports {
				pr.tcpPorts[pt] = true
			}
		case config.KindCIDR:
			pr.cidrs = append(pr.cidrs, cidrRule{r.Prefix, ports, r.String()})
		default:
			return nil, fmt.Errorf("compiling project %q: rule kind %q is not supported", cp.Name, r.Kind)
		}
	}
	if cp.Subnet.IsValid() {
		if cp.Subnet.Bits() != 30 {
			return nil, fmt.Errorf("compiling project %q: subnet %s is not a /30", cp.Name, cp.Subnet)
		}
		pr.Subnet = cp.Subnet.Masked()
	}
	pr.kernel = pr.buildKernel()
	return pr, nil
}

// add puts a compiled project into p (which must not be shared yet).
func (p *Policy) add(pr *Project) error {
	p.byName[pr.Name] = pr
	if !pr.Subnet.IsValid() {
		return nil // not placed yet: no traffic can come from it
	}
	if other, dup := p.bySubnet[pr.Subnet]; dup && other.Name != pr.Name {
		return fmt.Errorf("compiling project %q: subnet %s is also project %q's", pr.Name, pr.Subnet, other.Name)
	}
	p.bySubnet[pr.Subnet] = pr
	return nil
}

// Update returns a policy equal to p with the projects of changed compiled
// anew (added or replaced) and the projects named in removed taken out. The
// others are shared with p, not recompiled: a change to one project costs
// that project's compile plus copying two maps of pointers. p is unchanged.
func (p *Policy) Update(changed []config.Project, removed []string) (*Policy, error) {
	compiled := make([]*Project, 0, len(changed))
	for _, cp := range changed {
		pr, err := CompileProject(cp)
		if err != nil {
			return nil, err
		}
		compiled = append(compiled, pr)
	}
	// maps.Clone copies each map's table whole, far cheaper at thousands
	// of projects than re-inserting every entry; then only the projects
	// that go or change are taken out.
	n := &Policy{bySubnet: maps.Clone(p.bySubnet), byName: maps.Clone(p.byName)}
	if n.bySubnet == nil {
		n.bySubnet = map[netip.Prefix]*Project{}
	}
	if n.byName == nil {
		n.byName = map[string]*Project{}
	}
	drop := func(name string) {
		old, ok := n.byName[name]
		if !ok {
			return
		}
		delete(n.byName, name)
		if old.Subnet.IsValid() && n.bySubnet[old.Subnet] == old {
			delete(n.bySubnet, old.Subnet)
		}
	}
	for _, name := range removed {
		drop(name)
	}
	for _, pr := range compiled {
		drop(pr.Name)
	}
	for _, pr := range compiled {
		if err := n.add(pr); err != nil {
			return nil, err
		}
	}
	return n, nil
}

// ProjectFor returns the project whose /30 holds src, or nil.
func (p *Policy) ProjectFor(src netip.Addr) *Project {
	src = src.Unmap()
	if !src.Is4() {
		return nil
	}
	pf, _ := src.Prefix(30)
	return p.bySubnet[pf]
}

// Project returns the named project (placed or not), or nil.
func (p *Policy) Project(name string) *Project {
	if p == nil {
		return nil
	}
	return p.byName[name]
}

// Projects returns the placed projects sorted by name.
func (p *Policy) Projects() []*Project {
	out := make([]*Project, 0, len(p.bySubnet))
	for _, pr := range p.bySubnet {
		out = append(out, pr)
	}
	slices.SortFunc(out, func(a, b *Project) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Terminates reports whether some placed project has an https name to
// terminate, stopping at the first (no sort: it is asked every few
// seconds on hosts with thousands of projects).
func (p *Policy) Terminates() bool {
	for _, pr := range p.bySubnet {
		m := pr.req.https
		if len(m.exact) == 0 && len(m.wild) == 0 && (m.any == nil || len(*m.any) == 0) {
			continue // no https rule: Ports' work is not needed to know
		}
		for _, v := range pr.Ports() {
			if len(v.HTTPS) > 0 {
				return true
			}
		}
	}
	return false
}

// Resolved returns the names (normalised) the resolver handed addr to
// project for, whose answers have not expired (TTL plus grace): the
// record tcp rules are decided by (dest.Answers in the daemon).
type Resolved func(project string, addr netip.Addr) []string

// Connect is ConnectWith with nothing resolved: no tcp rule allows.
func (p *Policy) Connect(src netip.Addr, dst netip.AddrPort) (Decision, Inspect) {
	return p.ConnectWith(src, dst, nil)
}

// KernelForwards reports whether the policy lets the kernel forward a
// connection from src to dst by itself: allowed, with nothing to inspect
// (a cidr rule, or a tcp rule for a name resolved holds). What an open
// kernel-forwarded flow must still satisfy to stay open.
func (p *Policy) KernelForwards(src netip.Addr, dst netip.AddrPort, resolved Resolved) bool {
	d, in := p.ConnectWith(src, dst, resolved)
	return d.Verdict == Allow && in == InspectNone
}

// ConnectWith is the address stage: it decides what it can from the source
// and the original destination alone (and, for tcp rules, the names the
// resolver handed the destination's address to the project for; resolved
// may be nil). When the returned Inspect is not InspectNone, the Decision
// is provisional (a denial for the case that nothing usable is read) and
// Decide settles it.
//
// Deny rules come first: a cidr deny, then a tcp deny matching any name
// the address was handed out for (the address cannot tell which of them
// the guest meant, so the deny wins). Then a cidr allow, then a tcp allow
// matching one of the names; then inspection for sni and http rules.
func (p *Policy) ConnectWith(src netip.Addr, dst netip.AddrPort, resolved Resolved) (Decision, Inspect) {
	pr := p.ProjectFor(src)
	if pr == nil {
		return Decision{Verdict: Deny, Reason: "source address is in no project"}, InspectNone
	}
	if rule, ok := pr.CIDRDenies(dst.Addr(), dst.Port()); ok {
		return Decision{Verdict: Deny, Project: pr.Name, Rule: rule, Reason: "denied by rule " + strings.TrimPrefix(rule, DenyPrefix)}, InspectNone
	}
	var names []string
	if resolved != nil && pr.usesTCP(dst.Port()) {
		names = resolved(pr.Name, dst.Addr().Unmap())
	}
	if d, ok := pr.tcpDecision(dst, names, true); ok {
		return d, InspectNone
	}
	if rule, ok := pr.CIDRAllows(dst.Addr(), dst.Port()); ok {
		return Decision{Verdict: Allow, Project: pr.Name, Rule: rule}, InspectNone
	}
	if d, ok := pr.tcpDecision(dst, names, false); ok {
		return d, InspectNone
	}
	port := dst.Port()
	d := Decision{Verdict: Deny, Project: pr.Name}
	switch in := pr.InspectFor(port); in {
	case InspectEither:
		d.Reason = "neither a TLS ClientHello nor an HTTP request"
		return d, in
	case InspectTLS:
		d.Reason = "not a TLS ClientHello"
		return d, in
	case InspectHTTP:
		d.Reason = "not an HTTP request"
		return d, in
	}
	if pr.tcpPorts[port] {
		d.Reason = fmt.Sprintf("no rule of project %s allows %s: the resolver handed this address to the project for no name a tcp rule allows on port %d", pr.Name, dst, port)
		return d, InspectNone
	}
	d.Reason = fmt.Sprintf("no rule of project %s allows port %d", pr.Name, port)
	return d, InspectNone
}

// usesTCP reports whether a tcp rule (allow or deny) may apply on port.
// TCPAllowsPort reports whether some tcp allow rule of the project names
// port (whatever its name).
func (pr *Project) TCPAllowsPort(port uint16) bool { return pr.tcpPorts[port] }

func (pr *Project) usesTCP(port uint16) bool {
	if pr.tcpPorts[port] {
		return true
	}
	found := false
	pr.denyTCP.each(func(_ string, r portRule) {
		found = found || r.ports == nil || slices.Contains(r.ports, port)
	})
	return found
}

// tcpDecision decides dst by the tcp rules and the names its address was
// handed out for: the deny rules (deny true) or the allow rules.
func (pr *Project) tcpDecision(dst netip.AddrPort, names []string, deny bool) (Decision, bool) {
	port := dst.Port()
	for _, name := range names {
		if deny {
			if rule, ok := pr.denyTCP.match(name, port); ok {
				return Decision{Verdict: Deny, Project: pr.Name, Rule: rule, Reason: fmt.Sprintf("denied by rule %s (the resolver handed %s to the project for %s)", strings.TrimPrefix(rule, DenyPrefix), dst.Addr(), name)}, true
			}
			continue
		}
		if port == config.SMTPPort {
			break // never opened by a name rule (config refuses such rules too)
		}
		if rule, ok := pr.tcp.match(name, port); ok {
			return Decision{Verdict: Allow, Project: pr.Name, Rule: rule}, true
		}
	}
	return Decision{}, false
}

// TCPRules returns the tcp allow rules that apply on port (as written),
// sorted, for explanations.
func (pr *Project) TCPRules(port uint16) []string {
	var out []string
	pr.tcp.each(func(_ string, r portRule) {
		if slices.Contains(r.ports, port) && !slices.Contains(out, r.rule) {
			out = append(out, r.rule)
		}
	})
	slices.Sort(out)
	return out
}

// Decide is the name stage for a connection whose Connect asked for inspection.
func (p *Policy) Decide(f Facts) Decision {
	pr := p.ProjectFor(f.Src)
	if pr == nil {
		return Decision{Verdict: Deny, Reason: "source address is in no project"}
	}
	return pr.DecideName(f.Kind, f.Name, f.Dst.Port())
}

// InspectFor says what the project's rules need read on port (InspectNone:
// no name rule applies there).
func (pr *Project) InspectFor(port uint16) Inspect {
	switch tls, http := pr.sniPorts[port], pr.httpPorts[port]; {
	case tls && http:
		return InspectEither
	case tls:
		return InspectTLS
	case http:
		return InspectHTTP
	}
	return InspectNone
}

// DecideName decides a name learnt as kind on port for this project.
func (pr *Project) DecideName(kind Kind, name string, port uint16) Decision {
	d := Decision{Verdict: Deny, Project: pr.Name}
	var m, deny nameMatcher
	switch kind {
	case KindTLS:
		m, deny = pr.sni, pr.denySNI
		if name == "" {
			d.Reason = "TLS ClientHello without a server name (SNI)"
			return d
		}
	case KindHTTP:
		m, deny = pr.http, pr.denyHTTP
		if name == "" {
			d.Reason = "HTTP request without a Host"
			return d
		}
	default:
		d.Reason = "nothing to decide on: no ClientHello or HTTP request"
		return d
	}
	norm, err := config.NormalizeName(name)
	if err != nil || strings.HasPrefix(norm, "*.") {
		d.Reason = "server name is not a valid host name"
		return d
	}
	if port == config.SMTPPort {
		d.Reason = "port 25 is never allowed by a name rule"
		return d
	}
	if rule, ok := deny.match(norm, port); ok {
		d.Rule, d.Reason = rule, "denied by rule "+strings.TrimPrefix(rule, DenyPrefix)
		return d
	}
	if kind == KindTLS {
		if d, ok := pr.terminates(norm, port); ok {
			return d // an https rule takes the name over from sni rules
		}
	}
	if rule, ok := m.match(norm, port); ok {
		return Decision{Verdict: Allow, Project: pr.Name, Rule: rule}
	}
	d.Reason = fmt.Sprintf("no %s rule of project %s allows %s on port %d", ruleKind(kind), pr.Name, norm, port)
	return d
}

func ruleKind(k Kind) string {
	if k == KindHTTP {
		return "http"
	}
	return "sni"
}

// AllowsName reports whether some sni, http or tcp rule of the project
// allows name (normalised) on some port that no deny rule of the same kind
// refuses it on: the resolver answers exactly these names.
func (pr *Project) AllowsName(name string) bool {
	return pr.Resolve(name).Verdict == Allow
}

// Resolve decides whether the resolver answers name (normalised) for the
// project, enforcement assumed (an audit project's resolver answers a
// denied name too): Allow with the first rule that allows the name on a
// port no deny rule refuses it on; else Deny, with the deny rule that
// refused it when one did.
func (pr *Project) Resolve(name string) Decision {
	d := Decision{Verdict: Deny, Project: pr.Name, Reason: "no rule of project " + pr.Name + " allows the name"}
	for _, k := range []struct{ allow, deny nameMatcher }{{pr.sni, pr.denySNI}, {pr.req.https, pr.denySNI}, {pr.http, pr.denyHTTP}, {pr.tcp, pr.denyTCP}} {
		var rule, denied string
		k.allow.candidates(name, func(rs []portRule) bool {
			for _, r := range rs {
				for _, pt := range r.ports {
					dr, ok := k.deny.match(name, pt)
					if !ok {
						rule = r.rule
						return true
					}
					denied = dr
				}
			}
			return false
		})
		if rule != "" {
			return Decision{Verdict: Allow, Project: pr.Name, Rule: rule}
		}
		if denied != "" && d.Rule == "" {
			d.Rule, d.Reason = denied, "denied by rule "+strings.TrimPrefix(denied, DenyPrefix)
		}
	}
	return d
}

// CIDRDenies returns the deny cidr rule refusing addr on port, if any.
func (pr *Project) CIDRDenies(addr netip.Addr, port uint16) (string, bool) {
	addr = addr.Unmap()
	for _, c := range pr.denyCIDRs {
		if c.prefix.Contains(addr) && (c.ports == nil || slices.Contains(c.ports, port)) {
			return c.rule, true
		}
	}
	return "", false
}

// DeniesAddr returns the deny cidr rule refusing addr on every port, if
// any: the resolver never hands such an address out.
func (pr *Project) DeniesAddr(addr netip.Addr) (string, bool) {
	addr = addr.Unmap()
	for _, c := range pr.denyCIDRs {
		if c.ports == nil && c.prefix.Contains(addr) {
			return c.rule, true
		}
	}
	return "", false
}

// CIDRAllows returns the cidr rule allowing addr on port, if any.
func (pr *Project) CIDRAllows(addr netip.Addr, port uint16) (string, bool) {
	addr = addr.Unmap()
	for _, c := range pr.cidrs {
		if c.prefix.Contains(addr) && slices.Contains(c.ports, port) {
			return c.rule, true
		}
	}
	return "", false
}

// CIDRNames reports whether a cidr rule of the project names addr (any
// port): such addresses are exempt from the always-denied set.
func (pr *Project) CIDRNames(addr netip.Addr) bool {
	addr = addr.Unmap()
	for _, c := range pr.cidrs {
		if c.prefix.Contains(addr) {
			return true
		}
	}
	return false
}

// nameMatcher finds the rule for a host name and port: exact names first,
// then the longest "*." suffix, then "*". Lookup is O(labels), whatever the
// rule count.
type nameMatcher struct {
	exact map[string][]portRule
	wild  map[string][]portRule // key: the suffix after "*."
	any   *[]portRule           // the rules "*" (shared by copies of the matcher)
}

type portRule struct {
	ports []uint16 // nil (deny rules only): every port
	rule  string
}

func newNameMatcher() nameMatcher {
	return nameMatcher{exact: map[string][]portRule{}, wild: map[string][]portRule{}, any: new([]portRule)}
}

func (m nameMatcher) add(pattern string, ports []uint16, rule string) {
	if pattern == config.AnyName {
		*m.any = append(*m.any, portRule{ports, rule})
		return
	}
	if suffix, ok := strings.CutPrefix(pattern, "*."); ok {
		m.wild[suffix] = append(m.wild[suffix], portRule{ports, rule})
		return
	}
	m.exact[pattern] = append(m.exact[pattern], portRule{ports, rule})
}

func findPort(rs []portRule, port uint16) (string, bool) {
	for _, r := range rs {
		if r.ports == nil || slices.Contains(r.ports, port) {
			return r.rule, true
		}
	}
	return "", false
}

// candidates calls f with the rules for name: exact, then each "*." suffix
// from the longest ("*.x.com" matches "a.x.com" and "a.b.x.com", not "x.com").
func (m nameMatcher) candidates(name string, f func([]portRule) bool) bool {
	if rs, ok := m.exact[name]; ok && f(rs) {
		return true
	}
	for rest := name; ; {
		i := strings.IndexByte(rest, '.')
		if i < 0 {
			break
		}
		rest = rest[i+1:]
		if rs, ok := m.wild[rest]; ok && f(rs) {
			return true
		}
	}
	return m.any != nil && len(*m.any) > 0 && f(*m.any)
}

// match reports the rule allowing name (normalised) on port.
func (m nameMatcher) match(name string, port uint16) (rule string, ok bool) {
	ok = m.candidates(name, func(rs []portRule) bool {
		rule, ok = findPort(rs, port)
		return ok
	})
	return rule, ok
}

// each calls f with every pattern of m and its rules.
func (m nameMatcher) each(f func(pattern string, r portRule)) {
	for name, rs := range m.exact {
		for _, r := range rs {
			f(name, r)
		}
	}
	for suffix, rs := range m.wild {
		for _, r := range rs {
			f("*."+suffix, r)
		}
	}
	if m.any != nil {
		for _, r := range *m.any {
			f(config.AnyName, r)
		}
	}
}
