package envoy

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/secrets"
)

// TLS termination (https rules) on the Envoy plane. Each https name of a
// project's port gets a filter chain of its own: the server-name matcher
// sends exactly that name there, the chain shows the guest a certificate
// of the vmegress CA for it (served over SDS, never written to disk), and
// an HTTP connection manager decides each request by the rules for the
// name in config order, as policy.Project.DecideRequest does. Injected
// headers are Envoy's credential injector's, the value a generic secret
// served over SDS (Envoy redacts secrets in its admin output), so no
// secret is ever in the listener.

// Names of the termination resources.
const (
	// ClusterHTTPS + "/" + project dials the name of the project's
	// terminated connections over TLS verified against UpstreamRoots (SNI
	// and SAN: the name): a cluster per project, so its upstream
	// connections (which carry its injected credentials) are pooled for
	// that project alone, never reused for another project's requests.
	ClusterHTTPS = "vmegress_dfp_https"
	// rootsSecret is the validation context of the ClusterHTTPS clusters.
	rootsSecret = "vmegress_upstream_roots"
	// certSecretPrefix + name is the guest-facing certificate for name.
	certSecretPrefix = "vmegress_cert/"
	// injectSecretPrefix + digest(template) is an inject header's value.
	injectSecretPrefix = "vmegress_inject/"
	// injectFilterPrefix + n is the n-th credential injector of a chain.
	injectFilterPrefix = "vmegress.inject."
	dfpFilter          = "envoy.filters.http.dynamic_forward_proxy"
	defaultTLSPort     = 443
)

// badPathRegex matches a :path (up to its query) that a server could
// resolve to another path than the one a rule matched (policy's
// checkPath): a "." or ".." segment (escaped or not, also with
// ";params"), a backslash, a control byte, an escaped "/" or "\", or an
// escaped "%" (an escape escaped twice). Envoy matches a regex against
// the whole value.
const badPathRegex = `[^?]*(/(\.|%2[eE]){1,2}(;[^/?]*)?([/?]|$)|\\|%2[fF]|%5[cC]|%25|%[01][0-9a-fA-F]|%7[fF]|[\x00-\x1f\x7f]).*`

// badPathWhy is the refusal's reason for a path badPathRegex matches.
const badPathWhy = "it has a . or .. segment, a backslash or control byte, an escaped / or \\, or an escape escaped twice"

// overrideQueryRegex matches a :path whose query holds
// policy.MethodOverrideParam, each byte literal or percent-encoded, case
// aside: the requests policy.QueryOverridesMethod finds.
var overrideQueryRegex = func() string {
	var b strings.Builder
	b.WriteString(`(?is)[^?]*\?.*`)
	for _, c := range []byte(policy.MethodOverrideParam) {
		// A letter decodes from either case's escape ("%45" or "%65").
		lo, up := strings.ToLower(string(c))[0], strings.ToUpper(string(c))[0]
		fmt.Fprintf(&b, `(?:%s|%%%02x|%%%02x)`, regexp.QuoteMeta(string(c)), lo, up)
	}
	b.WriteString(`.*`)
	return b.String()
}()

// methodGuards are the header matchers a request must pass besides its
// :method, as policy.Project.DecideRequest decides: where r has methods,
// each method-override header is missing or names one of them (servers
// act on it, upper-cased); where r injects, neither :method nor an
// override is TRACE or TRACK (the answer echoes the request, credentials
// included).
func methodGuards(r policy.RequestRule) []M {
	var out []M
	if len(r.Methods) > 0 || len(r.Inject) > 0 {
		// No _method in the query, in any case or percent-encoding
		// (policy.QueryOverridesMethod).
		out = append(out, M{"name": ":path", "invert_match": true, "string_match": M{"safe_regex": M{"regex": overrideQueryRegex}}})
	}
	if len(r.Methods) > 0 {
		quoted := make([]string, len(r.Methods))
		for i, m := range r.Methods {
			quoted[i] = regexp.QuoteMeta(m)
		}
		for _, h := range policy.MethodOverrideHeaders {
			out = append(out, M{"name": strings.ToLower(h), "treat_missing_header_as_empty": true,
				"string_match": M{"safe_regex": M{"regex": `(?i)\s*(` + strings.Join(quoted, "|") + `)?\s*`}}})
		}
	}
	if len(r.Inject) > 0 {
		out = append(out, M{"name": ":method", "invert_match": true, "string_match": M{"safe_regex": M{"regex": "TRACE|TRACK"}}})
		for _, h := range policy.MethodOverrideHeaders {
			out = append(out, M{"name": strings.ToLower(h), "treat_missing_header_as_empty": true, "invert_match": true,
				"string_match": M{"safe_regex": M{"regex": `(?i).*TRAC[EK].*`}}})
		}
	}
	return out
}

