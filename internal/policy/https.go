package policy

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"

	"github.com/vmegress/vmegress/internal/config"
)

// requestRules are a project's rules that look inside connections: https
// rules (terminated TLS) and http rules with methods, paths or inject.
type requestRules struct {
	// https matches https rules by name and port, for the name stage and
	// the resolver.
	https nameMatcher
	// tls are the https rules in config order; http every http allow rule
	// in config order (a rule without methods, paths or inject allows any
	// request and injects nothing).
	tls, http []requestRule
	// httpRequests: some http rule has methods, paths or inject.
	httpRequests bool
}

type requestRule struct {
	pattern string
	ports   []uint16
	methods []string
	paths   []string
	inject  []config.Header
	rule    string
}

func newRequestRules() requestRules { return requestRules{https: newNameMatcher()} }

// add compiles an allow rule of kind https or http.
func (rr *requestRules) add(r config.Rule) {
	c := requestRule{pattern: r.Name, ports: r.EffectivePorts(), methods: r.Methods, paths: r.Paths, inject: r.Inject, rule: r.String()}
	switch r.Kind {
	case config.KindHTTPS:
		rr.https.add(r.Name, c.ports, c.rule)
		rr.tls = append(rr.tls, c)
	case config.KindHTTP:
		rr.http = append(rr.http, c)
		rr.httpRequests = rr.httpRequests || r.RequestRules()
	}
}

// terminates decides a TLS server name an https rule of the project
// matches on port: allowed, to be terminated. Deny rules were checked
// before.
func (pr *Project) terminates(norm string, port uint16) (Decision, bool) {
	rule, ok := pr.req.https.match(norm, port)
	if !ok {
		return Decision{}, false
	}
	return Decision{Verdict: Allow, Project: pr.Name, Rule: rule}, true
}

// Terminates reports whether a connection that DecideName allowed for
// name, learnt as kind, on port must have each of its requests read and
// decided by DecideRequest: a TLS name an https rule matches (TLS is
// terminated), or a plain-HTTP host some http rule with methods, paths or
// inject matches.
func (pr *Project) Terminates(kind Kind, name string, port uint16) bool {
	norm, err := config.HostName(name)
	if err != nil {
		return false
	}
	switch kind {
	case KindTLS:
		_, ok := pr.req.https.match(norm, port)
		return ok
	case KindHTTP:
		return pr.readsRequests(norm, port)
	}
	return false
}

// readsRequests reports whether an allowed plain-HTTP connection to name
// (normalised) on port has its requests decided one by one
// (DecideRequest): some http rule of the project for it has methods,
// paths or inject.
func (pr *Project) readsRequests(norm string, port uint16) bool {
	if !pr.req.httpRequests {
		return false
	}
	for _, r := range pr.req.http {
		if (len(r.methods) > 0 || len(r.paths) > 0 || len(r.inject) > 0) && slices.Contains(r.ports, port) && nameMatches(r.pattern, norm) {
			return true
		}
	}
	return false
}

// Request is one HTTP request on a connection whose name stage allowed it
// and Terminates says is read request by request.
type Request struct {
	// Kind is KindTLS for a terminated https connection, KindHTTP for plain HTTP.
	Kind Kind
	// Name is the connection's name: the TLS server name, or the Host of
	// the connection's first request.
	Name string
	// Port is the connection's destination port.
	Port uint16
	// Host is the request's Host (HTTP/2 :authority), port included if sent.
	Host   string
	Method string
	// Path is the request's decoded path (URL.Path), EscapedPath its form
	// on the wire (URL.EscapedPath).
	Path, EscapedPath string
	// MethodOverrides are the values of the request's method-override
	// headers (MethodOverrideHeaders): a server that honours them acts
	// on that method, so a rule allows the request only if it allows
	// each of them too.
	MethodOverrides []string
	// RawQuery is the request target's query, as sent (without the "?"):
	// a _method parameter in it is a method override too
	// (QueryOverridesMethod).
	RawQuery string
}

// MethodOverrideParam is the parameter by which Rails, Laravel and
// Symfony, and Express's method-override let a request name another method
// than its request line's (in a form body or the query string).
const MethodOverrideParam = "_method"

