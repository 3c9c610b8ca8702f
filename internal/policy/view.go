package policy

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/vmegress/vmegress/internal/config"
)

// NameRule is one sni or http name pattern ("a.example" or "*.example",
// normalised) and the rule, as written in the config, that allows it.
type NameRule struct {
	Pattern string
	Rule    string
}

// CIDRRule is one cidr rule's range and the rule as written.
type CIDRRule struct {
	Prefix netip.Prefix
	Rule   string
}

// PortView is what one project's rules allow on one destination port, in
// the grouping the builtin plane decides by (project → port → kind →
// names). Renderers of the policy for other data planes (Envoy) read it
// and never the config, so the planes cannot disagree on what a rule means.
type PortView struct {
	Port uint16
	// SNI are the names TLS connections may name on Port, sorted; a name
	// an https pattern covers is not here (an https rule takes a name
	// over from sni rules).
	SNI []NameRule
	// HTTPS are the patterns of https rules (TLS terminated, each request
	// decided by HTTPSRules) on Port, sorted, but those a deny pattern
	// covers.
	HTTPS []NameRule
	// HTTP are the Host names plain-HTTP requests may carry on Port, sorted.
	HTTP []NameRule
	// CIDRs are the ranges connections to Port may reach uninspected.
	CIDRs []CIDRRule
	// DenySNI and DenyHTTP are the deny rules' patterns that apply on Port,
	// sorted. SNI and HTTP hold no pattern a deny pattern of the same kind
	// covers (every name it matches is denied): a renderer where the most
	// specific pattern wins (Envoy's server-name and virtual-host matchers)
	// gives deny patterns a deny action and so denies exactly what the
	// builtin plane denies.
	DenySNI, DenyHTTP []NameRule
}

// Covers reports whether every name pattern b matches is matched by
// pattern a ("*" covers all; "*.x" covers "y.x" and "*.y.x"; a name covers
// itself).
func Covers(a, b string) bool {
	if a == b || a == "*" {
		return true
	}
	suffix, ok := strings.CutPrefix(a, "*.")
	if !ok || b == "*" {
		return false
	}
	return strings.HasSuffix(strings.TrimPrefix(b, "*."), "."+suffix)
}

// Inspect is what the builtin plane reads on this port before the name
// stage (InspectEither: the first byte tells TLS from HTTP).
func (v PortView) Inspect() Inspect {
	switch {
	case (len(v.SNI) > 0 || len(v.HTTPS) > 0) && len(v.HTTP) > 0:
		return InspectEither
	case len(v.SNI) > 0 || len(v.HTTPS) > 0:
		return InspectTLS
	case len(v.HTTP) > 0:
		return InspectHTTP
	}
	return InspectNone
}

// Ports returns, sorted by port, every port some rule of the project names,
// with what each kind of rule allows there. The result is a fresh copy.
func (pr *Project) Ports() []PortView {
	byPort := map[uint16]*PortView{}
	get := func(pt uint16) *PortView {
		if byPort[pt] == nil {
			byPort[pt] = &PortView{Port: pt}
		}
		return byPort[pt]
	}
	for _, k := range []struct {
		m   nameMatcher
		add func(*PortView, NameRule)
	}{
		{pr.sni, func(v *PortView, n NameRule) { v.SNI = append(v.SNI, n) }},
		{pr.http, func(v *PortView, n NameRule) { v.HTTP = append(v.HTTP, n) }},
		{pr.req.https, func(v *PortView, n NameRule) { v.HTTPS = append(v.HTTPS, n) }},
	} {
		k.m.each(func(pattern string, r portRule) {
			for _, pt := range r.ports {
				k.add(get(pt), NameRule{Pattern: pattern, Rule: r.rule})
			}
		})
	}
	for _, c := range pr.cidrs {
		for _, pt := range c.ports {
			v := get(pt)
			v.CIDRs = append(v.CIDRs, CIDRRule{Prefix: c.prefix, Rule: c.rule})
		}
	}
	out := make([]PortView, 0, len(byPort))
	for _, v := range byPort {
		v.DenySNI = denyOn(pr.denySNI, v.Port)
		v.DenyHTTP = denyOn(pr.denyHTTP, v.Port)
		v.HTTPS = uncovered(sortNames(v.HTTPS), v.DenySNI)
		v.SNI = uncovered(uncovered(sortNames(v.SNI), v.DenySNI), v.HTTPS)
		v.HTTP = uncovered(sortNames(v.HTTP), v.DenyHTTP)
		out = append(out, *v)
	}
	slices.SortFunc(out, func(a, b PortView) int { return int(a.Port) - int(b.Port) })
	return out
}

