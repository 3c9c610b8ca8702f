// Package config loads and validates the vmegress config file.
//
// The file is YAML (see DESIGN.md "Contract"). Loading is strict: unknown keys,
// duplicate keys, bad addresses, subnets outside vm_cidr or overlapping, malformed
// names and out-of-range ports are all errors, and every error carries the
// file:line:col of the value it is about.
package config

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Defaults of the config contract (DESIGN.md). They are the spec's values where
// the spec has one (172.31.0.0/16, port 15001, fwmark 1, table 100).
const (
	DefaultPath       = "/etc/vmegress/config.yaml"
	DefaultStateDir   = "/var/lib/vmegress"
	DefaultTProxyPort = 15001
	DefaultDNSPort    = 15053
	// DefaultMark is the fwmark TPROXY puts on intercepted packets; the policy
	// routing rule sends packets with it to RouteTable (spec 6.4: fwmark 1).
	DefaultMark = 0x1
	// DefaultUpstreamMark is set with SO_MARK on the data plane's own upstream
	// sockets, so interception and policy routing never take them again.
	// It must differ from Mark: a socket carrying Mark would be routed to lo.
	DefaultUpstreamMark = 0x2
	// DefaultRouteTable holds `local 0.0.0.0/0 dev lo` (spec 6.4: table 100).
	DefaultRouteTable = 100
	DefaultAdmin      = "127.0.0.1:9901"
	// DefaultAPISocket is the local API's unix socket.
	DefaultAPISocket = "/run/vmegress/api.sock"
	// DefaultAPIGroup may call the API besides root (when the group exists).
	DefaultAPIGroup       = "vmegress"
	DefaultMaxConnections = 1024
	// DefaultDNSRateLimit is each project's DNS queries per second.
	DefaultDNSRateLimit = 200
	// SMTPPort is never opened by a name rule.
	SMTPPort = 25
)

// DefaultVMCIDR is the spec's guest range.
var DefaultVMCIDR = netip.MustParsePrefix("172.31.0.0/16")

// Position is where a value was found in the config file.
type Position struct {
	Line, Col int
}

// Config is a validated config file.
type Config struct {
	// Path is the file the config was read from ("" when built in code).
	Path            string
	VMCIDR          netip.Prefix
	GuestInterfaces []string
	Uplink          string
	Dataplane       string
	Firewall        string
	TProxyPort      uint16
	DNSPort         uint16
	Mark            uint32
	UpstreamMark    uint32
	RouteTable      uint32
	Admin           netip.AddrPort
	Upstream        string
	OnPolicyChange  string
	// APISocket is the local API's unix socket; APIGroup may call it.
	APISocket string
	APIGroup  string
	// AccessLog is a file for the access log ("": stdout).
	AccessLog string
	// SecretsDir holds the files `${secret:NAME}` reads (after
	// $CREDENTIALS_DIRECTORY); "" for none.
	SecretsDir string
	// UpstreamCAFile is a PEM bundle trusted for terminated (https rule)
	// upstream connections besides the host's roots; "" for none.
	UpstreamCAFile string
	EnvoyBinary    string
	DNSUpstreams   []netip.AddrPort
	// DNSRateLimit is each project's sustained queries per second (burst: twice).
	DNSRateLimit int
	// Projects in file order.
	Projects []Project
}

// Project is one project's policy: its /30 and its allowlist.
type Project struct {
	Name string
	// Subnet is the project's /30; invalid (zero) when `net up` allocates it.
	Subnet         netip.Prefix
	Mode           string
	MaxConnections int
	Allow          []Rule
	// Deny is evaluated before Allow: a connection or name a deny rule
	// matches is refused whatever Allow says.
	Deny []Rule
	Pos  Position
}

// RuleKind is what a rule matches on.
type RuleKind string

// Rule kinds of the config contract.
const (
	KindSNI  RuleKind = "sni"
	KindHTTP RuleKind = "http"
	KindCIDR RuleKind = "cidr"
	// KindTCP is a name on any TCP port, not inspected: a connection is
	// allowed to an address the resolver handed the project for a name the
	// rule matches.
	KindTCP RuleKind = "tcp"
	// KindHTTPS terminates TLS: the proxy answers the guest with a
	// certificate of vmegress's CA, checks every request against the rule's
	// methods and paths, adds its inject headers, and forwards it over TLS
	// verified against the host's roots (and upstream_ca_file).
	KindHTTPS RuleKind = "https"
)

// Header is one header an https or http rule sets on every request it
// allows; Value is a template that may reference ${secret:NAME} (never the
// secret's value itself).
type Header struct {
	Name, Value string
}

// AnyName is the sni or http pattern that matches every name.
const AnyName = "*"