// QueryOverridesMethod reports whether rawQuery, percent-decoded once (as a
// server decodes it), holds MethodOverrideParam anywhere, case aside. It
// looks for the text, not for a parsed parameter: servers split and decode
// queries differently ("&" or ";", "_method[]", "+"), and a rule that
// limits methods or injects credentials refuses such a request whatever its
// value (the Envoy plane's route refuses the same requests).
func QueryOverridesMethod(rawQuery string) bool {
	if rawQuery == "" {
		return false
	}
	var b strings.Builder
	for i := 0; i < len(rawQuery); i++ {
		c := rawQuery[i]
		if c == '%' && i+2 < len(rawQuery) && isHex(rawQuery[i+1]) && isHex(rawQuery[i+2]) {
			c = unhex(rawQuery[i+1])<<4 | unhex(rawQuery[i+2])
			i += 2
		}
		b.WriteByte(c)
	}
	return strings.Contains(strings.ToLower(b.String()), MethodOverrideParam)
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c >= 'a':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}

// MethodOverrideHeaders are the headers by which servers (Google's APIs,
// Rails, Express's method-override, ASP.NET, Symfony...) let a request
// say its method is another than its request line's.
var MethodOverrideHeaders = []string{"X-Http-Method-Override", "X-Http-Method", "X-Method-Override"}

// echoMethods answer with the request they got, headers included (RFC
// 9110 9.3.8: a client must not send credentials in TRACE): a rule's
// inject headers are never set on them, so they are never allowed by an
// injecting rule.
var echoMethods = []string{"TRACE", "TRACK"}

// RequestDecision is the verdict on one request and, when allowed, the
// headers to set on it (templates; ${secret:NAME} is expanded by the data
// plane at send time, never here).
type RequestDecision struct {
	Decision
	Inject []config.Header
	// NoBodyOverride: the deciding rule limits methods or injects, so a
	// data plane that reads bodies refuses a POST whose form body holds
	// MethodOverrideParam (servers act on it as on the query's).
	NoBodyOverride bool
}

