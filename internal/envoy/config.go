// Package envoy renders vmegress's compiled policy as Envoy configuration
// (the spec's data plane, sections 6.5-6.7): a transparent listener on
// tproxy_port whose filter-chain matcher picks a chain by source /30 first
// (projects can never affect each other's matching), then destination port,
// then TLS server name; allowed names are dialled through Envoy's dynamic
// forward proxy, which resolves the name itself (never the guest's chosen
// address: no SNI spoofing) and drops always-denied answers.
//
// The configuration is built as plain data (maps in Envoy's JSON form) so the
// same builder serves the static bootstrap and, later, xDS resources.
package envoy

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/dest"
	"github.com/vmegress/vmegress/internal/policy"
)

// M is a JSON object of Envoy configuration.
type M = map[string]any

// Typed wraps a message with its @type.
func typed(t string, m M) M {
	out := M{"@type": "type.googleapis.com/" + t}
	for k, v := range m {
		out[k] = v
	}
	return out
}

// Names of the generated resources.
const (
	ListenerName   = "vmegress_egress"
	ClusterTLS     = "vmegress_dfp_tls"
	ClusterHTTP    = "vmegress_dfp_http"
	ClusterOrigDst = "vmegress_original_dst"
	ClusterDeny    = "vmegress_deny"
	dnsCacheName   = "vmegress_dns"
	// defaultDeny is the listener's default chain: sources in no project.
	defaultDeny = "deny"
	// upstreamHeader carries name:port from the header mutation to the
	// forward proxy; it is overwritten on entry and removed before sending.
	upstreamHeader = "x-vmegress-upstream"
	// bodyPolicy names the RBAC policy refusing bodies on bodiless methods
	// (it shows in the access log's reason).
	bodyPolicy   = "body_on_GET_HEAD_OPTIONS_TRACE"
	bufferFilter = "envoy.filters.http.buffer"
	// setMetadataFilter writes the verdict of an allowed route into the
	// request's dynamic metadata, under verdictNamespace, for the access log.
	setMetadataFilter = "envoy.filters.http.set_metadata"
	verdictNamespace  = "vmegress"
	// maxBodilessBody bounds what is buffered of a GET/HEAD/OPTIONS/TRACE
	// body before it is refused (larger ones get 413: refused too).
	maxBodilessBody = 64 << 10
	// hostNameRegex is a host name as config.NormalizeName admits one:
	// dot-separated labels of letters, digits, '-' and '_', none empty,
	// none starting or ending with '-'. Server names and HTTP hosts must
	// match it before any rule is looked at (no escapes, no empty labels,
	// no bytes a resolver would read otherwise).
	hostNameRegex = `^([A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?\.)*[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?$`
	// defaultHTTPPort is the port the HTTP forward proxy dials when the
	// Host names none.
	defaultHTTPPort = 80
	// SOL_SOCKET / SO_MARK (asm-generic/socket.h): the upstream mark.
	solSocket = 1
	soMark    = 36
)

// Settings are what rendering needs beyond the compiled policy: where the
// listener is, how upstream sockets are marked, and Envoy's own plumbing.
// SettingsFrom fills the config's part; callers add the rest.
type Settings struct {
	// TProxyPort is the transparent listener's port.
	TProxyPort uint16
	// UpstreamMark is set (SO_MARK) on every upstream socket.
	UpstreamMark uint32
	// VMCIDR is the guest range: never an upstream.
	VMCIDR netip.Prefix
	// Upstreams are the DNS resolvers ("ip:port") the forward proxy uses.
	Upstreams []string
	// AdminSocket is the unix socket Envoy's admin listens on (mode 0600:
	// only root may read the policy, drain listeners or stop Envoy). When
	// empty, the admin listens on AdminAddress instead.
	AdminSocket string
	// AdminAddress is Envoy's admin listener (loopback ip:port) when
	// AdminSocket is empty (the standalone bootstrap's --admin-port).
	AdminAddress netip.AddrPort
	// AccessLogPath receives one JSON line per connection ("/dev/stdout").
	AccessLogPath string
	// OnPolicyChange "drop" versions each chain with a hash of its project's
	// rules, so Envoy drains (closes) a changed project's connections; with
	// "keep" a change that only edits names touches just the matcher and
	// drains nothing.
	OnPolicyChange string
	// Leaf issues the certificate guests are shown for an https rule's
	// name (the vmegress CA's); nil: https rules cannot be rendered.
	Leaf func(name string) (*tls.Certificate, error)
	// Secret reads a secret for ${secret:NAME} in inject headers; its
	// errors must not carry the value. Nil: every secret is missing.
	Secret func(name string) (string, error)
	// UpstreamRoots (PEM) verify the upstreams of terminated requests: the
	// host's bundle plus upstream_ca_file (HostUpstreamRoots).
	UpstreamRoots []byte

	// staticSecrets: secrets are the bootstrap's own (Bootstrap), not SDS.
	staticSecrets bool
	// brokenInject maps the inject templates that cannot be expanded to
	// why (Secrets): their rules' routes answer 502.
	brokenInject map[string]string
}

