// Package policy compiles the config's per-project allowlists into a matcher
// and decides, for one connection's facts, whether it may leave the host.
//
// Decide is pure: no I/O, no clock. The data planes gather the facts (source
// address, original destination, TLS server name) and act on the Decision.
package policy

import (
	"fmt"
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
	// Rule is the allow rule that matched, as written in the config ("" on deny).
	Rule string
	// Reason explains a denial in words an operator can act on.
	Reason string
}

// Facts are what the data plane knows about a connection when it decides.
type Facts struct {
	Src netip.Addr
	Dst netip.AddrPort
	// TLS is true when a complete TLS ClientHello was read.
	TLS bool
	// SNI is the ClientHello's server name ("" when absent).
	SNI string
}

// Policy is the compiled policy of every project. It is immutable; a reload
// compiles a new one.
type Policy struct {
	bySubnet map[netip.Prefix]*Project
}

// Project is one project's compiled allowlist.
type Project struct {
	Name   string
	Subnet netip.Prefix
	sni    nameMatcher
}

// Compile builds the matcher for every project of cfg that has a subnet.
func Compile(cfg *config.Config) (*Policy, error) {
	p := &Policy{bySubnet: map[netip.Prefix]*Project{}}
	for _, cp := range cfg.Projects {
		if !cp.Subnet.IsValid() {
			continue // not placed yet: no traffic can come from it
		}
		if cp.Subnet.Bits() != 30 {
			return nil, fmt.Errorf("compiling project %q: subnet %s is not a /30", cp.Name, cp.Subnet)
		}
		pr := &Project{Name: cp.Name, Subnet: cp.Subnet.Masked(), sni: newNameMatcher()}
		for _, r := range cp.Allow {
			switch r.Kind {
			case config.KindSNI:
				ports := r.Ports
				if len(ports) == 0 {
					ports = []uint16{443}
				}
				pr.sni.add(r.Name, ports, r.String())
			default:
				return nil, fmt.Errorf("compiling project %q: rule kind %q is not supported", cp.Name, r.Kind)
			}
		}
		if _, dup := p.bySubnet[pr.Subnet]; dup {
			return nil, fmt.Errorf("compiling project %q: subnet %s is used twice", cp.Name, cp.Subnet)
		}
		p.bySubnet[pr.Subnet] = pr
	}
	return p, nil
}

// ProjectFor returns the project whose /30 holds src, or nil.
func (p *Policy) ProjectFor(src netip.Addr) *Project {
	if !src.Is4() {
		src = src.Unmap()
		if !src.Is4() {
			return nil
		}
	}
	pf, _ := src.Prefix(30)
	return p.bySubnet[pf]
}

// Projects returns the compiled projects sorted by name.
func (p *Policy) Projects() []*Project {
	out := make([]*Project, 0, len(p.bySubnet))
	for _, pr := range p.bySubnet {
		out = append(out, pr)
	}
	slices.SortFunc(out, func(a, b *Project) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Decide returns the verdict for a connection with the given facts.
func (p *Policy) Decide(f Facts) Decision {
	pr := p.ProjectFor(f.Src)
	if pr == nil {
		return Decision{Verdict: Deny, Reason: "source address is in no project"}
	}
	d := Decision{Verdict: Deny, Project: pr.Name}
	switch {
	case !f.TLS:
		d.Reason = "not a TLS ClientHello"
	case f.SNI == "":
		d.Reason = "TLS ClientHello without a server name (SNI)"
	default:
		name, err := config.NormalizeName(f.SNI)
		if err != nil || strings.HasPrefix(name, "*.") {
			d.Reason = "server name is not a valid host name"
			return d
		}
		if rule, ok := pr.sni.match(name, f.Dst.Port()); ok {
			return Decision{Verdict: Allow, Project: pr.Name, Rule: rule}
		}
		d.Reason = fmt.Sprintf("no rule of project %s allows %s on port %d", pr.Name, name, f.Dst.Port())
	}
	return d
}

// nameMatcher finds the rule for a host name and port: exact names first,
// then the longest "*." suffix. Lookup is O(labels), whatever the rule count.
type nameMatcher struct {
	exact map[string][]portRule
	wild  map[string][]portRule // key: the suffix after "*."
}

type portRule struct {
	ports []uint16
	rule  string
}

func newNameMatcher() nameMatcher {
	return nameMatcher{exact: map[string][]portRule{}, wild: map[string][]portRule{}}
}

func (m nameMatcher) add(pattern string, ports []uint16, rule string) {
	if suffix, ok := strings.CutPrefix(pattern, "*."); ok {
		m.wild[suffix] = append(m.wild[suffix], portRule{ports, rule})
		return
	}
	m.exact[pattern] = append(m.exact[pattern], portRule{ports, rule})
}

func findPort(rs []portRule, port uint16) (string, bool) {
	for _, r := range rs {
		if slices.Contains(r.ports, port) {
			return r.rule, true
		}
	}
	return "", false
}

// match reports the rule allowing name (normalised) on port.
func (m nameMatcher) match(name string, port uint16) (string, bool) {
	if r, ok := findPort(m.exact[name], port); ok {
		return r, true
	}
	// "*.x.com" matches "a.x.com" and "a.b.x.com" but not "x.com": try every
	// proper suffix, longest first.
	for rest := name; ; {
		i := strings.IndexByte(rest, '.')
		if i < 0 {
			return "", false
		}
		rest = rest[i+1:]
		if r, ok := findPort(m.wild[rest], port); ok {
			return r, true
		}
	}
}