// DecideRequest decides one request of a connection the name stage allowed
// with Terminate: its Host must be the connection's name (and port, if it
// names one), no deny rule of the kind may match, and some rule for the
// name must allow its method and path. The first rule, in config order,
// that allows it decides, and its inject headers are the only ones set.
func (pr *Project) DecideRequest(q Request) RequestDecision {
	d := RequestDecision{Decision: Decision{Verdict: Deny, Project: pr.Name}}
	host, hport, err := net.SplitHostPort(q.Host)
	if err != nil {
		host, hport = q.Host, ""
	}
	norm, err := config.HostName(host)
	if err != nil {
		d.Reason = fmt.Sprintf("request Host %q is not a host name", q.Host)
		return d
	}
	conn, _ := config.HostName(q.Name)
	if norm != conn {
		what := "TLS server name"
		if q.Kind == KindHTTP {
			what = "host of the connection's first request"
		}
		d.Reason = fmt.Sprintf("request for host %s on a connection to %s (the %s)", norm, q.Name, what)
		return d
	}
	if hport != "" && hport != strconv.Itoa(int(q.Port)) {
		d.Reason = fmt.Sprintf("request Host names port %s on a connection to port %d", hport, q.Port)
		return d
	}
	rules, deny, kind := pr.req.tls, pr.denySNI, "https"
	if q.Kind == KindHTTP {
		rules, deny, kind = pr.req.http, pr.denyHTTP, "http"
	}
	if rule, ok := deny.match(norm, q.Port); ok {
		d.Rule, d.Reason = rule, "denied by rule "+strings.TrimPrefix(rule, DenyPrefix)
		return d
	}
	pathOK, pathWhy := checkPath(q.Path, q.EscapedPath)
	overrideQuery := QueryOverridesMethod(q.RawQuery)
	// why is the reason of the rule for the name that came closest: one
	// whose method matched (and the path did not) says more than one whose
	// method did not, one whose method and path matched (and a method
	// override, or an echoing method under injection, did not) more still.
	var why string
	closest := 0
	miss := func(level int, reason string) {
		if level > closest {
			closest, why = level, reason
		}
	}
	// The methods a server may act on: the request line's, and those the
	// override headers name (servers upper-case them).
	methods := []string{q.Method}
	for _, m := range q.MethodOverrides {
		if m = strings.ToUpper(strings.TrimSpace(m)); m != "" {
			methods = append(methods, m)
		}
	}
	for _, r := range rules {
		if !slices.Contains(r.ports, q.Port) || !nameMatches(r.pattern, norm) {
			continue
		}
		notAllowed := func(m string) bool { return !slices.Contains(r.methods, m) }
		echo := func(m string) bool { return slices.Contains(echoMethods, m) }
		switch {
		case len(r.methods) > 0 && notAllowed(q.Method):
			miss(1, fmt.Sprintf("method %s not allowed for %s", q.Method, norm))
			continue
		case len(r.paths) > 0 && !pathOK:
			miss(2, fmt.Sprintf("path %q not allowed for %s: %s", q.EscapedPath, norm, pathWhy))
			continue
		case len(r.paths) > 0 && !slices.ContainsFunc(r.paths, func(p string) bool { return pathMatches(p, q.Path) }):
			miss(2, fmt.Sprintf("path %s not allowed for %s", q.Path, norm))
			continue
		case len(r.methods) > 0 && slices.ContainsFunc(methods, notAllowed):
			m := methods[slices.IndexFunc(methods, notAllowed)]
			miss(3, fmt.Sprintf("method %s (by a method-override header) not allowed for %s", m, norm))
			continue
		case (len(r.methods) > 0 || len(r.inject) > 0) && overrideQuery:
			miss(3, fmt.Sprintf("a %s query parameter (a method override) is not allowed for %s", MethodOverrideParam, norm))
			continue
		case len(r.inject) > 0 && slices.ContainsFunc(methods, echo):
			m := methods[slices.IndexFunc(methods, echo)]
			miss(3, fmt.Sprintf("method %s echoes the request: never sent with injected headers (%s)", m, norm))
			continue
		}
		return RequestDecision{Decision: Decision{Verdict: Allow, Project: pr.Name, Rule: r.rule}, Inject: r.inject,
			NoBodyOverride: len(r.methods) > 0 || len(r.inject) > 0}
	}
	if why == "" {
		why = fmt.Sprintf("no %s rule of project %s allows %s on port %d", kind, pr.Name, norm, q.Port)
	}
	d.Reason = why
	return d
}

// nameMatches is the name stage's matching for one pattern: exact, "*."
// for any depth of subdomain (not the apex), or "*".
func nameMatches(pattern, name string) bool {
	if pattern == config.AnyName || pattern == name {
		return true
	}
	suffix, ok := strings.CutPrefix(pattern, "*.")
	return ok && strings.HasSuffix(name, "."+suffix)
}

// pathMatches matches a decoded path against a rule's path: exact, or a
// prefix when the pattern ends in "*".
func pathMatches(pattern, path string) bool {
	if prefix, ok := strings.CutSuffix(pattern, "*"); ok {
		return strings.HasPrefix(path, prefix)
	}
	return path == pattern
}

// checkPath refuses paths that a server could resolve to another path
// than the one matched: "." and ".." segments (also as "..;param"),
// backslashes, control bytes, escaped slashes or backslashes, and escapes
// escaped twice (a server that decodes them after routing would see other
// segments).
func checkPath(path, escaped string) (bool, string) {
	if !strings.HasPrefix(path, "/") {
		return false, "not an absolute path"
	}
	for i := 0; i < len(path); i++ {
		if c := path[i]; c < 0x20 || c == 0x7f || c == '\\' {
			return false, "it holds a backslash or control byte"
		}
	}
	if strings.Contains(path, "%") {
		// Escaped twice (%252e): a server that decodes again would see
		// other segments.
		return false, "it holds an escape escaped twice"
	}
	lower := strings.ToLower(escaped)
	if strings.Contains(lower, "%2f") || strings.Contains(lower, "%5c") {
		return false, "it holds an escaped / or \\"
	}
	for _, seg := range strings.Split(path, "/") {
		seg, _, _ = strings.Cut(seg, ";")
		if seg == "." || seg == ".." {
			return false, "it has a . or .. segment"
		}
	}
	return true, ""
}