// SettingsFrom takes cfg's part of the settings; Upstreams, the admin
// address and the access log are the caller's.
func SettingsFrom(cfg *config.Config) Settings {
	return Settings{TProxyPort: cfg.TProxyPort, UpstreamMark: cfg.UpstreamMark, VMCIDR: cfg.VMCIDR, OnPolicyChange: cfg.OnPolicyChange}
}

// adminSocketMode is the admin socket file's permissions: owner (root) only.
const adminSocketMode = 0o600

// admin is Envoy's admin section: a unix socket when o names one.
func admin(o Settings) M {
	if o.AdminSocket != "" {
		return M{"address": M{"pipe": M{"path": o.AdminSocket, "mode": adminSocketMode}}}
	}
	return M{"address": socketAddr(o.AdminAddress)}
}

func socketAddr(ap netip.AddrPort) M {
	return M{"socket_address": M{"address": ap.Addr().String(), "port_value": ap.Port()}}
}

func cidr(p netip.Prefix) M {
	return M{"address_prefix": p.Masked().Addr().String(), "prefix_len": p.Bits()}
}

// deniedRanges is the always-denied set plus the guest range: the forward
// proxy never connects to such an answer.
func deniedRanges(o Settings) []M {
	var out []M
	for _, p := range dest.Ranges() {
		out = append(out, cidr(p))
	}
	return append(out, cidr(o.VMCIDR))
}

func dnsCache(o Settings) M {
	var resolvers []M
	for _, u := range o.Upstreams {
		if ap, err := netip.ParseAddrPort(u); err == nil {
			resolvers = append(resolvers, socketAddr(ap))
		}
	}
	return M{
		"name":              dnsCacheName,
		"dns_lookup_family": "V4_ONLY",
		"typed_dns_resolver_config": M{
			"name": "envoy.network.dns_resolver.cares",
			"typed_config": typed("envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig", M{
				"resolvers":                 resolvers,
				"use_resolvers_as_fallback": false,
				// Names are asked as they are: c-ares would otherwise try
				// the host's resolv.conf search domains first (with ndots:5,
				// www.github.com.corp.test before www.github.com) and dial
				// whatever that zone answers.
				"dns_resolver_options": M{"no_default_search_domain": true, "use_tcp_for_dns_lookups": false},
			}),
		},
		// Answers in the always-denied set are dropped (rebinding, metadata).
		"resolved_address_filter": M{"ranges": deniedRanges(o)},
	}
}

// markedBind sets SO_MARK on upstream sockets before connect.
func markedBind(mark uint32) M {
	return M{"socket_options": []M{{"level": solSocket, "name": soMark, "int_value": mark, "state": "STATE_PREBIND"}}}
}

func clusters(pol *policy.Policy, o Settings) []M {
	dfp := func(name string) M {
		return M{
			"name":                 name,
			"connect_timeout":      "10s",
			"lb_policy":            "CLUSTER_PROVIDED",
			"upstream_bind_config": markedBind(o.UpstreamMark),
			"cluster_type": M{
				"name":         "envoy.clusters.dynamic_forward_proxy",
				"typed_config": typed("envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig", M{"dns_cache_config": dnsCache(o)}),
			},
		}
	}
	var out []M
	for _, p := range terminating(pol) {
		out = append(out, httpsCluster(o, p.Name))
	}
	out = append(out,
		dfp(ClusterTLS),
		dfp(ClusterHTTP),
		M{
			// cidr rules only: the original destination, restricted by the
			// matcher to the rule's ranges.
			"name": ClusterOrigDst, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
			"connect_timeout": "10s", "upstream_bind_config": markedBind(o.UpstreamMark),
		},
		M{"name": ClusterDeny, "type": "STATIC", "connect_timeout": "1s", "load_assignment": M{"cluster_name": ClusterDeny,
			"endpoints": []M{{"lb_endpoints": []M{{"endpoint": M{"address": socketAddr(netip.MustParseAddrPort("127.0.0.1:1"))}}}}}}},
	)
	for _, c := range out {
		c["circuit_breakers"] = circuitBreakers
	}
	return out
}

// circuitBreakers lift Envoy's per-cluster defaults (1024 connections,
// pending and active requests): every guest of the host shares these
// clusters, so the defaults would cap the whole host at 1024 upstream
// connections. Each project's own cap is its chain's connection_limit.
var circuitBreakers = M{"thresholds": []M{{
	"priority":             "DEFAULT",
	"max_connections":      1 << 20,
	"max_pending_requests": 1 << 20,
	"max_requests":         1 << 20,
}}}