// Rule is one allow or deny rule.
type Rule struct {
	Kind RuleKind
	// Name is the normalised name for sni/http/tcp rules: lower case, no
	// trailing dot, optionally starting with "*." (any depth of subdomain,
	// not the apex), or AnyName (sni and http only).
	Name string
	// Prefix is the destination range of a cidr rule.
	Prefix netip.Prefix
	// Ports the rule applies to. Empty in an allow rule means the kind's
	// default (443 for sni, 80 for http; always set for cidr and tcp); empty in a
	// deny rule means every port.
	Ports []uint16
	// Preset names the preset the rule came from ("" for a rule written
	// in the config itself).
	Preset string
	// Methods (upper case) and Paths (exact, or a prefix ending in "*")
	// restrict the requests an https or http rule allows (empty: any).
	Methods []string
	Paths   []string
	// Inject are the headers set on the requests the rule allows, sorted
	// by name; each replaces a header of the same name the guest sent.
	Inject []Header
	Pos    Position
}

// RequestRules reports whether the rule looks at requests (methods, paths
// or inject): an http rule with any, and every https rule.
func (r Rule) RequestRules() bool {
	return r.Kind == KindHTTPS || len(r.Methods) > 0 || len(r.Paths) > 0 || len(r.Inject) > 0
}

// EffectivePorts returns the ports the rule applies to, defaults applied.
func (r Rule) EffectivePorts() []uint16 {
	if len(r.Ports) > 0 {
		return r.Ports
	}
	switch r.Kind {
	case KindSNI, KindHTTPS:
		return []uint16{443}
	case KindHTTP:
		return []uint16{80}
	}
	return nil
}

// String renders the rule as it would be written in the config, for logs;
// a preset's rule is prefixed with "preset:NAME/".
func (r Rule) String() string {
	var b strings.Builder
	if r.Preset != "" {
		b.WriteString("preset:" + r.Preset + "/")
	}
	b.WriteString(string(r.Kind))
	b.WriteString(":")
	if r.Kind == KindCIDR {
		b.WriteString(r.Prefix.String())
	} else {
		b.WriteString(r.Name)
	}
	if len(r.Ports) > 0 {
		b.WriteString(" ports ")
		for i, p := range r.Ports {
			if i > 0 {
				b.WriteString(",")
			}
			b.WriteString(itoa(int(p)))
		}
	}
	if len(r.Methods) > 0 {
		b.WriteString(" methods " + strings.Join(r.Methods, ","))
	}
	if len(r.Paths) > 0 {
		b.WriteString(" paths " + strings.Join(r.Paths, ","))
	}
	if len(r.Inject) > 0 {
		// Header names only: values are templates, but short lines read better.
		names := make([]string, len(r.Inject))
		for i, h := range r.Inject {
			names[i] = h.Name
		}
		b.WriteString(" inject " + strings.Join(names, ","))
	}
	return b.String()
}

// Default returns a config with every default applied and no projects.
func Default() *Config {
	return &Config{
		VMCIDR:          DefaultVMCIDR,
		GuestInterfaces: []string{"tap-*"},
		Dataplane:       "builtin",
		Firewall:        "nftables",
		TProxyPort:      DefaultTProxyPort,
		DNSPort:         DefaultDNSPort,
		Mark:            DefaultMark,
		UpstreamMark:    DefaultUpstreamMark,
		RouteTable:      DefaultRouteTable,
		Admin:           netip.MustParseAddrPort(DefaultAdmin),
		APISocket:       DefaultAPISocket,
		APIGroup:        DefaultAPIGroup,
		Upstream:        "vetted",
		OnPolicyChange:  "drop",
		EnvoyBinary:     "envoy",
		DNSRateLimit:    DefaultDNSRateLimit,
	}
}

// Project returns the named project, or nil.
func (c *Config) Project(name string) *Project {
	for i := range c.Projects {
		if c.Projects[i].Name == name {
			return &c.Projects[i]
		}
	}
	return nil
}

// Same reports whether two rules are the same rule (positions aside).
func (r Rule) Same(o Rule) bool {
	return r.Kind == o.Kind && r.Name == o.Name && r.Prefix == o.Prefix && r.Preset == o.Preset && slices.Equal(r.Ports, o.Ports) &&
		slices.Equal(r.Methods, o.Methods) && slices.Equal(r.Paths, o.Paths) && slices.Equal(r.Inject, o.Inject)
}

// SameRules reports whether a and b list the same rules in the same order.
func SameRules(a, b []Rule) bool {
	return slices.EqualFunc(a, b, Rule.Same)
}

// AllowsAnyName reports whether an allow rule of the project is sni "*"
// or http "*": its resolver then answers every name (DNS exfiltration).
func (p *Project) AllowsAnyName() bool {
	for _, r := range p.Allow {
		if r.Name == AnyName {
			return true
		}
	}
	return false
}

