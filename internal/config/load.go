package config

import (
	"errors"
	"fmt"
	"net/netip"
	"net/textproto"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/vmegress/vmegress/internal/secrets"
)

// Issue is one thing wrong with a config file, at a position.
type Issue struct {
	Pos Position
	Msg string
	// Field is the path of the value in the document ("allow[2].ports[0]"),
	// set for policies parsed with ParsePolicy.
	Field string
	node  *yaml.Node
}

// Error is an invalid config: every issue found, each with its position.
type Error struct {
	File   string
	Issues []Issue
}

func (e *Error) Error() string {
	lines := make([]string, len(e.Issues))
	for i, is := range e.Issues {
		lines[i] = fmt.Sprintf("%s:%d:%d: %s", e.File, is.Pos.Line, is.Pos.Col, is.Msg)
	}
	return strings.Join(lines, "\n")
}

// IsInvalid reports whether err is (or wraps) an invalid-config error.
func IsInvalid(err error) bool {
	var ce *Error
	return errors.As(err, &ce)
}

// Load reads and validates the config file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	return Parse(path, data)
}

var yamlLineRE = regexp.MustCompile(`line (\d+)(?:, column (\d+))?: (.*)`)

// Parse validates data as the config file named file (used in messages).
func Parse(file string, data []byte) (*Config, error) {
	if file == "" {
		file = "<config>"
	}
	p := &parser{file: file, cfg: Default()}
	p.cfg.Path = file
	if abs, err := filepath.Abs(file); err == nil && file != "<config>" {
		p.cfg.Path = abs
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		msg := strings.TrimPrefix(err.Error(), "yaml: ")
		pos := Position{Line: 1, Col: 1}
		if m := yamlLineRE.FindStringSubmatch(msg); m != nil {
			pos.Line, _ = strconv.Atoi(m[1])
			if m[2] != "" {
				pos.Col, _ = strconv.Atoi(m[2])
			}
			msg = m[3]
		}
		return nil, &Error{File: file, Issues: []Issue{{Pos: pos, Msg: "invalid YAML: " + msg}}}
	}
	if len(doc.Content) == 0 {
		return nil, &Error{File: file, Issues: []Issue{{Pos: Position{1, 1}, Msg: "config is empty"}}}
	}
	p.top(doc.Content[0])
	p.crossCheck()
	if len(p.issues) > 0 {
		return nil, &Error{File: file, Issues: p.issues}
	}
	return p.cfg, nil
}

// ParseNode validates root, a YAML mapping read elsewhere (an expectation
// file's inline projects), as the config file named file; positions are
// root's own.
func ParseNode(file string, root *yaml.Node) (*Config, error) {
	p := &parser{file: file, cfg: Default()}
	p.cfg.Path = file
	p.top(root)
	p.crossCheck()
	if len(p.issues) > 0 {
		return nil, &Error{File: file, Issues: p.issues}
	}
	return p.cfg, nil
}

type parser struct {
	file      string
	cfg       *Config
	issues    []Issue
	subnetPos []subnetAt
	keys      map[string]Position // top-level key -> position of its value
}

func pos(n *yaml.Node) Position { return Position{Line: n.Line, Col: n.Column} }

func (p *parser) errf(n *yaml.Node, format string, args ...any) {
	p.issues = append(p.issues, Issue{Pos: pos(n), Msg: fmt.Sprintf(format, args...), node: n})
}

// mapping walks a YAML mapping, rejecting duplicates and keys not in fields.
func (p *parser) mapping(n *yaml.Node, what string, fields map[string]func(*yaml.Node)) {
	if n.Kind != yaml.MappingNode {
		p.errf(n, "%s must be a mapping", what)
		return
	}
	seen := map[string]bool{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if seen[k.Value] {
			p.errf(k, "duplicate key %q in %s", k.Value, what)
			continue
		}
		seen[k.Value] = true
		f, ok := fields[k.Value]
		if !ok {
			p.errf(k, "unknown key %q in %s", k.Value, what)
			continue
		}
		f(v)
	}
}

func (p *parser) scalar(n *yaml.Node, key string) (string, bool) {
	if n.Kind != yaml.ScalarNode || n.Tag == "!!null" {
		p.errf(n, "%s must be a single value", key)
		return "", false
	}
	return n.Value, true
}