// accessLog is one JSON line per connection (per request for http chains)
// with the builtin plane's field names; what Envoy knows only per chain
// (project, verdict) is written into each chain's log as a literal.
func accessLog(o Settings, fields M) []M {
	if o.AccessLogPath == "" {
		return nil
	}
	format := M{
		"msg":         "connection",
		"time":        "%START_TIME%",
		"src":         "%DOWNSTREAM_REMOTE_ADDRESS%",
		"dst":         "%DOWNSTREAM_LOCAL_ADDRESS%",
		"sni":         "%REQUESTED_SERVER_NAME%",
		"upstream":    "%UPSTREAM_HOST%",
		"bytes_up":    "%BYTES_RECEIVED%",
		"bytes_down":  "%BYTES_SENT%",
		"duration_ms": "%DURATION%",
		"dataplane":   "envoy",
	}
	for k, v := range fields {
		format[k] = v
	}
	return []M{{
		"name": "envoy.access_loggers.file",
		"typed_config": typed("envoy.extensions.access_loggers.file.v3.FileAccessLog", M{
			"path":       o.AccessLogPath,
			"log_format": M{"json_format": format},
		}),
	}}
}

func tcpProxy(stat, cluster string, log []M) M {
	return M{"name": "envoy.filters.network.tcp_proxy", "typed_config": typed("envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
		M{"stat_prefix": stat, "cluster": cluster, "access_log": log})}
}

// connLimit caps a chain's open connections at a project's max_connections.
// Envoy counts per filter chain, so on this plane the cap applies per port
// and rule kind rather than per project (README).
func connLimit(chain string, max int) M {
	return M{"name": "envoy.filters.network.connection_limit", "typed_config": typed(
		"envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit",
		M{"stat_prefix": chain, "max_connections": max})}
}

// chainLog is the access log of an allowing chain.
func chainLog(o Settings, project, rule string) []M {
	return accessLog(o, M{"project": project, "verdict": "allow", "rule": rule, "reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%%RESPONSE_FLAGS%"})
}

func action(chain string) M {
	return M{"action": M{"name": chain, "typed_config": typed("google.protobuf.StringValue", M{"value": chain})}}
}

func input(name, t string) M {
	return M{"name": name, "typed_config": typed("envoy.extensions.matching.common_inputs.network.v3."+t, M{})}
}

// chainName names a project's chain: "PROJECT/KIND/PORT".
func chainName(project, kind string, port uint16) string {
	return project + "/" + kind + "/" + strconv.Itoa(int(port))
}