// Warnings are what is valid in cfg but gives up a protection, one line
// each, for `policy check` and `doctor`.
func (c *Config) Warnings() []string {
	var out []string
	for _, p := range c.Projects {
		if p.AllowsAnyName() {
			out = append(out, fmt.Sprintf("project %q allows any name (sni or http \"*\"): its resolver forwards every name upstream, so a guest can send data out in DNS queries (DNS exfiltration); list names instead, or accept it", p.Name))
		}
		for _, r := range p.Allow {
			if r.Kind == KindHTTP && len(r.Inject) > 0 {
				out = append(out, fmt.Sprintf("project %q: rule %s (line %d) injects headers into plain HTTP: they cross the network unencrypted; use an https rule", p.Name, r, r.Pos.Line))
			}
			if r.Kind != KindHTTPS {
				continue
			}
			// A tcp rule for the same name and port is decided first, by
			// address, and never read: the https rule's methods and paths
			// do not hold for the connections it allows.
			for _, o := range p.Allow {
				if o.Kind == KindTCP && namesOverlap(o.Name, r.Name) && slices.ContainsFunc(o.EffectivePorts(), func(pt uint16) bool { return slices.Contains(r.EffectivePorts(), pt) }) {
					out = append(out, fmt.Sprintf("project %q: rule %s (line %d) lets the guest reach names of rule %s (line %d) unread, without its methods and paths", p.Name, o, o.Pos.Line, r, r.Pos.Line))
				}
			}
		}
	}
	return out
}

// namesOverlap reports whether some name matches both patterns (exact,
// "*." wildcards, "*").
func namesOverlap(a, b string) bool {
	if a == AnyName || b == AnyName || a == b {
		return true
	}
	sa, wa := strings.CutPrefix(a, "*.")
	sb, wb := strings.CutPrefix(b, "*.")
	switch {
	case wa && wb:
		return strings.HasSuffix(sa, "."+sb) || strings.HasSuffix(sb, "."+sa)
	case wa:
		return strings.HasSuffix(b, "."+sa)
	case wb:
		return strings.HasSuffix(a, "."+sb)
	}
	return false
}

// EnvoyIssue is something in a project that dataplane envoy cannot carry
// out as the builtin plane does; Rule is the rule at fault (nil: the
// project's mode).
type EnvoyIssue struct {
	Field string // "mode", "deny[2]"
	Rule  *Rule
	Msg   string
}

// envoyL7Why is why http rules with methods, paths or inject are
// builtin-only for now (README, "Current limits").
const envoyL7Why = "request rules (methods, paths, inject) on plain http are not yet rendered for Envoy"

// envoyWildcardHTTPSWhy is why an https rule for a wildcard is builtin-only.
const envoyWildcardHTTPSWhy = "Envoy shows a terminated guest certificates vmegress issued before the connection, one per name: a rule for \"*\" or \"*.domain\" allows names nobody can list in advance, and a wildcard certificate covers one label only; list the names as https rules"

// SecretNames lists the secrets the project's inject headers reference,
// each once, in rule order.
func (p Project) SecretNames() []string {
	var out []string
	for _, r := range p.Allow {
		for _, h := range r.Inject {
			for _, n := range secretRefs(h.Value) {
				if !slices.Contains(out, n) {
					out = append(out, n)
				}
			}
		}
	}
	return out
}

// EnvoyIssues lists what in p dataplane envoy refuses, each naming the
// rule, so the planes never differ silently: audit mode, tcp rules and
// cidr deny rules. (sni and http deny rules are rendered: deny actions in
// the server-name matcher, 403 virtual hosts.)
func (p Project) EnvoyIssues() []EnvoyIssue {
	var out []EnvoyIssue
	if p.Mode == "audit" {
		out = append(out, EnvoyIssue{Field: "mode", Msg: fmt.Sprintf("project %q: mode audit needs dataplane builtin", p.Name)})
	}
	for i := range p.Allow {
		// tcp rules are decided by the ruleset (the resolver's answers
		// become timed set elements), whichever the data plane.
		if r := &p.Allow[i]; r.Kind == KindHTTPS && (r.Name == AnyName || strings.HasPrefix(r.Name, "*.")) {
			out = append(out, EnvoyIssue{Field: fmt.Sprintf("allow[%d]", i), Rule: r, Msg: fmt.Sprintf("project %q: allow rule %s needs dataplane builtin (%s)", p.Name, r, envoyWildcardHTTPSWhy)})
		} else if r.Kind == KindHTTP && r.RequestRules() {
			out = append(out, EnvoyIssue{Field: fmt.Sprintf("allow[%d]", i), Rule: r, Msg: fmt.Sprintf("project %q: allow rule %s needs dataplane builtin (%s)", p.Name, r, envoyL7Why)})
		}
	}
	for i := range p.Deny {
		r := &p.Deny[i]
		var msg string
		switch r.Kind {
		case KindCIDR:
			msg = fmt.Sprintf("project %q: deny rule %s needs dataplane builtin (Envoy resolves names itself and cannot keep a project's denied ranges out of what it dials)", p.Name, r)
		default:
			continue // sni and http deny rules are rendered
		}
		out = append(out, EnvoyIssue{Field: fmt.Sprintf("deny[%d]", i), Rule: r, Msg: msg})
	}
	return out
}

// KernelMarkBit is the packet and conntrack mark bit of the flows the
// kernel forwards (firewall.KernelMark and KernelCTMark are this value):
// mark and upstream_mark must not have it.
const KernelMarkBit uint32 = 0x00400000