func (p *parser) str(key string, dst *string, allowed ...string) func(*yaml.Node) {
	return func(n *yaml.Node) {
		s, ok := p.scalar(n, key)
		if !ok {
			return
		}
		if len(allowed) > 0 && !contains(allowed, s) {
			p.errf(n, "%s must be one of %s, not %q", key, strings.Join(allowed, ", "), s)
			return
		}
		*dst = s
	}
}

func (p *parser) port(key string, dst *uint16) func(*yaml.Node) {
	return func(n *yaml.Node) {
		if v, ok := p.portValue(n, key); ok {
			*dst = v
		}
	}
}

func (p *parser) portValue(n *yaml.Node, key string) (uint16, bool) {
	s, ok := p.scalar(n, key)
	if !ok {
		return 0, false
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil || v < 1 || v > 65535 {
		p.errf(n, "%s: port %q out of range (1-65535)", key, s)
		return 0, false
	}
	return uint16(v), true
}

func (p *parser) uint32v(key string, dst *uint32, min uint64) func(*yaml.Node) {
	return func(n *yaml.Node) {
		s, ok := p.scalar(n, key)
		if !ok {
			return
		}
		v, err := strconv.ParseUint(s, 0, 32)
		if err != nil || v < min {
			p.errf(n, "%s: %q is not a number from %d to 4294967295", key, s, min)
			return
		}
		*dst = uint32(v)
	}
}

func (p *parser) list(n *yaml.Node, key string, each func(*yaml.Node)) {
	if n.Kind != yaml.SequenceNode {
		p.errf(n, "%s must be a list", key)
		return
	}
	for _, c := range n.Content {
		each(c)
	}
}

func (p *parser) top(n *yaml.Node) {
	c := p.cfg
	p.keys = map[string]Position{}
	if n.Kind == yaml.MappingNode {
		for i := 0; i+1 < len(n.Content); i += 2 {
			p.keys[n.Content[i].Value] = pos(n.Content[i+1])
		}
	}
	p.mapping(n, "config", map[string]func(*yaml.Node){
		"vm_cidr": func(v *yaml.Node) {
			if pr, ok := p.prefix(v, "vm_cidr"); ok {
				if pr.Bits() > 30 {
					p.errf(v, "vm_cidr %s is too small to hold a /30", pr)
					return
				}
				c.VMCIDR = pr
			}
		},
		"guest_interfaces": func(v *yaml.Node) {
			c.GuestInterfaces = nil
			p.list(v, "guest_interfaces", func(e *yaml.Node) {
				s, ok := p.scalar(e, "guest_interfaces entry")
				if !ok {
					return
				}
				if !validIfacePattern(s) {
					p.errf(e, "guest_interfaces: %q is not an interface name or a name ending in * (at most 15 characters of letters, digits, '-', '_', '.')", s)
					return
				}
				c.GuestInterfaces = append(c.GuestInterfaces, s)
			})
			if len(c.GuestInterfaces) == 0 && len(p.issues) == 0 {
				p.errf(v, "guest_interfaces must name at least one interface pattern")
			}
		},
		"uplink": func(v *yaml.Node) {
			if s, ok := p.scalar(v, "uplink"); ok {
				if !validIfacePattern(s) || strings.HasSuffix(s, "*") {
					p.errf(v, "uplink: %q is not an interface name", s)
					return
				}
				c.Uplink = s
			}
		},
		"dataplane":   p.str("dataplane", &c.Dataplane, "builtin", "envoy"),
		"firewall":    p.str("firewall", &c.Firewall, "nftables", "iptables"),
		"tproxy_port": p.port("tproxy_port", &c.TProxyPort),
		"dns_port":    p.port("dns_port", &c.DNSPort),
		// A zero mark would match every unmarked packet.
		"mark":          p.uint32v("mark", &c.Mark, 1),
		"upstream_mark": p.uint32v("upstream_mark", &c.UpstreamMark, 1),
		"route_table":   p.uint32v("route_table", &c.RouteTable, 1),
		"admin": func(v *yaml.Node) {
			s, ok := p.scalar(v, "admin")
			if !ok {
				return
			}
			ap, err := netip.ParseAddrPort(s)
			if err != nil || ap.Port() == 0 {
				p.errf(v, "admin: %q is not an IP:port address", s)
				return
			}
			c.Admin = ap
		},
		"upstream":         p.str("upstream", &c.Upstream, "vetted", "original_dst"),
		"on_policy_change": p.str("on_policy_change", &c.OnPolicyChange, "drop", "keep"),
		"access_log": func(v *yaml.Node) {
			if s, ok := p.scalar(v, "access_log"); ok {
				if !filepath.IsAbs(s) {
					p.errf(v, "access_log: %q must be an absolute path", s)
					return
				}
				c.AccessLog = s
			}
		},
		"api_socket": func(v *yaml.Node) {
			if s, ok := p.scalar(v, "api_socket"); ok {
				if !filepath.IsAbs(s) {
					p.errf(v, "api_socket: %q must be an absolute path", s)
					return
				}
				c.APISocket = s
			}
		},
		"api_group": p.str("api_group", &c.APIGroup),
		"secrets_dir": func(v *yaml.Node) {
			if s, ok := p.scalar(v, "secrets_dir"); ok {
				if !filepath.IsAbs(s) {
					p.errf(v, "secrets_dir: %q must be an absolute path", s)
					return
				}
				c.SecretsDir = filepath.Clean(s)
			}
		},
		"upstream_ca_file": func(v *yaml.Node) {
			if s, ok := p.scalar(v, "upstream_ca_file"); ok {
				if !filepath.IsAbs(s) {
					p.errf(v, "upstream_ca_file: %q must be an absolute path", s)
					return
				}
				c.UpstreamCAFile = filepath.Clean(s)
			}
		},
		"envoy": func(v *yaml.Node) {
			p.mapping(v, "envoy", map[string]func(*yaml.Node){
				"binary": p.str("envoy.binary", &c.EnvoyBinary),
			})
		},
		"dns": func(v *yaml.Node) {
			p.mapping(v, "dns", map[string]func(*yaml.Node){
				"rate_limit": func(n *yaml.Node) {
					s, ok := p.scalar(n, "dns.rate_limit")
					if !ok {
						return
					}
					r, err := strconv.Atoi(s)
					if err != nil || r < 1 || r > 10000000 {
						p.errf(n, "dns.rate_limit: %q is not a number of queries per second from 1 to 10000000", s)
						return
					}
					c.DNSRateLimit = r
				},
				"upstreams": func(l *yaml.Node) {
					p.list(l, "dns.upstreams", func(e *yaml.Node) {
						s, ok := p.scalar(e, "dns.upstreams entry")
						if !ok {
							return
						}
						ap, err := netip.ParseAddrPort(s)
						if err != nil {
							if a, err2 := netip.ParseAddr(s); err2 == nil {
								ap, err = netip.AddrPortFrom(a, 53), nil
							}
						}
						if err != nil || ap.Port() == 0 {
							p.errf(e, "dns.upstreams: %q is not an IP or IP:port", s)
							return
						}
						c.DNSUpstreams = append(c.DNSUpstreams, ap)
					})
				},
			})
		},
		"projects": func(v *yaml.Node) {
			if v.Kind != yaml.MappingNode {
				p.errf(v, "projects must be a mapping of project name to project")
				return
			}
			seen := map[string]bool{}
			for i := 0; i+1 < len(v.Content); i += 2 {
				k, pv := v.Content[i], v.Content[i+1]
				if seen[k.Value] {
					p.errf(k, "duplicate project %q", k.Value)
					continue
				}
				seen[k.Value] = true
				p.project(k, pv)
			}
		},
	})
}

func (p *parser) project(k, v *yaml.Node) {
	pr := Project{Name: k.Value, Mode: "enforce", MaxConnections: DefaultMaxConnections, Pos: pos(k)}
	if !projectNameRE.MatchString(k.Value) {
		p.errf(k, "project name %q must be %s", k.Value, ProjectNameRule)
	}
	what := fmt.Sprintf("project %q", k.Value)
	p.mapping(v, what, map[string]func(*yaml.Node){
		"subnet": func(n *yaml.Node) {
			s, ok := p.prefix(n, "subnet")
			if !ok {
				return
			}
			if s.Bits() != 30 {
				p.errf(n, "subnet %s must be a /30", s)
				return
			}
			pr.Subnet = s
			// Checked against vm_cidr in crossCheck, once vm_cidr is known.
			p.subnetPos = append(p.subnetPos, subnetAt{k.Value, s, pos(n)})
		},
		"mode": p.str("mode", &pr.Mode, "enforce", "audit"),
		"max_connections": func(n *yaml.Node) {
			s, ok := p.scalar(n, "max_connections")
			if !ok {
				return
			}
			m, err := strconv.Atoi(s)
			if err != nil || m < 1 || m > 1<<20 {
				p.errf(n, "max_connections: %q is not a number from 1 to %d", s, 1<<20)
				return
			}
			pr.MaxConnections = m
		},
		"allow": func(n *yaml.Node) {
			if n.Tag == "!!null" {
				return // "allow:" with nothing: allows nothing
			}
			p.list(n, "allow", func(e *yaml.Node) {
				pr.Allow = append(pr.Allow, p.entry(e, listAllow)...)
			})
		},
		"deny": func(n *yaml.Node) {
			if n.Tag == "!!null" {
				return // "deny:" with nothing: denies nothing
			}
			p.list(n, "deny", func(e *yaml.Node) {
				pr.Deny = append(pr.Deny, p.entry(e, listDeny)...)
			})
		},
	})
	p.cfg.Projects = append(p.cfg.Projects, pr)
}

type subnetAt struct {
	project string
	subnet  netip.Prefix
	pos     Position
}

// Which list a rule is in: allow and deny differ in what ports mean when
// none are given (the kind's default, every port) and in the port 25 check.
const (
	listAllow = "allow"
	listDeny  = "deny"
)

// entry parses one entry of an allow or deny list: a rule, or a preset
// expanded to its rules (each validated as if written here).
func (p *parser) entry(n *yaml.Node, list string) []Rule {
	if n.Kind == yaml.MappingNode {
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == "preset" {
				return p.preset(n, list)
			}
		}
	}
	if r, ok := p.rule(n, list); ok {
		return []Rule{r}
	}
	return nil
}