// Listener builds the transparent egress listener for pol's placed
// projects: source /30 → destination port → kind → names, the grouping
// the builtin plane decides by (policy.Project.Ports).
func Listener(pol *policy.Policy, o Settings) M {
	var chains []M
	var projectMatchers []M
	for _, p := range pol.Projects() {
		// With on_policy_change drop, each chain carries a digest of its own
		// rules: changing them replaces (drains) that chain alone, so a
		// project's other ports and kinds keep their connections.
		version := func(parts ...any) string {
			if o.OnPolicyChange == "keep" {
				return ""
			}
			return "#" + digest(parts...)
		}
		// Every placed project has its own refusals, so a denial names
		// its project (the event stream filters by project): one chain
		// for ports no rule names, one for TLS names no sni rule allows.
		denyPort, denySNI := p.Name+"/deny", ""
		chains = append(chains, denyChain(o, denyPort, p.Name, fmt.Sprintf("no rule of project %s allows port %%DOWNSTREAM_LOCAL_PORT%%", p.Name)))
		// One refusal chain per sni deny rule, named after it, so its
		// denials name the rule as the builtin plane's do.
		ruleChains := map[string]bool{}
		ruleChain := func(rule string) string {
			name := p.Name + "/" + rule
			if !ruleChains[name] {
				ruleChains[name] = true
				chains = append(chains, denyRuleChain(o, name, p.Name, rule, "denied by rule "+strings.TrimPrefix(rule, policy.DenyPrefix)))
			}
			return name
		}
		portMap := M{}
		for _, v := range p.Ports() {
			pt := v.Port
			var onPort M // the matcher for this port
			var tlsMatch, httpMatch M
			if len(v.SNI) > 0 || len(v.HTTPS) > 0 {
				name := chainName(p.Name, "tls", pt)
				sni := policy.Patterns(v.SNI)
				// The server-name matcher takes the most specific domain
				// (exact, then the longest "*." suffix, then "*"): the deny
				// rules' patterns get their refusal, and the allow patterns
				// a deny pattern covers are not in sni (policy.PortView), so
				// a deny always wins, as on the builtin plane.
				// An https name (exact: config.EnvoyIssues) has a chain of
				// its own that terminates TLS; sni holds no name an https
				// pattern covers (an https rule takes a name over).
				var domains []M
				if len(sni) > 0 {
					domains = append(domains, M{"domains": sni, "on_match": action(name)})
					chains = append(chains, M{
						"name": name,
						"filters": []M{
							connLimit(name, p.MaxConnections),
							{"name": "envoy.filters.network.sni_dynamic_forward_proxy", "typed_config": typed(
								"envoy.extensions.filters.network.sni_dynamic_forward_proxy.v3.FilterConfig",
								M{"dns_cache_config": dnsCache(o), "port_value": pt})},
							tcpProxy(name+version(sni, policy.Patterns(v.DenySNI)), ClusterTLS, chainLog(o, p.Name, "sni ("+name+")")),
						},
					})
				}
				for _, n := range v.HTTPS {
					rules := p.HTTPSRules(n.Pattern, pt)
					domains = append(domains, M{"domains": []string{n.Pattern}, "on_match": action(httpsChainName(p.Name, pt, n.Pattern))})
					chains = append(chains, httpsChain(o, p, pt, n.Pattern, rules, version(fmt.Sprint(rules))))
				}
				for _, g := range groupByRule(v.DenySNI) {
					domains = append(domains, M{"domains": g.patterns, "on_match": action(ruleChain(g.rule))})
				}
				if denySNI == "" {
					denySNI = p.Name + "/deny/sni"
					chains = append(chains, denyChain(o, denySNI, p.Name, fmt.Sprintf(
						"no sni rule of project %s allows %%REQUESTED_SERVER_NAME%% on port %%DOWNSTREAM_LOCAL_PORT%% (-: not a TLS ClientHello, or no server name)", p.Name)))
				}
				// A ClientHello whose name no sni rule allows is refused
				// here, never handed to a parent's on_no_match (on a port
				// with both kinds, the HTTP chain).
				// Names are matched only once they are host names: a
				// name such as secret\.github.com would match
				// *.github.com, and the forward proxy would resolve it.
				tlsMatch = M{"matcher": M{
					"matcher_list": M{"matchers": []M{{
						"predicate": M{"single_predicate": M{
							"input":       input("sni", "ServerNameInput"),
							"value_match": M{"safe_regex": M{"google_re2": M{}, "regex": hostNameRegex}},
						}},
						"on_match": M{"matcher": M{
							"matcher_tree": M{
								"input": input("sni", "ServerNameInput"),
								"custom_match": M{"name": "sni", "typed_config": typed("xds.type.matcher.v3.ServerNameMatcher", M{
									"domain_matchers": domains,
								})},
							},
							"on_no_match": action(denySNI),
						}},
					}}},
					"on_no_match": action(denySNI),
				}}
			}
			if len(v.HTTP) > 0 {
				name := chainName(p.Name, "http", pt)
				chains = append(chains, httpChain(o, p, name, pt, policy.Patterns(v.HTTP), v.DenyHTTP))
				httpMatch = action(name)
			}
			switch {
			case tlsMatch != nil && httpMatch != nil:
				// Both kinds on one port: the TLS inspector's verdict picks
				// the kind, as the builtin plane's first byte does.
				onPort = M{"matcher": M{
					"matcher_tree": M{
						"input":           input("transport", "TransportProtocolInput"),
						"exact_match_map": M{"map": M{"tls": tlsMatch}},
					},
					"on_no_match": httpMatch,
				}}
			case tlsMatch != nil:
				onPort = tlsMatch
			case httpMatch != nil:
				onPort = httpMatch
			}
			if len(v.CIDRs) > 0 {
				name := chainName(p.Name, "cidr", pt)
				var prefixes []netip.Prefix
				var ranges []M
				for _, c := range v.CIDRs {
					prefixes = append(prefixes, c.Prefix)
					ranges = append(ranges, cidr(c.Prefix))
				}
				chains = append(chains, M{"name": name, "filters": []M{connLimit(name, p.MaxConnections),
					tcpProxy(name+version(prefixes), ClusterOrigDst, chainLog(o, p.Name, "cidr ("+name+")"))}})
				m := M{"matcher_tree": M{
					"input": input("dst-ip", "DestinationIPInput"),
					"custom_match": M{"name": "ip", "typed_config": typed("xds.type.matcher.v3.IPMatcher", M{
						"range_matchers": []M{{"ranges": ranges, "on_match": action(name)}},
					})},
				}}
				if onPort == nil {
					onPort = action(denyPort)
				}
				m["on_no_match"] = onPort
				onPort = M{"matcher": m}
			}
			if onPort != nil {
				portMap[strconv.Itoa(int(pt))] = onPort
			}
		}
		onProject := action(denyPort) // a project with no rules
		if len(portMap) > 0 {
			onProject = M{"matcher": M{
				"matcher_tree": M{
					"input":           input("dst-port", "DestinationPortInput"),
					"exact_match_map": M{"map": portMap},
				},
				"on_no_match": action(denyPort),
			}}
		}
		projectMatchers = append(projectMatchers, M{"ranges": []M{cidr(p.Subnet)}, "on_match": onProject})
	}
	l := M{
		"name":              ListenerName,
		"address":           M{"socket_address": M{"address": "0.0.0.0", "port_value": o.TProxyPort}},
		"transparent":       true,
		"traffic_direction": "OUTBOUND",
		"listener_filters": []M{
			{"name": "envoy.filters.listener.original_dst", "typed_config": typed("envoy.extensions.filters.listener.original_dst.v3.OriginalDst", M{})},
			// The inspector ends as soon as the first bytes are not a TLS
			// record, so plain HTTP on a port with both kinds of rule does
			// not wait for listener_filters_timeout.
			{"name": "envoy.filters.listener.tls_inspector", "typed_config": typed("envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector", M{}),
				// Never wait for a ClientHello on a port no sni rule names:
				// server-first protocols (cidr rules) must work.
				"filter_disabled": inspectorDisabled(tlsPorts(pol))},
		},
		// Connections that never reach a filter chain (closed, or silent
		// for listener_filters_timeout, before the TLS inspector saw a
		// ClientHello) are logged by the listener itself.
		"access_log":                           listenerLog(o),
		"listener_filters_timeout":             "10s",
		"continue_on_listener_filters_timeout": false,
		// Sources in no project end here.
		"default_filter_chain": denyChain(o, defaultDeny, "", "source address is in no project"),
	}
	if len(chains) > 0 {
		l["filter_chains"] = chains
		l["filter_chain_matcher"] = M{"matcher_tree": M{
			"input": input("src-ip", "SourceIPInput"),
			"custom_match": M{"name": "projects", "typed_config": typed("xds.type.matcher.v3.IPMatcher", M{
				"range_matchers": projectMatchers,
			})},
		}}
	} else {
		// Envoy needs at least one chain to use the matcher; with none, all
		// connections take the deny chain.
		l["filter_chains"] = []M{{"name": "unused", "filter_chain_match": M{"destination_port": 1}, "filters": []M{tcpProxy("unused", ClusterDeny, nil)}}}
	}
	return l
}