// sdsRef refers to secret name: over ADS, or among the bootstrap's static
// secrets (the standalone bootstrap).
func sdsRef(o Settings, name string) M {
	if o.staticSecrets {
		return M{"name": name}
	}
	return M{"name": name, "sds_config": M{"ads": M{}, "resource_api_version": "V3"}}
}

// terminating returns the projects with an https name to terminate.
func terminating(pol *policy.Policy) []*policy.Project {
	var out []*policy.Project
	for _, p := range pol.Projects() {
		if terminates(p) {
			out = append(out, p)
		}
	}
	return out
}

// terminates reports whether p has an https name on some port.
func terminates(p *policy.Project) bool {
	for _, v := range p.Ports() {
		if len(v.HTTPS) > 0 {
			return true
		}
	}
	return false
}

// httpsClusterName is the terminating cluster of project.
func httpsClusterName(project string) string { return ClusterHTTPS + "/" + project }

// httpsCluster is the forward proxy's TLS cluster for terminated requests:
// the upstream is the request's Host (the chain's name, rewritten
// literally), its SNI and the certificate's expected name are that Host
// (auto_sni, auto_san_validation), its roots the host's plus
// upstream_ca_file; HTTP/2 or HTTP/1.1 by ALPN.
func httpsCluster(o Settings, project string) M {
	return M{
		"name":                 httpsClusterName(project),
		"connect_timeout":      "10s",
		"lb_policy":            "CLUSTER_PROVIDED",
		"upstream_bind_config": markedBind(o.UpstreamMark),
		"cluster_type": M{
			"name":         "envoy.clusters.dynamic_forward_proxy",
			"typed_config": typed("envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig", M{"dns_cache_config": dnsCache(o)}),
		},
		"transport_socket": M{"name": "envoy.transport_sockets.tls", "typed_config": typed(
			"envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", M{"common_tls_context": M{
				"validation_context_sds_secret_config": sdsRef(o, rootsSecret),
			}})},
		"typed_extension_protocol_options": M{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
			"envoy.extensions.upstreams.http.v3.HttpProtocolOptions", M{
				"upstream_http_protocol_options": M{"auto_sni": true, "auto_san_validation": true},
				"auto_config":                    M{"http_protocol_options": M{}, "http2_protocol_options": M{}},
			})},
	}
}

// httpsChainName names the chain of an https name.
func httpsChainName(project string, port uint16, name string) string {
	return chainName(project, "https", port) + "/" + name
}

// injection is one credential injector of a chain: a header and the
// template of its value.
type injection struct {
	filter string // the filter's name in the chain
	header config.Header
}

func injectSecretName(template string) string { return injectSecretPrefix + digest(template) }