// preset expands a {preset: NAME} entry.
func (p *parser) preset(n *yaml.Node, list string) []Rule {
	var name string
	var nameNode *yaml.Node
	p.mapping(n, list+" entry", map[string]func(*yaml.Node){
		"preset": func(v *yaml.Node) {
			if s, ok := p.scalar(v, "preset"); ok {
				name, nameNode = s, v
			}
		},
	})
	if nameNode == nil {
		return nil
	}
	pre, ok := LookupPreset(name)
	if !ok {
		p.errf(nameNode, "preset %q does not exist (vmegress policy presets lists them: %s)", name, strings.Join(PresetNames(), ", "))
		return nil
	}
	rules, err := pre.Rules(list)
	if err != nil {
		p.errf(nameNode, "preset %q: %v", name, err)
		return nil
	}
	for i := range rules {
		rules[i].Pos = pos(n)
	}
	return rules
}

func (p *parser) rule(n *yaml.Node, list string) (Rule, bool) {
	r := Rule{Pos: pos(n)}
	if n.Kind != yaml.MappingNode {
		p.errf(n, "%s entry must be a mapping such as {sni: example.com}", list)
		return r, false
	}
	before := len(p.issues)
	var kindNode *yaml.Node
	var reqNode *yaml.Node // the first of methods, paths, inject
	setKind := func(kind RuleKind) func(*yaml.Node) {
		return func(v *yaml.Node) {
			if kindNode != nil {
				p.errf(v, "%s entry has both %s and %s; use one rule kind per entry", list, r.Kind, kind)
				return
			}
			kindNode, r.Kind = v, kind
			s, ok := p.scalar(v, string(kind))
			if !ok {
				return
			}
			switch kind {
			case KindSNI, KindHTTP, KindTCP, KindHTTPS:
				if s == AnyName && kind == KindTCP {
					p.errf(v, "tcp: %q is not allowed: a tcp rule names a name or a *. wildcard (use a cidr rule for addresses)", s)
					return
				}
				if s == AnyName && kind == KindHTTPS {
					p.errf(v, "https: %q is not allowed: a terminating rule names a name or a *. wildcard", s)
					return
				}
				if s == AnyName {
					r.Name = AnyName
					return
				}
				name, err := NormalizeName(s)
				if err != nil {
					p.errf(v, "%s: %v", kind, err)
					return
				}
				r.Name = name
			case KindCIDR:
				pf, err := netip.ParsePrefix(s)
				if err != nil {
					a, err2 := netip.ParseAddr(s)
					if err2 != nil {
						p.errf(v, "cidr: %q is not an IP prefix such as 198.51.100.0/24", s)
						return
					}
					pf = netip.PrefixFrom(a, a.BitLen())
				}
				if pf != pf.Masked() {
					p.errf(v, "cidr: %s has host bits set; did you mean %s?", pf, pf.Masked())
					return
				}
				r.Prefix = pf
			}
		}
	}
	p.mapping(n, list+" entry", map[string]func(*yaml.Node){
		"sni":   setKind(KindSNI),
		"http":  setKind(KindHTTP),
		"cidr":  setKind(KindCIDR),
		"tcp":   setKind(KindTCP),
		"https": setKind(KindHTTPS),
		"methods": func(v *yaml.Node) {
			reqNode = firstNode(reqNode, v)
			r.Methods = p.methods(v)
		},
		"paths": func(v *yaml.Node) {
			reqNode = firstNode(reqNode, v)
			r.Paths = p.paths(v)
		},
		"inject": func(v *yaml.Node) {
			reqNode = firstNode(reqNode, v)
			r.Inject = p.inject(v)
		},
		"ports": func(v *yaml.Node) {
			p.list(v, "ports", func(e *yaml.Node) {
				if pt, ok := p.portValue(e, "ports"); ok {
					r.Ports = append(r.Ports, pt)
				}
			})
			if v.Kind == yaml.SequenceNode && len(v.Content) == 0 {
				p.errf(v, "ports must list at least one port")
			}
		},
	})
	if len(p.issues) > before {
		return r, false
	}
	switch {
	case kindNode == nil:
		kinds := "sni, http, https, tcp, cidr or preset"
		if list == listDeny {
			kinds = "sni, http, tcp, cidr or preset"
		}
		p.errf(n, "%s entry needs one of %s", list, kinds)
		return r, false
	case reqNode != nil && r.Kind != KindHTTP && r.Kind != KindHTTPS:
		p.errf(reqNode, "rule %s: methods, paths and inject are only for https and http rules (a %s rule does not read requests)", r, r.Kind)
		return r, false
	case list == listDeny && r.Kind == KindHTTPS:
		p.errf(kindNode, "deny rule https: %s: https is an allow rule kind; deny the name with an sni rule", r.Name)
		return r, false
	case list == listDeny && reqNode != nil:
		p.errf(reqNode, "deny rule %s: methods, paths and inject are only for allow rules (an allow rule's methods and paths already refuse every other request)", r)
		return r, false
	case list == listDeny:
		return r, true // no ports: every port; any port may be denied
	case r.Kind == KindCIDR && len(r.Ports) == 0:
		p.errf(kindNode, "cidr rule %s needs ports (a cidr rule is not inspected, so it must say where it applies)", r.Prefix)
		return r, false
	case r.Kind == KindTCP && len(r.Ports) == 0:
		p.errf(kindNode, "tcp rule %s needs ports (a tcp rule is not inspected, so it must say where it applies)", r.Name)
		return r, false
	case r.Kind != KindCIDR && slices.Contains(r.Ports, SMTPPort):
		// Mail from sandboxes is spam waiting to happen: only an explicit
		// address range may open it.
		p.errf(kindNode, "%s rule %s: port 25 (SMTP) is never allowed by a name rule; use a cidr rule for a known mail relay", r.Kind, r.Name)
		return r, false
	}
	return r, true
}

