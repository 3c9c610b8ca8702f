// Package suggest turns observed traffic (vmegress access-log lines) into
// allow rules that would have covered it: the step from audit to enforce.
package suggest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	"golang.org/x/net/publicsuffix"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/dest"
)

// Line is the part of an access-log line suggest reads.
type Line struct {
	Time    time.Time `json:"time"`
	Msg     string    `json:"msg"`
	Project string    `json:"project"`
	Dst     string    `json:"dst"`
	SNI     string    `json:"sni"`
	Host    string    `json:"host"`
	Name    string    `json:"name"` // dns lines
	Verdict string    `json:"verdict"`
	// Method and Path: request lines (a terminated https connection).
	Method string `json:"method"`
	Path   string `json:"path"`
}

// Observed is what one project did.
type Observed struct {
	TLS, HTTP map[string]map[uint16]bool // name → ports
	// HTTPS are the names whose TLS vmegress terminated (request lines):
	// name → port → paths requested.
	HTTPS map[string]map[uint16]map[string]bool
	Addrs map[netip.Addr]map[uint16]bool
	// Resolved are names queried but never seen in a connection.
	Resolved    map[string]bool
	Connections int
	Queries     int
}

// Read collects project's lines at or after since from r. Lines that are not
// JSON (or not for the project) are skipped.
func Read(r io.Reader, project string, since time.Time) (*Observed, error) {
	o := &Observed{TLS: map[string]map[uint16]bool{}, HTTP: map[string]map[uint16]bool{}, HTTPS: map[string]map[uint16]map[string]bool{},
		Addrs: map[netip.Addr]map[uint16]bool{}, Resolved: map[string]bool{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var l Line
		if json.Unmarshal(sc.Bytes(), &l) != nil || l.Project != project || l.Time.Before(since) {
			continue
		}
		switch l.Msg {
		case "dns":
			if n, err := config.NormalizeName(l.Name); err == nil {
				o.Resolved[n] = true
				o.Queries++
			}
		case "request":
			dst, err := netip.ParseAddrPort(l.Dst)
			n, nerr := config.NormalizeName(l.SNI)
			if err != nil || dst.Port() == 0 || l.SNI == "" || nerr != nil || strings.HasPrefix(n, "*.") || !strings.HasPrefix(l.Path, "/") {
				continue // plain-HTTP request lines: the connection line has the host
			}
			if o.HTTPS[n] == nil {
				o.HTTPS[n] = map[uint16]map[string]bool{}
			}
			if o.HTTPS[n][dst.Port()] == nil {
				o.HTTPS[n][dst.Port()] = map[string]bool{}
			}
			if config.ValidPath(l.Path) != nil {
				// A path no rule can name (escapes, spaces, a query): the
				// rule suggested does not allow it, which says so.
				continue
			}
			o.HTTPS[n][dst.Port()][l.Path] = true
		case "connection":
			dst, err := netip.ParseAddrPort(l.Dst)
			if err != nil || dst.Port() == 0 {
				continue // no rule can name port 0
			}
			o.Connections++
			switch {
			case l.SNI != "" && add(o.TLS, l.SNI, dst.Port()):
			case l.Host != "" && add(o.HTTP, l.Host, dst.Port()):
			default:
				// No name, or one no rule can hold (an IP literal as the
				// HTTP Host): only the address describes the connection.
				a := dst.Addr().Unmap().WithZone("")
				if o.Addrs[a] == nil {
					o.Addrs[a] = map[uint16]bool{}
				}
				o.Addrs[a][dst.Port()] = true
			}
		}
	}
	for n := range o.HTTPS {
		delete(o.TLS, n) // the https rule covers the name
		delete(o.Resolved, n)
	}
	for n := range o.TLS {
		delete(o.Resolved, n)
	}
	for n := range o.HTTP {
		delete(o.Resolved, n)
	}
	return o, sc.Err()
}

// add records name on port and reports whether name is one a rule can hold.
func add(m map[string]map[uint16]bool, name string, port uint16) bool {
	n, err := config.NormalizeName(name)
	if err != nil || strings.HasPrefix(n, "*.") {
		return false
	}
	if m[n] == nil {
		m[n] = map[uint16]bool{}
	}
	m[n][port] = true
	return true
}

// Rule is one suggested allow rule.
type Rule struct {
	Kind  config.RuleKind `json:"kind"`
	Value string          `json:"value"`
	Ports []uint16        `json:"ports,omitempty"` // nil: the kind's default
	// Paths of an https rule: the paths seen, exact, or "/first/*" for a
	// first segment seen with more than MaxPaths paths.
	Paths []string `json:"paths,omitempty"`
}

// MaxPaths is how many exact paths an https rule lists before its paths
// are folded into first-segment prefixes.
const MaxPaths = 10

// Omission is traffic suggest saw but proposes no rule for, and why: pasted,
// such a rule would open the host, the guests or an always-denied address
// (cloud metadata, private networks), or a wildcard would cover a public
// suffix (every registrant under "co.uk").
type Omission struct {
	Kind   config.RuleKind `json:"kind"`
	Value  string          `json:"value"`
	Ports  []uint16        `json:"ports,omitempty"`
	Reason string          `json:"reason"`
}

// Exclusions are the destinations suggest never proposes beyond the
// always-denied set (internal/dest).
type Exclusions struct {
	// GuestRange is vm_cidr; the zero value excludes no guest range.
	GuestRange netip.Prefix
	// HostAddrs are the host's own addresses (every interface of the netns
	// vmegress runs in); nil excludes none.
	HostAddrs []netip.Addr
}

// why returns why a must not be suggested, or "".
func (ex Exclusions) why(a netip.Addr) string {
	a = a.Unmap()
	if slices.Contains(ex.HostAddrs, a) {
		return "an address of this host"
	}
	if ex.GuestRange.IsValid() && ex.GuestRange.Contains(a) {
		return "in the guest range (vm_cidr " + ex.GuestRange.String() + ")"
	}
	if why := dest.AlwaysDenied(a); why != "" {
		return "always denied: " + why
	}
	return ""
}

// Suggestion is what Suggest proposes and what it left out.
type Suggestion struct {
	Rules   []Rule
	Omitted []Omission
}

// Suggest returns the allow rules covering o and what it refused to cover.
// Names that share a parent with at least one other observed name become
// "*.parent", but only when parent is a registrable domain or below it
// (public suffix list: never "*.com", "*.co.uk" or "*.github.io"); everything
// else stays exact. Addresses of the host, of the guest range and in the
// always-denied set are never proposed: a cidr rule would open them.
func (o *Observed) Suggest(ex Exclusions) Suggestion {
	var s Suggestion
	for _, k := range []struct {
		kind  config.RuleKind
		names map[string]map[uint16]bool
		port  uint16
	}{{config.KindSNI, o.TLS, 443}, {config.KindHTTP, o.HTTP, 80}} {
		rules, omitted := nameRules(k.kind, k.names, k.port)
		s.Rules = append(s.Rules, rules...)
		s.Omitted = append(s.Omitted, omitted...)
	}
	for _, n := range slices.Sorted(maps.Keys(o.HTTPS)) {
		ports := map[uint16]bool{}
		paths := map[string]bool{}
		for p, ps := range o.HTTPS[n] {
			ports[p] = true
			for path := range ps {
				paths[path] = true
			}
		}
		s.Rules = append(s.Rules, Rule{Kind: config.KindHTTPS, Value: n, Ports: portsOrDefault(ports, 443), Paths: foldPaths(paths)})
	}
	addrs := make([]netip.Addr, 0, len(o.Addrs))
	for a := range o.Addrs {
		addrs = append(addrs, a)
	}
	slices.SortFunc(addrs, func(a, b netip.Addr) int { return a.Compare(b) })
	for _, a := range addrs {
		r := Rule{Kind: config.KindCIDR, Value: netip.PrefixFrom(a, a.BitLen()).String(), Ports: sortedPorts(o.Addrs[a])}
		if why := ex.why(a); why != "" {
			s.Omitted = append(s.Omitted, Omission{Kind: r.Kind, Value: r.Value, Ports: r.Ports, Reason: why})
			continue
		}
		s.Rules = append(s.Rules, r)
	}
	return s
}

// foldPaths lists the paths seen, sorted; over MaxPaths, each first
// segment becomes a prefix rule ("/v1/*"), a path without one stays exact.
func foldPaths(seen map[string]bool) []string {
	all := slices.Sorted(maps.Keys(seen))
	if len(all) <= MaxPaths {
		return all
	}
	out := map[string]bool{}
	for _, p := range all {
		seg, _, more := strings.Cut(strings.TrimPrefix(p, "/"), "/")
		if more && seg != "" && config.ValidPath("/"+seg+"/*") == nil {
			out["/"+seg+"/*"] = true
		} else {
			out[p] = true
		}
	}
	return slices.Sorted(maps.Keys(out))
}

// registrable reports whether a wildcard under parent stays inside one
// registrant's domain: parent is its own registrable domain (eTLD+1) or a
// name below one.
func registrable(parent string) bool {
	_, err := publicsuffix.EffectiveTLDPlusOne(parent)
	return err == nil
}

func nameRules(kind config.RuleKind, names map[string]map[uint16]bool, defPort uint16) ([]Rule, []Omission) {
	byParent := map[string][]string{}
	for n := range names {
		if i := strings.IndexByte(n, '.'); i > 0 {
			byParent[n[i+1:]] = append(byParent[n[i+1:]], n)
		}
	}
	covered := map[string]bool{}
	var out []Rule
	var omitted []Omission
	for parent, kids := range byParent {
		if len(kids) < 2 {
			continue
		}
		ports := map[uint16]bool{}
		for _, k := range kids {
			for p := range names[k] {
				ports[p] = true
			}
		}
		if !registrable(parent) {
			omitted = append(omitted, Omission{Kind: kind, Value: "*." + parent, Ports: portsOrDefault(ports, defPort),
				Reason: parent + " is a public suffix: a wildcard would cover every domain registered under it; the names stay exact"})
			continue
		}
		for _, k := range kids {
			covered[k] = true
		}
		out = append(out, Rule{Kind: kind, Value: "*." + parent, Ports: portsOrDefault(ports, defPort)})
	}
	for n, ports := range names {
		if !covered[n] {
			out = append(out, Rule{Kind: kind, Value: n, Ports: portsOrDefault(ports, defPort)})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Value < out[j].Value })
	sort.Slice(omitted, func(i, j int) bool { return omitted[i].Value < omitted[j].Value })
	return out, omitted
}

func sortedPorts(m map[uint16]bool) []uint16 {
	out := make([]uint16, 0, len(m))
	for p := range m {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

func portsOrDefault(m map[uint16]bool, def uint16) []uint16 {
	if len(m) == 1 && m[def] {
		return nil
	}
	return sortedPorts(m)
}

// Report is a suggestion as data (`policy suggest --json`).
type Report struct {
	Project     string `json:"project"`
	Connections int    `json:"connections"`
	Queries     int    `json:"dns_queries"`
	Rules       []Rule `json:"rules"`
	// Omitted is what was seen but not suggested, each with the reason.
	Omitted []Omission `json:"omitted"`
	// ResolvedOnly are names queried but never connected to.
	ResolvedOnly []string `json:"resolved_only"`
}

// NewReport returns s for project as a Report.
func NewReport(project string, s Suggestion, o *Observed) Report {
	r := Report{Project: project, Connections: o.Connections, Queries: o.Queries,
		Rules: s.Rules, Omitted: s.Omitted, ResolvedOnly: make([]string, 0, len(o.Resolved))}
	if r.Rules == nil {
		r.Rules = []Rule{}
	}
	if r.Omitted == nil {
		r.Omitted = []Omission{}
	}
	for n := range o.Resolved {
		r.ResolvedOnly = append(r.ResolvedOnly, n)
	}
	sort.Strings(r.ResolvedOnly)
	return r
}

// YAML renders a suggestion as a config fragment for project, ready to
// paste; what was left out is listed in comments, with the reason.
func YAML(project string, s Suggestion, o *Observed) string {
	rules := s.Rules
	var b strings.Builder
	fmt.Fprintf(&b, "# from %d connections and %d DNS queries\nprojects:\n  %s:\n    allow:\n", o.Connections, o.Queries, project)
	if len(rules) == 0 {
		b.WriteString("      []\n")
	}
	for _, r := range rules {
		fmt.Fprintf(&b, "      - %s: %q\n", r.Kind, r.Value)
		if len(r.Ports) > 0 {
			ps := make([]string, len(r.Ports))
			for i, p := range r.Ports {
				ps[i] = fmt.Sprint(p)
			}
			fmt.Fprintf(&b, "        ports: [%s]\n", strings.Join(ps, ", "))
		}
		if len(r.Paths) > 0 {
			ps := make([]string, len(r.Paths))
			for i, p := range r.Paths {
				ps[i] = fmt.Sprintf("%q", p)
			}
			fmt.Fprintf(&b, "        paths: [%s]\n", strings.Join(ps, ", "))
		}
	}
	resolved := make([]string, 0, len(o.Resolved))
	for n := range o.Resolved {
		resolved = append(resolved, n)
	}
	sort.Strings(resolved)
	for _, n := range resolved {
		fmt.Fprintf(&b, "      # resolved but never connected to: %s\n", n)
	}
	for _, om := range s.Omitted {
		ports := ""
		if len(om.Ports) > 0 {
			ps := make([]string, len(om.Ports))
			for i, p := range om.Ports {
				ps[i] = fmt.Sprint(p)
			}
			ports = " ports [" + strings.Join(ps, ", ") + "]"
		}
		fmt.Fprintf(&b, "      # not suggested: %s %s%s: %s\n", om.Kind, om.Value, ports, om.Reason)
	}
	return b.String()
}
