package envoy

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"

	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/nettest"
	"github.com/vmegress/vmegress/internal/policy"
)

const testConfig = `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: github.com
      - sni: "*.github.com"
      - http: www.github.com
      - cidr: 198.51.100.0/24
        ports: [22, 443]
  beta:
    subnet: 172.31.0.4/30
    allow:
      - sni: api.example.org
        ports: [8443]
  empty:
    subnet: 172.31.0.8/30
`

var testOptions = Settings{TProxyPort: 15001, UpstreamMark: 0x2, VMCIDR: netip.MustParsePrefix("172.31.0.0/16"),
	Upstreams: []string{"192.0.2.53:53"}, AdminAddress: netip.MustParseAddrPort("127.0.0.1:9902"), AccessLogPath: "/dev/stdout"}

// mustPolicy compiles the config y.
func mustPolicy(t testing.TB, y string) *policy.Policy {
	t.Helper()
	cfg, err := config.Parse("t.yaml", []byte(y))
	if err != nil {
		t.Fatal(err)
	}
	pol, err := policy.Compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return pol
}

// TestResources: the generated configuration converts to Envoy's typed
// protos (every @type known, every field name right).
func TestResources(t *testing.T) {
	res, err := Resources(mustPolicy(t, testConfig), testOptions)
	if err != nil {
		t.Fatal(err)
	}
	if len(res[resourcev3.ListenerType]) != 1 || len(res[resourcev3.ClusterType]) != 4 {
		t.Errorf("resources: %d listeners, %d clusters", len(res[resourcev3.ListenerType]), len(res[resourcev3.ClusterType]))
	}
	js := string(JSON(Listener(mustPolicy(t, testConfig), testOptions)))
	for _, want := range []string{`"alpha/tls/443"`, `"alpha/http/80"`, `"alpha/cidr/22"`, `"beta/tls/8443"`, `"172.31.0.4"`} {
		if !strings.Contains(js, want) {
			t.Errorf("listener lacks %s", want)
		}
	}
	// A project without rules has its refusal and nothing else.
	var empty []string
	for _, c := range Listener(mustPolicy(t, testConfig), testOptions)["filter_chains"].([]M) {
		if name := c["name"].(string); strings.HasPrefix(name, "empty/") {
			empty = append(empty, name)
		}
	}
	if fmt.Sprint(empty) != "[empty/deny]" {
		t.Errorf("a project without rules has chains %v; want its refusal alone", empty)
	}
}

// TestBootstrapValidates runs `envoy --mode validate` on the static bootstrap.
func TestBootstrapValidates(t *testing.T) {
	nettest.Privileged(t, "envoy")
	dir := t.TempDir()
	for name, b := range map[string]M{
		"static.json": Bootstrap(mustPolicy(t, testConfig), testOptions),
		"empty.json":  Bootstrap(mustPolicy(t, "projects: {}\n"), testOptions),
		"either.json": Bootstrap(mustPolicy(t, eitherConfig), testOptions),
		"xds.json":    XDSBootstrap(withAdminSocket(testOptions, filepath.Join(dir, "admin.sock")), filepath.Join(dir, "xds.sock")),
	} {
		path := filepath.Join(dir, name)
		os.WriteFile(path, JSON(b), 0o644)
		if out, err := exec.Command("envoy", "--mode", "validate", "-c", path).CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s", name, err, out)
		}
	}
}

// eitherConfig has a port with both an sni and an http rule.
const eitherConfig = `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: a.example
        ports: [8080]
      - http: b.example
        ports: [8080]
`