// unchainedCEL is true for a connection no filter chain took.
var unchainedCEL = "xds.filter_chain_name == ''"

// listenerLog is the listener's own access log: Envoy writes it for a
// connection that ends before a filter chain takes it (the client closed,
// or sent nothing within listener_filters_timeout, while the TLS inspector
// waited for a ClientHello). The source's project is unknown here.
func listenerLog(o Settings) []M {
	log := accessLog(o, M{"project": "", "verdict": "deny", "rule": "",
		"reason": "no TLS ClientHello before the connection closed or timed out (%RESPONSE_FLAGS%)"})
	if log == nil {
		return nil
	}
	log[0]["filter"] = M{"extension_filter": M{"name": "envoy.access_loggers.extension_filters.cel", "typed_config": typed(
		"envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter", M{"expression": unchainedCEL})}}
	return log
}

// denyRuleChain is denyChain for the connections a deny rule refuses: its
// log line names the rule.
func denyRuleChain(o Settings, name, project, rule, reason string) M {
	return M{"name": name, "filters": []M{tcpProxy("deny", ClusterDeny,
		accessLog(o, M{"project": project, "verdict": "deny", "rule": rule, "reason": reason}))}}
}

// ruleGroup is the patterns of one deny rule.
type ruleGroup struct {
	rule     string
	patterns []string
}

// groupByRule groups name patterns by the rule they come from, in the
// order rules first appear.
func groupByRule(ns []policy.NameRule) []ruleGroup {
	var out []ruleGroup
	at := map[string]int{}
	for _, n := range ns {
		i, ok := at[n.Rule]
		if !ok {
			i = len(out)
			at[n.Rule] = i
			out = append(out, ruleGroup{rule: n.Rule})
		}
		out[i].patterns = append(out[i].patterns, n.Pattern)
	}
	return out
}

// denyChain refuses every connection (the spec's reject cluster,
// 127.0.0.1:1 where nothing listens: the upstream attempt fails at once and
// the guest gets a reset) and logs the denial with project and reason.
func denyChain(o Settings, name, project, reason string) M {
	return M{"name": name, "filters": []M{tcpProxy("deny", ClusterDeny,
		accessLog(o, M{"project": project, "verdict": "deny", "rule": "", "reason": reason}))}}
}