func firstNode(have, n *yaml.Node) *yaml.Node {
	if have != nil {
		return have
	}
	return n
}

// methodRE is an HTTP method as rules name it: upper-case letters.
var methodRE = regexp.MustCompile(`^[A-Z]{1,20}$`)

// methods parses a rule's methods: upper-case HTTP methods, never CONNECT.
func (p *parser) methods(v *yaml.Node) []string {
	var out []string
	p.list(v, "methods", func(e *yaml.Node) {
		s, ok := p.scalar(e, "methods entry")
		if !ok {
			return
		}
		m := strings.ToUpper(s)
		switch {
		case !methodRE.MatchString(m):
			p.errf(e, "methods: %q is not an HTTP method such as GET or POST", s)
		case m == "CONNECT":
			p.errf(e, "methods: CONNECT is never forwarded to an origin server")
		case !slices.Contains(out, m):
			out = append(out, m)
		}
	})
	if v.Kind == yaml.SequenceNode && len(v.Content) == 0 {
		p.errf(v, "methods must list at least one method (leave it out to allow any)")
	}
	return out
}

// paths parses a rule's paths; see ValidPath.
func (p *parser) paths(v *yaml.Node) []string {
	var out []string
	p.list(v, "paths", func(e *yaml.Node) {
		s, ok := p.scalar(e, "paths entry")
		if !ok {
			return
		}
		if err := ValidPath(s); err != nil {
			p.errf(e, "paths: %v", err)
			return
		}
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	})
	if v.Kind == yaml.SequenceNode && len(v.Content) == 0 {
		p.errf(v, "paths must list at least one path (leave it out to allow any)")
	}
	return out
}