// httpsChain terminates TLS for name on port and decides each request by
// rules (the project's https rules for name on port, config order).
func httpsChain(o Settings, p *policy.Project, port uint16, name string, rules []policy.RequestRule, version string) M {
	chain := httpsChainName(p.Name, port, name)
	var injections []injection
	injectorFor := func(h config.Header) string {
		for _, in := range injections {
			if in.header == h {
				return in.filter
			}
		}
		f := injectFilterPrefix + strconv.Itoa(len(injections))
		injections = append(injections, injection{filter: f, header: h})
		return f
	}
	host := name
	if port != defaultTLSPort {
		host = name + ":" + strconv.Itoa(int(port))
	}
	// The forward proxy dials the chain's own name on the connection's
	// port whatever the request says (its Host was checked to be the
	// name by the virtual host) and sends that as the Host.
	dfpRoute := typed("envoy.extensions.filters.http.dynamic_forward_proxy.v3.PerRouteConfig", M{"host_rewrite_literal": host})
	enable := typed("envoy.config.route.v3.FilterConfig", M{"config": M{}, "disabled": false})
	refused := func(reason string) string {
		return fmt.Sprintf("vmegress: egress policy of project %s refused %%REQ(:METHOD)%% %s%%PATH(NQ)%%: %s\n", p.Name, name, reason)
	}
	// The log's reason is the body's without the request's parts (the
	// line has them in fields of their own).
	unformatted := strings.NewReplacer("%PATH(NQ)% ", "", "%REQ(:METHOD)% ", "", "%REQ(:AUTHORITY)% ", "")
	deny := func(match M, reason string) M {
		return M{"match": match,
			"metadata": M{"filter_metadata": M{verdictNamespace: M{"verdict": "deny", "reason": unformatted.Replace(reason)}}},
			"direct_response": M{"status": 403, "body_format": M{"text_format_source": M{"inline_string": refused(reason)},
				"content_type": "text/plain; charset=utf-8"}}}
	}
	methodsHeader := func(ms []string) []M {
		if len(ms) == 0 {
			return nil
		}
		quoted := make([]string, len(ms))
		for i, m := range ms {
			quoted[i] = regexp.QuoteMeta(m)
		}
		return []M{{"name": ":method", "string_match": M{"safe_regex": M{"regex": "^(" + strings.Join(quoted, "|") + ")$"}}}}
	}
	goodPath := M{"name": ":path", "string_match": M{"safe_regex": M{"regex": badPathRegex}}, "invert_match": true}
	var routes []M
	pathMethods, anyPathMethod := []string{}, false
	for _, r := range rules {
		perFilter := M{dfpFilter: dfpRoute}
		for _, h := range r.Inject {
			perFilter[injectorFor(h)] = enable
		}
		allow := func(match M) M {
			return M{"match": match,
				"metadata":                M{"filter_metadata": M{verdictNamespace: M{"verdict": "allow", "rule": r.Rule}}},
				"route":                   M{"cluster": httpsClusterName(p.Name), "timeout": "0s"},
				"typed_per_filter_config": perFilter}
		}
		var why []string
		for _, h := range r.Inject {
			if w, ok := o.brokenInject[h.Value]; ok {
				why = append(why, w)
			}
		}
		if len(why) > 0 {
			// A credential that cannot be read: the request fails, it is
			// never sent without it.
			reason := strings.Join(why, "; ")
			allow = func(match M) M {
				return M{"match": match,
					"metadata":        M{"filter_metadata": M{verdictNamespace: M{"verdict": "error", "rule": r.Rule, "reason": reason}}},
					"direct_response": M{"status": 502, "body": M{"inline_string": fmt.Sprintf("vmegress: project %s: %s\n", p.Name, reason)}}}
			}
		}
		headers := append(methodsHeader(r.Methods), methodGuards(r)...)
		if len(r.Paths) == 0 {
			routes = append(routes, allow(M{"prefix": "/", "headers": headers}))
			continue
		}
		if len(r.Methods) == 0 {
			anyPathMethod = true
		}
		pathMethods = append(pathMethods, r.Methods...)
		for _, pt := range r.Paths {
			match := M{"headers": append(slices.Clone(headers), goodPath)}
			if prefix, ok := strings.CutSuffix(pt, "*"); ok {
				match["prefix"] = prefix
			} else {
				match["path"] = pt
			}
			routes = append(routes, allow(match))
		}
	}
	// No rule allowed it: the reason of the rule that came closest, as
	// DecideRequest gives it (a method override where a rule weighs
	// them; a method some rule with paths allows: the path; else the
	// method).
	if slices.ContainsFunc(rules, func(r policy.RequestRule) bool { return len(r.Methods) > 0 || len(r.Inject) > 0 }) {
		// Only for a method some rule allows (else the method is the
		// reason).
		var allowed []string
		for _, r := range rules {
			if len(r.Methods) == 0 {
				allowed = nil
				break
			}
			allowed = append(allowed, r.Methods...)
		}
		slices.Sort(allowed)
		byMethod := methodsHeader(slices.Compact(allowed))
		routes = append(routes, deny(M{"prefix": "/", "headers": append(slices.Clone(byMethod), M{"name": ":path", "string_match": M{"safe_regex": M{"regex": overrideQueryRegex}}})},
			fmt.Sprintf("a %s query parameter (a method override) is not allowed for %s", policy.MethodOverrideParam, name)))
		for _, h := range policy.MethodOverrideHeaders {
			routes = append(routes, deny(M{"prefix": "/", "headers": append(slices.Clone(byMethod), M{"name": strings.ToLower(h), "present_match": true})},
				fmt.Sprintf("the method-override header %s names a method not allowed for %s", h, name)))
		}
	}
	if anyPathMethod || len(pathMethods) > 0 {
		var headers []M
		if !anyPathMethod {
			slices.Sort(pathMethods)
			headers = methodsHeader(slices.Compact(pathMethods))
		}
		routes = append(routes,
			deny(M{"prefix": "/", "headers": append(slices.Clone(headers), M{"name": ":path", "string_match": M{"safe_regex": M{"regex": badPathRegex}}})},
				"path not allowed for "+name+": "+badPathWhy),
			deny(M{"prefix": "/", "headers": headers}, "path %PATH(NQ)% not allowed for "+name))
	}
	routes = append(routes, deny(M{"prefix": "/"}, "method %REQ(:METHOD)% not allowed for "+name))
	vhosts := []M{
		{"name": name, "domains": []string{name}, "routes": routes},
		{"name": "other", "domains": []string{"*"}, "routes": []M{
			deny(M{"prefix": "/"}, "request for host %REQ(:AUTHORITY)% on a connection to "+name+" (the TLS server name)")}},
	}
	var filters []M
	for _, in := range injections {
		filters = append(filters, M{"name": in.filter, "disabled": true, "typed_config": typed(
			"envoy.extensions.filters.http.credential_injector.v3.CredentialInjector", M{
				"overwrite": true,
				"credential": M{"name": "envoy.http.injected_credentials.generic", "typed_config": typed(
					"envoy.extensions.http.injected_credentials.generic.v3.Generic", M{
						"credential": sdsRef(o, injectSecretName(in.header.Value)),
						"header":     in.header.Name,
					})},
			})})
	}
	filters = append(filters,
		M{"name": dfpFilter, "typed_config": typed("envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
			M{"dns_cache_config": dnsCache(o)})},
		M{"name": "envoy.filters.http.router", "typed_config": typed("envoy.extensions.filters.http.router.v3.Router", M{"suppress_envoy_headers": true})})
	return M{
		"name": chain,
		"transport_socket": M{"name": "envoy.transport_sockets.tls", "typed_config": typed(
			"envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", M{"common_tls_context": M{
				"tls_certificate_sds_secret_configs": []M{sdsRef(o, certSecretPrefix+name)},
				"alpn_protocols":                     []string{"h2", "http/1.1"},
			}})},
		"filters": []M{connLimit(chain, p.MaxConnections), {
			"name": "envoy.filters.network.http_connection_manager",
			"typed_config": typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", M{
				"stat_prefix":              chain + version,
				"codec_type":               "AUTO",
				"route_config":             M{"name": chain, "virtual_hosts": vhosts, "request_headers_to_remove": []string{"x-forwarded-proto"}},
				"strip_matching_host_port": true,
				// What the guest sent goes on, as on the builtin plane:
				// no request id, no x-envoy-* or x-forwarded-proto added.
				"generate_request_id": false,
				"upgrade_configs":     []M{{"upgrade_type": "websocket"}},
				"access_log":          requestLog(o, p.Name),
				"local_reply_config":  upstreamReplies(name),
				"http_filters":        filters,
			}),
		}},
	}
}

