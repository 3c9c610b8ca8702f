package envoy

import (
	"errors"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/vmegress/vmegress/internal/nettest"
	"github.com/vmegress/vmegress/internal/policy"
	"github.com/vmegress/vmegress/internal/tlsca"
)

const httpsConfig = `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - https: api.example.com
        methods: [GET]
        paths: ["/v1/*", /health]
        inject: {Authorization: "Bearer ${secret:apikey}"}
      - https: api.example.com
        methods: [POST]
        paths: [/v1/chat]
      - https: example.com
        ports: [8443]
      - sni: "*.example.com"
      - sni: api.example.com
        ports: [8443]
  beta:
    subnet: 172.31.0.4/30
    allow:
      - https: api.example.com
    deny:
      - sni: api.example.com
`

const testSecret = "sk-unit-Secret-1b2c"

// termOptions are testOptions with a CA, a secret store and roots.
func termOptions(t *testing.T) Settings {
	t.Helper()
	ca, err := tlsca.Load(filepath.Join(t.TempDir(), "ca"), tlsca.Options{})
	if err != nil {
		t.Fatal(err)
	}
	o := testOptions
	o.Leaf = ca.Leaf
	o.Secret = func(name string) (string, error) {
		if name == "apikey" {
			return testSecret, nil
		}
		return "", errors.New("no such secret")
	}
	o.UpstreamRoots = ca.CertPEM()
	return o
}

// TestHTTPSRendered: an https name gets a chain of its own, chosen by the
// server-name matcher, terminating TLS with a certificate over SDS; the
// secret is only in the SDS resources, never in the listener; a name a
// deny rule covers is not terminated; Envoy validates the result.
func TestHTTPSRendered(t *testing.T) {
	pol := mustPolicy(t, httpsConfig)
	o := termOptions(t)
	res, err := Resources(pol, o)
	if err != nil {
		t.Fatal(err)
	}
	js := string(JSON(Listener(pol, o)))
	for _, want := range []string{`"alpha/https/443/api.example.com"`, `"alpha/https/8443/example.com"`, certSecretPrefix + "api.example.com",
		`"host_rewrite_literal": "example.com:8443"`, `method %REQ(:METHOD)% not allowed for api.example.com`, "credential_injector"} {
		if !strings.Contains(js, want) {
			t.Errorf("listener lacks %s", want)
		}
	}
	if strings.Contains(js, testSecret) {
		t.Error("the secret is in the listener")
	}
	if strings.Contains(js, "beta/https") {
		t.Error("beta's https name is terminated though a deny rule covers it")
	}
	if n := len(res[resourcev3.SecretType]); n != 4 { // two certificates, one inject value, the roots
		t.Errorf("%d secrets; want 4", n)
	}
	// sni api.example.com on 8443 stays an sni name (the https rule there
	// is for example.com); on 443 the https rule takes it over from
	// *.example.com (an exact domain beats the wildcard).
	if !strings.Contains(js, `"api.example.com"`) {
		t.Error("sni api.example.com on 8443 is not rendered")
	}
	nettest.Privileged(t, "envoy")
	path := filepath.Join(t.TempDir(), "https.json")
	os.WriteFile(path, JSON(Bootstrap(pol, o)), 0o600)
	if out, err := exec.Command("envoy", "--mode", "validate", "-c", path).CombinedOutput(); err != nil {
		t.Errorf("envoy --mode validate: %v\n%s", err, out)
	}
}

// TestHTTPSClusterPerProject: two projects terminating the same name get a
// cluster each, so an upstream connection that carried one project's
// injected credential is never pooled for another project's requests.
func TestHTTPSClusterPerProject(t *testing.T) {
	pol := mustPolicy(t, `projects:
  alpha:
    subnet: 172.31.0.0/30
    allow:
      - https: api.example.com
        inject: {Authorization: "Bearer ${secret:apikey}"}
  gamma:
    subnet: 172.31.0.8/30
    allow:
      - https: api.example.com
  delta:
    subnet: 172.31.0.12/30
    allow:
      - sni: api.example.com
`)
	o := termOptions(t)
	var names []string
	for _, c := range clusters(pol, o) {
		if n := c["name"].(string); strings.HasPrefix(n, ClusterHTTPS) {
			names = append(names, n)
		}
	}
	if want := []string{ClusterHTTPS + "/alpha", ClusterHTTPS + "/gamma"}; strings.Join(names, " ") != strings.Join(want, " ") {
		t.Errorf("terminating clusters %v; want %v", names, want)
	}
	js := string(JSON(Listener(pol, o)))
	for _, p := range []string{"alpha", "gamma"} {
		if n := strings.Count(js, `"cluster": "`+ClusterHTTPS+"/"+p+`"`); n != 1 {
			t.Errorf("%s: %d routes to its own cluster; want 1", p, n)
		}
	}
	if n := strings.Count(js, `"cluster": "`+ClusterHTTPS+`"`); n != 0 {
		t.Errorf("%d routes to a cluster shared by every project", n)
	}
	nettest.Privileged(t, "envoy")
	path := filepath.Join(t.TempDir(), "https.json")
	os.WriteFile(path, JSON(Bootstrap(pol, o)), 0o600)
	if out, err := exec.Command("envoy", "--mode", "validate", "-c", path).CombinedOutput(); err != nil {
		t.Errorf("envoy --mode validate: %v\n%s", err, out)
	}
}