// ValidPath checks a rule's path pattern: it starts with "/", is an exact
// path or a prefix ending in "*" (the only '*'), and has no query,
// fragment, percent-escape, backslash, space, control byte or "." / ".."
// segment: a pattern names decoded, normalised paths, the only ones a
// request's path is matched as.
func ValidPath(s string) error {
	if !strings.HasPrefix(s, "/") {
		return fmt.Errorf("%q must start with /", s)
	}
	body := strings.TrimSuffix(s, "*")
	if strings.Contains(body, "*") {
		return fmt.Errorf("%q: * is only allowed at the end (a prefix such as /v1/*)", s)
	}
	for i := 0; i < len(body); i++ {
		if c := body[i]; c <= ' ' || c >= 0x7f || strings.IndexByte(`?#%\`, c) >= 0 {
			return fmt.Errorf("%q: byte %q is not allowed in a path pattern (no query, fragment, escapes, backslash or spaces)", s, c)
		}
	}
	for _, seg := range strings.Split(body, "/") {
		if seg == "." || seg == ".." {
			return fmt.Errorf("%q has a %q segment", s, seg)
		}
	}
	return nil
}

// headerNameRE is an HTTP field name (RFC 9110 5.1 token).
var headerNameRE = regexp.MustCompile("^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")

// framingHeaders are never set by inject: they frame or route the request
// or the connection, which vmegress does.
var framingHeaders = []string{"Host", "Content-Length", "Transfer-Encoding", "Connection", "Upgrade", "Te", "Trailer", "Keep-Alive", "Proxy-Connection"}

// inject parses a rule's inject mapping, sorted by header name.
func (p *parser) inject(v *yaml.Node) []Header {
	if v.Kind != yaml.MappingNode {
		p.errf(v, "inject must be a mapping of header name to value")
		return nil
	}
	var out []Header
	for i := 0; i+1 < len(v.Content); i += 2 {
		k, val := v.Content[i], v.Content[i+1]
		if !headerNameRE.MatchString(k.Value) {
			p.errf(k, "inject: %q is not a header name", k.Value)
			continue
		}
		name := textproto.CanonicalMIMEHeaderKey(k.Value)
		if slices.Contains(framingHeaders, name) {
			p.errf(k, "inject: header %s is never set by a rule (it frames or routes the request)", name)
			continue
		}
		if slices.ContainsFunc(out, func(h Header) bool { return h.Name == name }) {
			p.errf(k, "inject: header %s is set twice", name)
			continue
		}
		s, ok := p.scalar(val, "inject value")
		if !ok {
			continue
		}
		if _, err := secrets.Parse(s); err != nil {
			p.errf(val, "inject %s: %v", name, err)
			continue
		}
		out = append(out, Header{Name: name, Value: s})
	}
	if len(v.Content) == 0 {
		p.errf(v, "inject must set at least one header")
	}
	slices.SortFunc(out, func(a, b Header) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// secretRefs returns the secret names a valid inject value references.
func secretRefs(value string) []string {
	t, err := secrets.Parse(value)
	if err != nil {
		return nil
	}
	return t.Names()
}

func (p *parser) prefix(n *yaml.Node, key string) (netip.Prefix, bool) {
	s, ok := p.scalar(n, key)
	if !ok {
		return netip.Prefix{}, false
	}
	pf, err := netip.ParsePrefix(s)
	if err != nil || !pf.Addr().Is4() {
		p.errf(n, "%s: %q is not an IPv4 CIDR such as 172.31.0.0/16", key, s)
		return netip.Prefix{}, false
	}
	if pf != pf.Masked() {
		p.errf(n, "%s: %s has host bits set; did you mean %s?", key, pf, pf.Masked())
		return netip.Prefix{}, false
	}
	return pf, true
}

// crossCheck validates what depends on more than one key.
func (p *parser) crossCheck() {
	c := p.cfg
	if c.Dataplane == "envoy" {
		for _, pr := range c.Projects {
			for _, is := range pr.EnvoyIssues() {
				at := pr.Pos
				if is.Rule != nil {
					at = is.Rule.Pos
				}
				p.issues = append(p.issues, Issue{Pos: at, Msg: is.Msg})
			}
		}
		if c.Upstream == "original_dst" {
			p.issues = append(p.issues, Issue{Pos: p.keyPos("upstream"), Msg: "upstream original_dst is not available with dataplane envoy (it always resolves names itself)"})
		}
	}
	if c.TProxyPort == c.DNSPort {
		p.issues = append(p.issues, Issue{Pos: p.keyPos("dns_port"), Msg: fmt.Sprintf("dns_port %d is the same as tproxy_port", c.DNSPort)})
	}
	if c.Mark == c.UpstreamMark {
		key := "upstream_mark"
		if _, ok := p.keys[key]; !ok {
			key = "mark"
		}
		p.issues = append(p.issues, Issue{Pos: p.keyPos(key), Msg: fmt.Sprintf("upstream_mark %#x is the same as mark; the proxy's own sockets would be routed back to it", c.Mark)})
	}
	// The ruleset marks the packets it lets the kernel forward with this
	// bit (firewall.KernelMark; config cannot import firewall) and the
	// routing lock routes them: a mark with the bit would unlock them.
	for _, k := range []struct {
		key string
		v   uint32
	}{{"mark", c.Mark}, {"upstream_mark", c.UpstreamMark}} {
		if k.v&KernelMarkBit != 0 {
			p.issues = append(p.issues, Issue{Pos: p.keyPos(k.key), Msg: fmt.Sprintf("%s %#x has bit %#x set, which vmegress uses for the flows the kernel forwards; pick another", k.key, k.v, KernelMarkBit)})
		}
	}
	switch c.RouteTable {
	case 253, 254, 255: // default, main, local
		p.issues = append(p.issues, Issue{Pos: p.keyPos("route_table"), Msg: fmt.Sprintf("route_table %d is a table the kernel uses (default, main or local); pick another", c.RouteTable)})
	}
	// Subnets are /30s (checked when parsed): two overlap only when equal,
	// so a map finds it in linear time, however many projects there are.
	first := make(map[netip.Prefix]subnetAt, len(p.subnetPos))
	for _, a := range p.subnetPos {
		if !c.VMCIDR.Contains(a.subnet.Addr()) || a.subnet.Bits() < c.VMCIDR.Bits() {
			p.issues = append(p.issues, Issue{Pos: a.pos, Msg: fmt.Sprintf("subnet %s of project %q is outside vm_cidr %s", a.subnet, a.project, c.VMCIDR)})
		}
		if b, dup := first[a.subnet.Masked()]; dup {
			p.issues = append(p.issues, Issue{Pos: a.pos, Msg: fmt.Sprintf("subnet %s of project %q overlaps project %q (line %d)", a.subnet, a.project, b.project, b.pos.Line)})
			continue
		}
		first[a.subnet.Masked()] = a
	}
}

// keyPos finds where a top-level key was written, for cross-key errors.
func (p *parser) keyPos(key string) Position {
	if pos, ok := p.keys[key]; ok {
		return pos
	}
	return Position{1, 1}
}

var ifacePatternRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}\*?$|^\*$`)

func validIfacePattern(s string) bool {
	return len(s) <= 15 && ifacePatternRE.MatchString(s) && s != "*"
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func itoa(i int) string { return strconv.Itoa(i) }