// requestLog is one line per request of a terminated connection, with the
// builtin plane's fields; the verdict, rule and reason are the route's.
func requestLog(o Settings, project string) []M {
	if o.AccessLogPath == "" {
		return nil
	}
	meta := func(key string) string { return "%METADATA(ROUTE:" + verdictNamespace + ":" + key + ")%" }
	return accessLog(o, M{"msg": "request", "project": project, "host": "%REQ(:AUTHORITY)%", "method": "%REQ(:METHOD)%",
		"path": "%PATH(NQ)%", "status": "%RESPONSE_CODE%", "verdict": meta("verdict"), "rule": meta("rule"),
		"reason": meta("reason"), "flags": "%RESPONSE_FLAGS%", "upstream_failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%"})
}

// upstreamReplies words Envoy's own answers when the upstream failed: a
// certificate it does not trust is named as such.
func upstreamReplies(name string) M {
	cel := func(expr string) M {
		return M{"extension_filter": M{"name": "envoy.access_loggers.extension_filters.cel", "typed_config": typed(
			"envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter", M{"expression": expr})}}
	}
	body := func(s string) M { return M{"text_format_source": M{"inline_string": s}} }
	return M{"mappers": []M{
		{"filter": cel("response.code == 503 && upstream.transport_failure_reason.contains('CERTIFICATE_VERIFY_FAILED')"),
			"status_code": 502, "body_format_override": body("vmegress: upstream " + name + ": its certificate is not trusted (%UPSTREAM_TRANSPORT_FAILURE_REASON%)\n")},
		{"filter": M{"status_code_filter": M{"comparison": M{"op": "GE", "value": M{"default_value": 502, "runtime_key": "vmegress.upstream_status"}}}},
			"body_format_override": body("vmegress: upstream " + name + ": %LOCAL_REPLY_BODY% %UPSTREAM_TRANSPORT_FAILURE_REASON%\n")},
	}}
}