// TestEitherPort: on a port with both kinds of rule, the TLS inspector runs
// and its verdict picks the chain: "tls" → the SNI matcher (whose misses
// are refused, not handed to HTTP), anything else → the HTTP chain.
func TestEitherPort(t *testing.T) {
	l := Listener(mustPolicy(t, eitherConfig), testOptions)
	js := string(JSON(l))
	for _, want := range []string{`"alpha/tls/8080"`, `"alpha/http/8080"`, `TransportProtocolInput`} {
		if !strings.Contains(js, want) {
			t.Errorf("listener lacks %s", want)
		}
	}
	onPort := l["filter_chain_matcher"].(M)["matcher_tree"].(M)["custom_match"].(M)["typed_config"].(M)["range_matchers"].([]M)[0]["on_match"].(M)["matcher"].(M)["matcher_tree"].(M)["exact_match_map"].(M)["map"].(M)["8080"].(M)["matcher"].(M)
	if got := onPort["on_no_match"].(M)["action"].(M)["name"]; got != "alpha/http/8080" {
		t.Errorf("not TLS on 8080 goes to %v; want alpha/http/8080", got)
	}
	tls := onPort["matcher_tree"].(M)["exact_match_map"].(M)["map"].(M)["tls"].(M)["matcher"].(M)
	if got := tls["on_no_match"].(M)["action"].(M)["name"]; got != "alpha/deny/sni" {
		t.Errorf("TLS with another name on 8080 goes to %v; want alpha/deny/sni", got)
	}
	if got := fmt.Sprint(l["listener_filters"].([]M)[1]["filter_disabled"]); !strings.Contains(got, "8080") {
		t.Errorf("the TLS inspector is not enabled on 8080: %s", got)
	}
	if _, err := Resources(mustPolicy(t, eitherConfig), testOptions); err != nil {
		t.Fatal(err)
	}
}

// TestCheck: what Envoy cannot do is refused, naming the project.
func TestCheck(t *testing.T) {
	if err := Check(mustPolicy(t, testConfig)); err != nil {
		t.Errorf("Check(testConfig) = %v", err)
	}
	err := Check(mustPolicy(t, "projects:\n  gamma:\n    mode: audit\n    allow: [{sni: a.example}]\n"))
	if err == nil || !strings.Contains(err.Error(), `project "gamma": mode audit`) {
		t.Errorf("Check(audit) = %v; want a refusal naming gamma", err)
	}
}

// TestNoSearchDomains: every DNS resolver config asks names as they are.
func TestNoSearchDomains(t *testing.T) {
	js := string(JSON(Bootstrap(mustPolicy(t, testConfig), testOptions)))
	resolvers := strings.Count(js, `"envoy.network.dns_resolver.cares"`)
	if n := strings.Count(js, `"no_default_search_domain": true`); resolvers == 0 || n != resolvers {
		t.Errorf("%d of %d c-ares resolver configs have no_default_search_domain", n, resolvers)
	}
}

func withAdminSocket(o Settings, path string) Settings {
	o.AdminSocket = path
	return o
}

// TestAdminSocket: with AdminSocket, the admin is a 0600 unix socket and
// no TCP address; the supervisor's readiness probe speaks HTTP over it.
func TestAdminSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "admin.sock")
	js := string(JSON(XDSBootstrap(withAdminSocket(testOptions, sock), "/x.sock")))
	if !strings.Contains(js, `"path": "`+sock+`"`) || !strings.Contains(js, `"mode": 384`) || strings.Contains(js, "9902") {
		t.Errorf("admin is not the 0600 socket alone:\n%s", js)
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var listeners atomic.Value // what /listeners answers
	listeners.Store("other")
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ready":
			fmt.Fprintln(w, "LIVE")
		case "/listeners":
			fmt.Fprintln(w, listeners.Load())
		}
	})}
	go srv.Serve(ln)
	defer srv.Close()
	s := &Supervisor{AdminSocket: sock}
	if s.Ready(context.Background()) {
		t.Error("ready without the egress listener")
	}
	listeners.Store(ListenerName)
	if !s.Ready(context.Background()) {
		t.Error("not ready with LIVE and the egress listener")
	}
}

