// Package policytest runs policy expectation files (`vmegress policy test`)
// and compares two configs (`vmegress policy diff`). Every verdict comes
// from the compiled policy the data planes use: policy.Explain for a
// connection, the project's Resolve (the resolver's decision) for a name.
//
// An expectation file:
//
//	config: ../config.yaml        # relative to this file; or inline projects:
//	expect:
//	  - {project: alpha, connect: "github.com:443", verdict: allow}
//	  - {project: alpha, connect: "198.51.100.7:5432", verdict: allow}
//	  - {project: alpha, connect: "example.com:80", as: http, verdict: deny}
//	  - {project: alpha, resolve: pypi.org, verdict: allow}
package policytest

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/policy"
)

// Expectation is one line of an expectation file.
type Expectation struct {
	Project string `json:"project"`
	// Connect is "HOST:PORT" (a name or an IPv4 address); Resolve is a name.
	// Exactly one is set.
	Connect string `json:"connect,omitempty"`
	Resolve string `json:"resolve,omitempty"`
	// Addr is the destination address of a connection by name (optional:
	// without it no cidr rule can match).
	Addr string `json:"addr,omitempty"`
	// As is what the client sends first (tls, http, raw, none); default:
	// tls for a name unless only http rules apply on the port, none for an
	// address.
	As      string `json:"as,omitempty"`
	Verdict string `json:"verdict"`
	// Line is where the expectation is in its file.
	Line int `json:"line"`
}

// What describes the expectation's check ("connect github.com:443 as tls").
func (x Expectation) What() string {
	if x.Resolve != "" {
		return "resolve " + x.Resolve
	}
	s := "connect " + x.Connect
	if x.Addr != "" {
		s += " at " + x.Addr
	}
	if x.As != "" {
		s += " as " + x.As
	}
	return s
}

// File is a parsed expectation file.
type File struct {
	Path string
	// Config is the policy the expectations are checked against (nil when
	// the file names neither config nor projects: diff supplies one).
	Config *config.Config
	Expect []Expectation
}

// Load reads an expectation file and the config it names (a path
// relative to the file) or holds inline (projects:).
func Load(path string) (*File, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading expectations: %w", err)
	}
	return Parse(path, data)
}

// Parse reads an expectation file's data (path names it in messages and
// anchors a relative config path).
func Parse(path string, data []byte) (*File, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("%s: invalid YAML: %w", path, err)
	}
	if len(doc.Content) == 0 || doc.Content[0].Kind != yaml.MappingNode {
		return nil, fmt.Errorf("%s:1:1: an expectation file is a mapping with the keys expect, and config or projects", path)
	}
	root := doc.Content[0]
	f := &File{Path: path}
	var cfgPath string
	var projects *yaml.Node
	var errs []error
	bad := func(n *yaml.Node, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s:%d:%d: %s", path, n.Line, n.Column, fmt.Sprintf(format, args...)))
	}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		switch k.Value {
		case "config":
			cfgPath = v.Value
			if !filepath.IsAbs(cfgPath) {
				cfgPath = filepath.Join(filepath.Dir(path), cfgPath)
			}
		case "projects":
			projects = root // the config parser reads the projects key itself
		case "expect":
			if v.Kind != yaml.SequenceNode {
				bad(v, "expect must be a list")
				continue
			}
			for _, e := range v.Content {
				x, err := expectation(e)
				if err != nil {
					bad(e, "%v", err)
					continue
				}
				f.Expect = append(f.Expect, x)
			}
		default:
			bad(k, "unknown key %q (want config, projects, expect)", k.Value)
		}
	}
	if len(f.Expect) == 0 && len(errs) == 0 {
		bad(root, "no expectations (expect: is missing or empty)")
	}
	switch {
	case cfgPath != "" && projects != nil:
		bad(root, "give config or projects, not both")
	case cfgPath != "":
		cfg, err := config.Load(cfgPath)
		if err != nil {
			errs = append(errs, err)
		}
		f.Config = cfg
	case projects != nil:
		// Only the projects key: the config parser's positions are the file's.
		only := &yaml.Node{Kind: yaml.MappingNode, Line: root.Line, Column: root.Column}
		for i := 0; i+1 < len(root.Content); i += 2 {
			if root.Content[i].Value == "projects" {
				only.Content = append(only.Content, root.Content[i], root.Content[i+1])
			}
		}
		cfg, err := config.ParseNode(path, only)
		if err != nil {
			errs = append(errs, err)
		}
		f.Config = cfg
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return f, nil
}

// expectation reads one entry of expect.
func expectation(n *yaml.Node) (Expectation, error) {
	x := Expectation{Line: n.Line}
	if n.Kind != yaml.MappingNode {
		return x, errors.New("an expectation is a mapping such as {project: alpha, connect: \"github.com:443\", verdict: allow}")
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		var dst *string
		switch k.Value {
		case "project":
			dst = &x.Project
		case "connect":
			dst = &x.Connect
		case "resolve":
			dst = &x.Resolve
		case "addr":
			dst = &x.Addr
		case "as":
			dst = &x.As
		case "verdict":
			dst = &x.Verdict
		default:
			return x, fmt.Errorf("unknown key %q in an expectation (want project, connect or resolve, addr, as, verdict)", k.Value)
		}
		if v.Kind != yaml.ScalarNode {
			return x, fmt.Errorf("%s must be a single value", k.Value)
		}
		*dst = v.Value
	}
	switch {
	case x.Project == "":
		return x, errors.New("an expectation needs project")
	case (x.Connect == "") == (x.Resolve == ""):
		return x, errors.New("an expectation needs one of connect or resolve")
	case x.Resolve != "" && (x.Addr != "" || x.As != ""):
		return x, errors.New("addr and as go with connect, not resolve")
	}
	switch policy.Verdict(x.Verdict) {
	case policy.Allow, policy.Deny, policy.WouldDeny:
	default:
		return x, fmt.Errorf("verdict %q is not allow, deny or would_deny", x.Verdict)
	}
	if x.As != "" {
		if _, err := policy.ParseBytes(x.As); err != nil {
			return x, err
		}
	}
	if x.Connect != "" {
		if _, _, err := splitHostPort(x.Connect); err != nil {
			return x, err
		}
	}
	if x.Addr != "" {
		if _, err := netip.ParseAddr(x.Addr); err != nil {
			return x, fmt.Errorf("addr %q is not an IP address", x.Addr)
		}
	}
	return x, nil
}