// Secrets are the SDS secrets pol's terminated chains refer to: a
// certificate for each https name (o.Leaf), each inject header's value
// with its ${secret:NAME}s expanded (o.Secret), and the upstream roots.
// Their values are only ever in these resources. An inject value that
// cannot be expanded is not served: broken maps its template to why (no
// value in it), and the routes of rules injecting it answer 502 instead
// of forwarding (Listener with o.brokenInject), as the builtin plane never
// sends a request without its credential.
func Secrets(pol *policy.Policy, o Settings) (out []M, broken map[string]string, err error) {
	broken = map[string]string{}
	certs, injects := map[string]bool{}, map[string]bool{}
	var errs []error
	for _, p := range pol.Projects() {
		for _, v := range p.Ports() {
			for _, n := range v.HTTPS {
				if !certs[n.Pattern] {
					certs[n.Pattern] = true
					s, err := certSecret(o, n.Pattern)
					if err != nil {
						errs = append(errs, err)
						continue
					}
					out = append(out, s)
				}
				for _, r := range p.HTTPSRules(n.Pattern, v.Port) {
					for _, h := range r.Inject {
						if injects[h.Value] {
							continue
						}
						injects[h.Value] = true
						s, err := injectSecret(o, h)
						if err != nil {
							broken[h.Value] = err.Error()
							continue
						}
						out = append(out, s)
					}
				}
			}
		}
	}
	if len(certs) > 0 {
		if len(o.UpstreamRoots) == 0 {
			errs = append(errs, errors.New("no upstream roots for https rules (the host's CA bundle and upstream_ca_file are both missing)"))
		}
		out = append(out, M{"name": rootsSecret, "validation_context": M{"trusted_ca": M{"inline_bytes": o.UpstreamRoots}}})
	}
	return out, broken, errors.Join(errs...)
}

func certSecret(o Settings, name string) (M, error) {
	if o.Leaf == nil {
		return nil, fmt.Errorf("https rules for %s: no vmegress CA to issue its certificate", name)
	}
	c, err := o.Leaf(name)
	if err != nil {
		return nil, err
	}
	var chain []byte
	for _, der := range c.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	key, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		return nil, fmt.Errorf("encoding the key of the certificate for %s: %w", name, err)
	}
	return M{"name": certSecretPrefix + name, "tls_certificate": M{
		"certificate_chain": M{"inline_bytes": chain},
		"private_key":       M{"inline_bytes": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key})},
	}}, nil
}

// injectSecret expands h's value. Errors name the header and secret,
// never a value.
func injectSecret(o Settings, h config.Header) (M, error) {
	t, err := secrets.Parse(h.Value)
	if err != nil {
		return nil, fmt.Errorf("inject %s: %w", h.Name, err)
	}
	get := o.Secret
	if get == nil {
		get = func(name string) (string, error) {
			return "", fmt.Errorf("reading secret %q: %w (no secret store)", name, secrets.ErrNotFound)
		}
	}
	v, err := t.Expand(get)
	if err != nil {
		return nil, fmt.Errorf("inject %s: %w", h.Name, err)
	}
	return M{"name": injectSecretName(h.Value), "generic_secret": M{"secret": M{"inline_string": v}}}, nil
}

// hostBundles are where distributions keep the host's CA bundle (as Go's
// crypto/x509 looks for it).
var hostBundles = []string{
	"/etc/ssl/certs/ca-certificates.crt",
	"/etc/pki/tls/certs/ca-bundle.crt",
	"/etc/ssl/ca-bundle.pem",
	"/etc/pki/tls/cacert.pem",
	"/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
	"/etc/ssl/cert.pem",
}

// UpstreamRoots is the PEM bundle terminated requests' upstreams are
// verified against: the host's bundle (SSL_CERT_FILE, else the first of
// the usual places) plus caFile (upstream_ca_file; may be empty).
func UpstreamRoots(caFile string, getenv func(string) string, readFile func(string) ([]byte, error)) ([]byte, error) {
	var out []byte
	for _, f := range append([]string{getenv("SSL_CERT_FILE")}, hostBundles...) {
		if f == "" {
			continue
		}
		if b, err := readFile(f); err == nil {
			out = append(out, b...)
			break
		}
	}
	if caFile != "" {
		b, err := readFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("reading upstream_ca_file: %w", err)
		}
		if blk, _ := pem.Decode(b); blk == nil {
			return nil, fmt.Errorf("reading upstream_ca_file %s: no PEM certificate in it", caFile)
		}
		out = append(append(out, '\n'), b...)
	}
	return out, nil
}

// HostUpstreamRoots is UpstreamRoots with the process's environment and files.
func HostUpstreamRoots(caFile string) ([]byte, error) {
	return UpstreamRoots(caFile, os.Getenv, os.ReadFile)
}