// digest is a short digest of the values given.
func digest(parts ...any) string {
	h := sha256.New()
	for _, p := range parts {
		fmt.Fprintln(h, p)
	}
	return hex.EncodeToString(h.Sum(nil)[:4])
}

// httpLogs log each request: "allow" when an allowed route took it (the
// route turns on the set_metadata filter, which runs after the body check,
// so the verdict is in the request's dynamic metadata), "deny" otherwise:
// a downstream protocol error (DPE: TLS or raw bytes on an http port, a
// malformed request) is "not an HTTP request", a 403 is the policy's
// refusal, any other status is named by its details. Envoy's access-log
// filters have no "not", but a metadata filter can pass a missing key.
func httpLogs(o Settings, project, chain string) []M {
	if o.AccessLogPath == "" {
		return nil
	}
	status := func(op string, v int) M {
		return M{"status_code_filter": M{"comparison": M{"op": op, "value": M{"default_value": v, "runtime_key": "vmegress.status"}}}}
	}
	// allowed(true) passes a request whose verdict is "allow";
	// allowed(false) one without a verdict (only "allow" is ever set; the
	// filter's matcher has no working invert, a missing key decides).
	allowed := func(yes bool) M {
		want := "allow"
		if !yes {
			want = "never set"
		}
		return M{"metadata_filter": M{"matcher": M{
			"filter": verdictNamespace, "path": []M{{"key": "verdict"}},
			"value": M{"string_match": M{"exact": want}},
		}, "match_if_key_not_found": !yes}}
	}
	and := func(fs ...M) M { return M{"and_filter": M{"filters": fs}} }
	fields := func(verdict, reason string) M {
		return M{"project": project, "host": "%REQ(:AUTHORITY)%", "status": "%RESPONSE_CODE%",
			"verdict": verdict, "rule": "http (" + chain + ")", "reason": reason}
	}
	log := func(f M, verdict, reason string) M {
		l := accessLog(o, fields(verdict, reason))[0]
		l["filter"] = f
		return l
	}
	return []M{
		log(allowed(true), "allow", "%RESPONSE_FLAGS%"),
		// A local 400 is a request Envoy could not take: DPE or not.
		log(and(allowed(false), M{"or_filter": M{"filters": []M{M{"response_flag_filter": M{"flags": []string{"DPE"}}}, status("EQ", 400)}}}), "deny",
			"not an HTTP request (%RESPONSE_CODE_DETAILS%)"),
		// %RESPONSE_CODE_DETAILS% tells the two refusals apart:
		// "direct_response" (the host) or
		// "rbac_access_denied_matched_policy[...]" (a body).
		log(and(allowed(false), status("EQ", 403)), "deny",
			"no http rule of project "+project+" allows this host (or a deny rule refuses it, or it is not a valid host name), or a GET/HEAD/OPTIONS/TRACE carries a body (%RESPONSE_CODE_DETAILS%)"),
		// Anything else refused before a rule allowed it: a body too
		// large to check (413), a client gone before its request ended.
		log(and(allowed(false), M{"or_filter": M{"filters": []M{status("LE", 399), status("GE", 404)}}}), "deny",
			"refused before any rule allowed it (%RESPONSE_CODE% %RESPONSE_CODE_DETAILS% %RESPONSE_FLAGS%)"),
	}
}

// tlsPorts are the ports some project's sni rules name.
func tlsPorts(pol *policy.Policy) []uint16 {
	seen := map[uint16]bool{}
	for _, p := range pol.Projects() {
		for _, v := range p.Ports() {
			if len(v.SNI) > 0 || len(v.HTTPS) > 0 {
				seen[v.Port] = true
			}
		}
	}
	out := make([]uint16, 0, len(seen))
	for pt := range seen {
		out = append(out, pt)
	}
	slices.Sort(out)
	return out
}

// inspectorDisabled is the predicate that turns the TLS inspector off on
// every destination port but ports.
func inspectorDisabled(ports []uint16) M {
	var rules []M
	for _, pt := range ports {
		rules = append(rules, M{"destination_port_range": M{"start": pt, "end": int(pt) + 1}})
	}
	switch len(rules) {
	case 0:
		return M{"any_match": true}
	case 1:
		return M{"not_match": rules[0]}
	}
	return M{"not_match": M{"or_match": M{"rules": rules}}}
}