// TestHTTPSNeedsCA: without a CA the resources are refused; with a
// secret that cannot be read, the routes of the rule injecting it answer
// 502 naming the header (never forward without it) and nothing is served
// for it.
func TestHTTPSNeedsCA(t *testing.T) {
	pol := mustPolicy(t, httpsConfig)
	if _, err := Resources(pol, testOptions); err == nil || !strings.Contains(err.Error(), "no vmegress CA") {
		t.Errorf("no CA: %v", err)
	}
	o := termOptions(t)
	o.Secret = func(string) (string, error) { return "", errors.New("gone") }
	res, broken, err := resources(pol, o)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(res[resourcev3.SecretType]); n != 3 { // two certificates and the roots
		t.Errorf("%d secrets; want 3 (no inject value)", n)
	}
	o.brokenInject = broken
	js := string(JSON(Listener(pol, o)))
	if !strings.Contains(js, `"status": 502`) || !strings.Contains(js, "inject Authorization: gone") {
		t.Error("the injecting rule's routes do not answer 502 naming the header")
	}
	if strings.Count(js, "vmegress_dfp_https") != 2 { // the POST rule and the 8443 name still forward
		t.Errorf("%d forwarding routes; want 2", strings.Count(js, "vmegress_dfp_https"))
	}
}

// FuzzBadPath: a path Envoy's routes let through to a rule with paths
// (badPathRegex does not match it) is one the builtin plane's decider
// lets through too, and one it refuses for its form Envoy refuses.
func FuzzBadPath(f *testing.F) {
	for _, s := range []string{"/v1/models", "/v1/../admin", "/v1/%2e%2e/admin", "/a%2fb", "/a%252e", "/a\\b", "/v1/..;x/a", "/v1/x?q=../", "/%41", "/.", "/a/./b"} {
		f.Add(s)
	}
	pol := mustPolicy(f, "projects:\n  a:\n    subnet: 172.31.0.0/30\n    allow:\n      - https: a.com\n        paths: [\"/*\"]\n")
	pr := pol.Project("a")
	re := regexp.MustCompile(`^(?:` + badPathRegex + `)$`)
	f.Fuzz(func(t *testing.T, raw string) {
		u, err := url.ParseRequestURI(raw)
		if err != nil || !strings.HasPrefix(raw, "/") || strings.ContainsAny(raw, "# ") {
			return // not a request target Envoy's codecs pass on
		}
		d := pr.DecideRequest(policy.Request{Kind: policy.KindTLS, Name: "a.com", Port: 443, Host: "a.com", Method: "GET", Path: u.Path, EscapedPath: u.EscapedPath()})
		envoyAllows := !re.MatchString(raw)
		if envoyAllows && d.Verdict != policy.Allow {
			t.Errorf("%q: Envoy's route allows it, the builtin plane refuses it: %s", raw, d.Reason)
		}
		if !envoyAllows && d.Verdict == policy.Allow && strings.Contains(u.RawPath+u.Path, "..") {
			t.Errorf("%q: a dot segment Envoy refuses passes the builtin plane", raw)
		}
	})
}

// FuzzOverrideQuery: Envoy's route refuses a request for a _method query
// parameter exactly when the builtin plane does (policy.QueryOverridesMethod).
func FuzzOverrideQuery(f *testing.F) {
	for _, s := range []string{"/v1?_method=DELETE", "/v1?a=1&_Method=put", "/v1?%5fmethod=x", "/v1?_%6D%45thod=x", "/v1?q=_meth", "/v1", "/v1?a=b;_method=PUT", "/_method?a=1", "/v1?%255fmethod=x", "/v1?x=%5F%6d%65%74%68%6f%64"} {
		f.Add(s)
	}
	re := regexp.MustCompile(`^(?:` + overrideQueryRegex + `)$`)
	f.Fuzz(func(t *testing.T, raw string) {
		if !strings.HasPrefix(raw, "/") || strings.ContainsAny(raw, "# ") {
			return
		}
		_, query, _ := strings.Cut(raw, "?")
		if envoy, builtin := re.MatchString(raw), policy.QueryOverridesMethod(query); envoy != builtin {
			t.Errorf("%q: Envoy's route finds a _method query parameter: %v; the builtin plane: %v", raw, envoy, builtin)
		}
	})
}