// denyOn lists the deny patterns of m that apply on port, sorted.
func denyOn(m nameMatcher, port uint16) []NameRule {
	var out []NameRule
	m.each(func(pattern string, r portRule) {
		if r.ports == nil || slices.Contains(r.ports, port) {
			out = append(out, NameRule{Pattern: pattern, Rule: r.rule})
		}
	})
	return sortNames(out)
}

// uncovered drops the allow patterns a deny pattern covers.
func uncovered(allow, deny []NameRule) []NameRule {
	return slices.DeleteFunc(allow, func(a NameRule) bool {
		return slices.ContainsFunc(deny, func(d NameRule) bool { return Covers(d.Pattern, a.Pattern) })
	})
}

// sortNames sorts by pattern and keeps the first rule of each pattern (the
// one the builtin matcher finds first).
func sortNames(ns []NameRule) []NameRule {
	slices.SortStableFunc(ns, func(a, b NameRule) int { return strings.Compare(a.Pattern, b.Pattern) })
	return slices.CompactFunc(ns, func(a, b NameRule) bool { return a.Pattern == b.Pattern })
}

// All returns every project, placed or not, sorted by name.
func (p *Policy) All() []*Project {
	out := make([]*Project, 0, len(p.byName))
	for _, pr := range p.byName {
		out = append(out, pr)
	}
	slices.SortFunc(out, func(a, b *Project) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Patterns are the patterns of ns, in order.
func Patterns(ns []NameRule) []string {
	out := make([]string, len(ns))
	for i, n := range ns {
		out[i] = n.Pattern
	}
	return out
}

// RequestRule is one https or http allow rule as compiled for deciding
// requests (DecideRequest), for renderers of other data planes.
type RequestRule struct {
	Pattern string
	Ports   []uint16
	// Methods and Paths restrict the requests the rule allows (empty: any);
	// a path ending in "*" is a prefix.
	Methods, Paths []string
	// Inject are the headers set on the requests the rule allows
	// (templates; ${secret:NAME} is expanded by the data plane).
	Inject []config.Header
	Rule   string
}

// HTTPSRules returns the project's https rules for name on port, in
// config order: DecideRequest's first rule that allows a request decides.
func (pr *Project) HTTPSRules(name string, port uint16) []RequestRule {
	return requestRulesFor(pr.req.tls, name, port)
}

// HTTPRules returns the project's http allow rules for name on port, in
// config order (a rule without methods, paths or inject allows any
// request and injects nothing).
func (pr *Project) HTTPRules(name string, port uint16) []RequestRule {
	return requestRulesFor(pr.req.http, name, port)
}

func requestRulesFor(rs []requestRule, name string, port uint16) []RequestRule {
	var out []RequestRule
	for _, r := range rs {
		if slices.Contains(r.ports, port) && nameMatches(r.pattern, name) {
			out = append(out, RequestRule{Pattern: r.pattern, Ports: slices.Clone(r.ports), Methods: slices.Clone(r.methods),
				Paths: slices.Clone(r.paths), Inject: slices.Clone(r.inject), Rule: r.rule})
		}
	}
	return out
}