// httpChain is an HTTP connection manager whose route allows the project's
// http names through the forward proxy and answers 403 to the rest. The
// deny rules' patterns (deny) are virtual hosts of their own answering
// 403: Envoy picks the most specific domain (exact, then the longest
// suffix wildcard, then "*") and names holds no pattern a deny pattern
// covers (policy.PortView), so a deny always wins, as on the builtin plane.
func httpChain(o Settings, p *policy.Project, name string, port uint16, names []string, deny []policy.NameRule) M {
	body := fmt.Sprintf("vmegress: egress policy of project %s refused this request\n", p.Name)
	invalidHost := fmt.Sprintf("vmegress: egress policy of project %s refused this request: the host is not a valid host name\n", p.Name)
	allowed := M{"match": M{"prefix": "/"}, "route": M{"cluster": ClusterHTTP}}
	// An empty config (no @type) turns the HCM's disabled filter on with
	// the HCM's own config.
	enableVerdict := typed("envoy.config.route.v3.FilterConfig", M{"config": M{}, "disabled": false})
	var filters []M
	if port != defaultHTTPPort {
		// The forward proxy dials the Host's port, else 80: the Host gets
		// the connection's own port (a Host naming another port never gets
		// here: it matches no allowed domain, see strip_matching_host_port),
		// so the upstream port is always the port the guest connected to.
		filters = append(filters, M{"name": "envoy.filters.http.header_mutation", "typed_config": typed(
			"envoy.extensions.filters.http.header_mutation.v3.HeaderMutation", M{"mutations": M{"request_mutations": []M{{
				"append": M{"header": M{"key": upstreamHeader, "value": "%REQ(:AUTHORITY)%:" + strconv.Itoa(int(port))},
					"append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
			}}}})})
		allowed["typed_per_filter_config"] = M{"envoy.filters.http.dynamic_forward_proxy": typed(
			"envoy.extensions.filters.http.dynamic_forward_proxy.v3.PerRouteConfig", M{"host_rewrite_header": upstreamHeader})}
	}
	// Envoy's HTTP/1 codec drops "Transfer-Encoding: chunked" from the
	// request headers, so a chunked body is invisible to RBAC: bodiless
	// methods are buffered (the buffer filter then sets Content-Length)
	// before RBAC looks; other methods are not buffered (per route).
	// The verdict goes into the request's dynamic metadata (for the access
	// log) only on allowed routes, and only once the body check passed.
	filters = append([]M{
		{"name": bufferFilter, "typed_config": typed("envoy.extensions.filters.http.buffer.v3.Buffer", M{"max_request_bytes": maxBodilessBody})},
		bodilessMethods(),
		{"name": setMetadataFilter, "disabled": true, "typed_config": typed("envoy.extensions.filters.http.set_metadata.v3.Config", M{
			"metadata": []M{{"metadata_namespace": verdictNamespace, "value": M{"verdict": "allow"}}}})},
	}, filters...)
	noBuffer := M{bufferFilter: typed("envoy.extensions.filters.http.buffer.v3.BufferPerRoute", M{"disabled": true})}
	// allowed, for bodiless methods (buffered) and for the rest (not).
	// Only a Host that is a host name is allowed: one that matches a
	// domain only through bytes a resolver reads otherwise (secret\.github.com
	// under *.github.com) takes the last route, a 403.
	validHost := M{"name": ":authority", "string_match": M{"safe_regex": M{"regex": hostNameRegex}}}
	allowed["match"].(M)["headers"] = []M{validHost}
	bodiless := M{"match": M{"prefix": "/", "headers": []M{{"name": ":method", "string_match": M{"safe_regex": M{"regex": "^(GET|HEAD|OPTIONS|TRACE)$"}}}, validHost}},
		"route": allowed["route"]}
	if pf, ok := allowed["typed_per_filter_config"]; ok {
		bodiless["typed_per_filter_config"] = M{"envoy.filters.http.dynamic_forward_proxy": pf.(M)["envoy.filters.http.dynamic_forward_proxy"], setMetadataFilter: enableVerdict}
		allowed["typed_per_filter_config"] = M{"envoy.filters.http.dynamic_forward_proxy": pf.(M)["envoy.filters.http.dynamic_forward_proxy"], bufferFilter: noBuffer[bufferFilter], setMetadataFilter: enableVerdict}
	} else {
		bodiless["typed_per_filter_config"] = M{setMetadataFilter: enableVerdict}
		allowed["typed_per_filter_config"] = M{bufferFilter: noBuffer[bufferFilter], setMetadataFilter: enableVerdict}
	}
	filters = append(filters,
		M{"name": "envoy.filters.http.dynamic_forward_proxy", "typed_config": typed("envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig",
			M{"dns_cache_config": dnsCache(o)})},
		M{"name": "envoy.filters.http.router", "typed_config": typed("envoy.extensions.filters.http.router.v3.Router", M{})})
	vhosts := []M{{"name": "allowed", "domains": names, "routes": []M{bodiless, allowed, {"match": M{"prefix": "/"},
		"typed_per_filter_config": noBuffer, "direct_response": M{"status": 403, "body": M{"inline_string": invalidHost}}}}}}
	for _, g := range groupByRule(deny) {
		refused := fmt.Sprintf("vmegress: egress policy of project %s refused this request: denied by rule %s\n", p.Name, strings.TrimPrefix(g.rule, policy.DenyPrefix))
		vhosts = append(vhosts, M{"name": g.rule, "domains": g.patterns, "typed_per_filter_config": noBuffer, "routes": []M{{"match": M{"prefix": "/"},
			"direct_response": M{"status": 403, "body": M{"inline_string": refused}}}}})
	}
	if !slices.Contains(names, config.AnyName) {
		// Every other host: refused. (With http "*" allowed, the allowed
		// virtual host is the catch-all; its last route refuses hosts that
		// are not host names.)
		vhosts = append(vhosts, M{"name": "denied", "domains": []string{"*"}, "typed_per_filter_config": noBuffer, "routes": []M{{"match": M{"prefix": "/"},
			"direct_response": M{"status": 403, "body": M{"inline_string": body}}}}})
	}
	return M{
		"name": name,
		"filters": []M{connLimit(name, p.MaxConnections), {
			"name": "envoy.filters.network.http_connection_manager",
			"typed_config": typed("envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", M{
				"stat_prefix": name,
				"route_config": M{
					"name":                      name,
					"virtual_hosts":             vhosts,
					"request_headers_to_remove": []string{upstreamHeader},
				},
				// A Host port equal to the connection's (original
				// destination) port is dropped before routing; any other
				// port stays, matches no allowed name and gets the 403.
				"strip_matching_host_port": true,
				"access_log":               httpLogs(o, p.Name, name),
				"http_filters":             filters,
			}),
		}},
	}
}

// bodilessMethods is an RBAC filter that refuses (403) a GET, HEAD, OPTIONS
// or TRACE carrying a body (a Content-Length other than 0, or any
// Transfer-Encoding): an origin that ignores bodies on such methods would
// read the body as the next request, one no rule checked (smuggling).
func bodilessMethods() M {
	header := func(name string, match M) M {
		match["name"] = name
		return M{"header": match}
	}
	var methods []M
	for _, m := range []string{"GET", "HEAD", "OPTIONS", "TRACE"} {
		methods = append(methods, header(":method", M{"string_match": M{"exact": m}}))
	}
	body := []M{
		{"and_rules": M{"rules": []M{
			header("content-length", M{"present_match": true}),
			{"not_rule": header("content-length", M{"string_match": M{"exact": "0"}})},
		}}},
		header("transfer-encoding", M{"present_match": true}),
	}
	return M{"name": "envoy.filters.http.rbac", "typed_config": typed("envoy.extensions.filters.http.rbac.v3.RBAC", M{
		"rules": M{"action": "DENY", "policies": M{bodyPolicy: M{
			"permissions": []M{{"and_rules": M{"rules": []M{{"or_rules": M{"rules": methods}}, {"or_rules": M{"rules": body}}}}}},
			"principals":  []M{{"any": true}},
		}}},
	})}
}

// Bootstrap is the standalone configuration (spec 6.6) with the policy applied.
// Terminated chains' certificates and secrets are static secrets of the
// bootstrap (what renders is left out; Check refuses such a policy for
// the standalone bootstrap, which would carry keys and secrets: tests
// validate it).
func Bootstrap(pol *policy.Policy, o Settings) M {
	o.staticSecrets = true
	res := M{
		"listeners": []M{Listener(pol, o)},
		"clusters":  clusters(pol, o),
	}
	sec, broken, _ := Secrets(pol, o)
	o.brokenInject = broken
	res["listeners"] = []M{Listener(pol, o)}
	if len(sec) > 0 {
		res["secrets"] = sec
	}
	return M{"admin": admin(o), "static_resources": res}
}

// JSON renders m indented.
func JSON(m M) []byte {
	b, _ := json.MarshalIndent(m, "", "  ")
	return b
}

// Check refuses a policy a standalone Envoy cannot carry out as the builtin plane does,
// naming the project and what it asks for; callers run it when a config
// with dataplane envoy is loaded (and before each policy push), so the two
// planes never differ silently.
func Check(pol *policy.Policy) error {
	var errs []error
	for _, p := range pol.All() {
		if p.Audit {
			errs = append(errs, fmt.Errorf("project %q: mode audit needs dataplane builtin (Envoy cannot allow a connection and log that the policy would refuse it)", p.Name))
		}
	}
	if pol.Terminates() {
		errs = append(errs, errors.New("https rules need vmegress run (the certificates and secrets are served to Envoy over xDS; a standalone bootstrap would carry private keys and secrets)"))
	}
	return errors.Join(errs...)
}