// TestBodilessMethods: every http chain buffers bodiless methods (so a
// chunked body gets a Content-Length) and refuses them with a body.
func TestBodilessMethods(t *testing.T) {
	js := string(JSON(Listener(mustPolicy(t, testConfig), testOptions)))
	for _, want := range []string{`"` + bodyPolicy + `"`, `"envoy.filters.http.buffer"`, `"^(GET|HEAD|OPTIONS|TRACE)$"`, `"transfer-encoding"`} {
		if !strings.Contains(js, want) {
			t.Errorf("the http chain lacks %s", want)
		}
	}
}

// TestHTTPLogVerdicts: an http chain logs "allow" only for a request an
// allowed route took (the route turns on the verdict metadata), and
// "deny" for a downstream protocol error (TLS or raw bytes on an http port)
// and for the 403s; each deny log wants the verdict missing.
func TestHTTPLogVerdicts(t *testing.T) {
	logs := httpLogs(testOptions, "alpha", "alpha/http/80")
	var allow, dpe int
	for _, l := range logs {
		f := string(JSON(l["filter"].(M)))
		verdict := l["typed_config"].(M)["log_format"].(M)["json_format"].(M)["verdict"]
		switch {
		case verdict == "allow":
			allow++
			if !strings.Contains(f, `"match_if_key_not_found": false`) || !strings.Contains(f, `"exact": "allow"`) {
				t.Errorf("the allow log does not want the allow verdict: %s", f)
			}
		case !strings.Contains(f, `"match_if_key_not_found": true`):
			t.Errorf("a deny log does not want the verdict missing: %s", f)
		}
		if strings.Contains(f, `"DPE"`) {
			dpe++
			if verdict != "deny" {
				t.Errorf("a DPE is logged %v", verdict)
			}
		}
	}
	if allow != 1 || dpe != 1 {
		t.Errorf("%d allow logs and %d DPE logs; want one each", allow, dpe)
	}
	js := string(JSON(httpChain(testOptions, mustPolicy(t, testConfig).Projects()[0], "alpha/http/80", 80, []string{"www.github.com"}, nil)))
	if strings.Count(js, `envoy.config.route.v3.FilterConfig"`) != 2 || !strings.Contains(js, `"disabled": true`) {
		t.Errorf("the verdict filter is not off by default and on in the two allowed routes:\n%s", js)
	}
}

// TestListenerLog: a connection that never reaches a filter chain (closed
// or silent before a ClientHello) is logged by the listener, as a denial;
// connections a chain took are not logged twice (Envoy 1.40 writes the
// listener's log for every connection, so the log is filtered on the
// chain's name being empty).
func TestListenerLog(t *testing.T) {
	l := Listener(mustPolicy(t, testConfig), testOptions)
	logs, _ := l["access_log"].([]M)
	if len(logs) != 1 {
		t.Fatalf("listener access logs: %v", logs)
	}
	js := string(JSON(logs[0]))
	for _, want := range []string{`"verdict": "deny"`, `"expression": "xds.filter_chain_name == ''"`} {
		if !strings.Contains(js, want) {
			t.Errorf("the listener's log lacks %s:\n%s", want, js)
		}
	}
	if l := Listener(mustPolicy(t, testConfig), Settings{TProxyPort: 15001}); len(l["access_log"].([]M)) != 0 {
		t.Errorf("a listener log without a log path: %v", l["access_log"])
	}
}

