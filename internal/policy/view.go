package policy

import (
	"net/netip"
	"slices"
	"strings"
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
	// SNI are the names TLS connections may name on Port, sorted.
	SNI []NameRule
	// HTTP are the Host names plain-HTTP requests may carry on Port, sorted.
	HTTP []NameRule
	// CIDRs are the ranges connections to Port may reach uninspected.
	CIDRs []CIDRRule
}

// Inspect is what the builtin plane reads on this port before the name
// stage (InspectEither: the first byte tells TLS from HTTP).
func (v PortView) Inspect() Inspect {
	switch {
	case len(v.SNI) > 0 && len(v.HTTP) > 0:
		return InspectEither
	case len(v.SNI) > 0:
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
	} {
		for _, names := range []struct {
			prefix string
			rules  map[string][]portRule
		}{{"", k.m.exact}, {"*.", k.m.wild}} {
			for name, rs := range names.rules {
				for _, r := range rs {
					for _, pt := range r.ports {
						k.add(get(pt), NameRule{Pattern: names.prefix + name, Rule: r.rule})
					}
				}
			}
		}
	}
	for _, c := range pr.cidrs {
		for _, pt := range c.ports {
			v := get(pt)
			v.CIDRs = append(v.CIDRs, CIDRRule{Prefix: c.prefix, Rule: c.rule})
		}
	}
	out := make([]PortView, 0, len(byPort))
	for _, v := range byPort {
		v.SNI = sortNames(v.SNI)
		v.HTTP = sortNames(v.HTTP)
		out = append(out, *v)
	}
	slices.SortFunc(out, func(a, b PortView) int { return int(a.Port) - int(b.Port) })
	return out
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