func splitHostPort(s string) (string, uint16, error) {
	h, p, err := net.SplitHostPort(s)
	if err != nil {
		return "", 0, fmt.Errorf("connect %q is not HOST:PORT", s)
	}
	port, err := strconv.ParseUint(p, 10, 16)
	if err != nil || port == 0 {
		return "", 0, fmt.Errorf("connect %q: port %q out of range (1-65535)", s, p)
	}
	return h, uint16(port), nil
}

// Result is one expectation checked.
type Result struct {
	File        string `json:"file"`
	Expectation `json:"expectation"`
	Got         string `json:"got"`
	// Rule and Reason are what decided (policy.Decision's).
	Rule   string `json:"rule,omitempty"`
	Reason string `json:"reason,omitempty"`
	Pass   bool   `json:"pass"`
}

// Check decides x against pol.
func Check(pol *policy.Policy, x Expectation) (got policy.Decision) {
	pr := pol.Project(x.Project)
	if pr == nil {
		return policy.Decision{Verdict: policy.Deny, Reason: fmt.Sprintf("no project %q", x.Project)}
	}
	if x.Resolve != "" {
		name, err := config.HostName(x.Resolve)
		if err != nil {
			return policy.Decision{Verdict: policy.Deny, Project: pr.Name, Reason: "not a valid host name: " + err.Error()}
		}
		d := pr.Resolve(name)
		if d.Verdict != policy.Allow && pr.Audit {
			d.Verdict = policy.WouldDeny // answered, and logged so
		}
		return d
	}
	host, port, _ := splitHostPort(x.Connect)
	q := policy.Query{Project: x.Project, Bytes: policy.Bytes(x.As)}
	if a, err := netip.ParseAddr(host); err == nil {
		q.Dst = netip.AddrPortFrom(a, port)
		if q.Bytes == "" {
			q.Bytes = policy.BytesNone
		}
	} else {
		q.Name = host
		q.Dst = netip.AddrPortFrom(netip.Addr{}, port)
		if x.Addr != "" {
			q.Dst = netip.AddrPortFrom(netip.MustParseAddr(x.Addr), port)
		}
		if q.Bytes == "" {
			q.Bytes = policy.BytesTLS
			if pr.InspectFor(port) == policy.InspectHTTP {
				q.Bytes = policy.BytesHTTP
			}
		}
	}
	return pol.Explain(q).Decision
}

// Run checks every expectation of f against its config.
func Run(f *File) ([]Result, error) {
	if f.Config == nil {
		return nil, fmt.Errorf("%s: names no config and holds no projects", f.Path)
	}
	pol, err := policy.Compile(f.Config)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f.Path, err)
	}
	return RunWith(pol, f), nil
}

// RunWith checks f's expectations against pol.
func RunWith(pol *policy.Policy, f *File) []Result {
	out := make([]Result, 0, len(f.Expect))
	for _, x := range f.Expect {
		d := Check(pol, x)
		out = append(out, Result{File: f.Path, Expectation: x, Got: string(d.Verdict), Rule: d.Rule, Reason: d.Reason, Pass: string(d.Verdict) == x.Verdict})
	}
	return out
}

// Failed returns the results that did not pass.
func Failed(rs []Result) []Result {
	return slices.DeleteFunc(slices.Clone(rs), func(r Result) bool { return r.Pass })
}

// Table renders results one a line, aligned.
func Table(rs []Result) string {
	rows := [][]string{{"RESULT", "WHERE", "PROJECT", "CHECK", "WANT", "GOT", "RULE"}}
	for _, r := range rs {
		res := "ok"
		if !r.Pass {
			res = "FAIL"
		}
		rule := r.Rule
		if rule == "" {
			rule = "-"
		}
		rows = append(rows, []string{res, fmt.Sprintf("%s:%d", r.File, r.Line), r.Project, r.What(), r.Verdict, r.Got, rule})
	}
	return align(rows)
}

// Failures describes each failed expectation with what decided it.
func Failures(rs []Result) string {
	var b strings.Builder
	for _, r := range Failed(rs) {
		fmt.Fprintf(&b, "%s:%d: project %s: %s: want %s, got %s", r.File, r.Line, r.Project, r.What(), r.Verdict, r.Got)
		if r.Rule != "" {
			fmt.Fprintf(&b, " by rule %s", r.Rule)
		}
		if r.Reason != "" {
			fmt.Fprintf(&b, " (%s)", r.Reason)
		}
		b.WriteString("\n")
	}
	return b.String()
}

func align(rows [][]string) string {
	width := make([]int, len(rows[0]))
	for _, r := range rows {
		for i, c := range r {
			width[i] = max(width[i], len(c))
		}
	}
	var b strings.Builder
	for _, r := range rows {
		for i, c := range r {
			if i == len(r)-1 {
				b.WriteString(c)
				break
			}
			b.WriteString(c + strings.Repeat(" ", width[i]-len(c)+2))
		}
		b.WriteString("\n")
	}
	return b.String()
}