// TestProjectDenials: every placed project's refusals are its own chains,
// named in each matcher's on_no_match (ports no rule names, TLS names no
// sni rule allows), so a denial's log line names the project; only sources
// in no project take the shared default chain.
func TestProjectDenials(t *testing.T) {
	l := Listener(mustPolicy(t, testConfig), testOptions)
	js := string(JSON(l))
	for _, want := range []string{
		`"project": "alpha"`, `"no rule of project alpha allows port %DOWNSTREAM_LOCAL_PORT%"`,
		`"no sni rule of project alpha allows %REQUESTED_SERVER_NAME% on port %DOWNSTREAM_LOCAL_PORT%`,
		`"no rule of project empty allows port %DOWNSTREAM_LOCAL_PORT%"`,
	} {
		if !strings.Contains(js, want) {
			t.Errorf("listener lacks %s", want)
		}
	}
	projects := l["filter_chain_matcher"].(M)["matcher_tree"].(M)["custom_match"].(M)["typed_config"].(M)["range_matchers"].([]M)
	for _, pm := range projects {
		on := pm["on_match"].(M)
		if a, ok := on["action"].(M); ok { // a project without rules
			if a["name"] != "empty/deny" {
				t.Errorf("project %v takes %v", pm["ranges"], a["name"])
			}
			continue
		}
		m := on["matcher"].(M)
		if m["on_no_match"] == nil {
			t.Errorf("project %v: a port no rule names has no refusal of its own", pm["ranges"])
		}
		for port, pt := range m["matcher_tree"].(M)["exact_match_map"].(M)["map"].(M) {
			if pm, ok := pt.(M)["matcher"].(M); ok && pm["on_no_match"] == nil {
				t.Errorf("port %s: no refusal of its own", port)
			}
		}
	}
	def := string(JSON(l["default_filter_chain"].(M)))
	if !strings.Contains(def, `"project": ""`) || !strings.Contains(def, "source address is in no project") {
		t.Errorf("default chain: %s", def)
	}
}

// hostNameByLabels is hostNameRegex written out: labels split on '.', none
// empty, each of config.IsHostByte bytes, none starting or ending with '-'.
func hostNameByLabels(s string) bool {
	for _, l := range strings.Split(s, ".") {
		if l == "" || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for i := 0; i < len(l); i++ {
			if !config.IsHostByte(l[i]) {
				return false
			}
		}
	}
	return true
}

// FuzzHostNameRegex: the regex Envoy checks server names and hosts with
// admits exactly the host names hostNameByLabels does (RE2 and Go's regexp
// share the syntax).
func FuzzHostNameRegex(f *testing.F) {
	for _, s := range []string{"github.com", `secret\.github.com`, "a..b", ".a", "a.", "-a.b", "a_b.c", "xn--bcher-kva.example", "a:443", "", "é.com"} {
		f.Add(s)
	}
	re := regexp.MustCompile(hostNameRegex)
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := re.MatchString(s), hostNameByLabels(s); got != want {
			t.Errorf("%q: regex %v, labels %v", s, got, want)
		}
	})
}

// TestNamesCheckedFirst: a TLS server name reaches the sni rules' domain
// matcher only through the host-name check (else the project's sni
// refusal), and an HTTP Host reaches the forward proxy only through it
// (else a 403): secret\.github.com never matches *.github.com.
func TestNamesCheckedFirst(t *testing.T) {
	l := Listener(mustPolicy(t, testConfig), testOptions)
	alpha := l["filter_chain_matcher"].(M)["matcher_tree"].(M)["custom_match"].(M)["typed_config"].(M)["range_matchers"].([]M)[0]
	on443 := alpha["on_match"].(M)["matcher"].(M)["matcher_tree"].(M)["exact_match_map"].(M)["map"].(M)["443"].(M)
	// 443 has a cidr rule too: its IP matcher falls back to the sni check.
	tls := on443["matcher"].(M)["on_no_match"].(M)["matcher"].(M)
	check := tls["matcher_list"].(M)["matchers"].([]M)[0]
	if got := fmt.Sprint(check["predicate"]); !strings.Contains(got, hostNameRegex) || !strings.Contains(got, "ServerNameInput") {
		t.Errorf("the sni matcher does not check the name first: %s", got)
	}
	if !strings.Contains(fmt.Sprint(check["on_match"]), "ServerNameMatcher") || fmt.Sprint(tls["on_no_match"]) == "<nil>" ||
		tls["on_no_match"].(M)["action"].(M)["name"] != "alpha/deny/sni" {
		t.Errorf("sni matcher: %s", JSON(tls))
	}
	js := string(JSON(httpChain(testOptions, mustPolicy(t, testConfig).Projects()[0], "alpha/http/80", 80, []string{"*.github.com"}, nil)))
	if strings.Count(js, `":authority"`) != 2 || strings.Count(js, hostNameRegexJSON()) != 2 || !strings.Contains(js, "is not a valid host name") {
		t.Errorf("the allowed routes do not check the Host:\n%s", js)
	}
}

func hostNameRegexJSON() string {
	b, _ := json.Marshal(hostNameRegex)
	return string(b)
}

const denyConfig = `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - sni: "*"
      - http: "*"
      - sni: api.blocked.example   # under a denied wildcard: must not win
      - http: www.github.com
    deny:
      - sni: example.com
      - http: example.com
      - sni: "*.blocked.example"
`

// TestDenyRendered: sni deny rules are domains of the server-name matcher
// whose action is a refusal chain naming the rule, http deny rules are 403
// virtual hosts; allow patterns a deny pattern covers are not rendered (the
// matcher picks the most specific domain, so they would beat the deny);
// http "*" is the catch-all virtual host. Envoy validates the result.
func TestDenyRendered(t *testing.T) {
	pol := mustPolicy(t, denyConfig)
	l := Listener(pol, testOptions)
	js := string(JSON(l))
	for _, want := range []string{`"alpha/deny/sni:example.com"`, `"alpha/deny/sni:*.blocked.example"`, `"rule": "deny/sni:example.com"`,
		`"name": "deny/http:example.com"`, `denied by rule http:example.com`} {
		if !strings.Contains(js, want) {
			t.Errorf("listener lacks %s", want)
		}
	}
	if strings.Contains(js, "api.blocked.example") {
		t.Error("the exact allow under a denied wildcard is rendered: it would beat the deny")
	}
	// The sni matcher's domains: allow "*", deny example.com and *.blocked.example.
	re := regexp.MustCompile(`"domains": \[\s*([^\]]*)\]`)
	var got []string
	for _, m := range re.FindAllStringSubmatch(js, -1) {
		got = append(got, strings.Join(strings.Fields(m[1]), " "))
	}
	want := []string{`"*"`, `"*.blocked.example"`, `"example.com"`, `"*", "www.github.com"`, `"example.com"`}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("domains %q; want %q (and no catch-all 403 next to http \"*\")", got, want)
	}
	if _, err := Resources(pol, testOptions); err != nil {
		t.Fatal(err)
	}
	nettest.Privileged(t, "envoy")
	path := filepath.Join(t.TempDir(), "deny.json")
	os.WriteFile(path, JSON(Bootstrap(pol, testOptions)), 0o644)
	if out, err := exec.Command("envoy", "--mode", "validate", "-c", path).CombinedOutput(); err != nil {
		t.Errorf("envoy --mode validate: %v\n%s", err, out)
	}
}

// TestClustersNotCappedAt1024: every cluster lifts Envoy's default circuit
// breakers (1024 connections per cluster, shared by every guest of the
// host); projects are capped by their own chains.
func TestClustersNotCappedAt1024(t *testing.T) {
	for _, c := range clusters(mustPolicy(t, "projects:\n  a:\n    subnet: 172.31.0.0/30\n    allow:\n      - https: api.example\n"), Settings{}) {
		th := c["circuit_breakers"].(M)["thresholds"].([]M)[0]
		for _, k := range []string{"max_connections", "max_pending_requests", "max_requests"} {
			if v, _ := th[k].(int); v <= 1024 {
				t.Errorf("cluster %v: %s = %v", c["name"], k, th[k])
			}
		}
	}
}
