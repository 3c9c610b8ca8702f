package envoy

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/nettest"
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

var testOptions = Options{Upstreams: []string{"192.0.2.53:53"}, AdminAddress: netip.MustParseAddrPort("127.0.0.1:9902"), AccessLogPath: "/dev/stdout"}

func mustConfig(t *testing.T, y string) *config.Config {
	t.Helper()
	cfg, err := config.Parse("t.yaml", []byte(y))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestResources: the generated configuration converts to Envoy's typed
// protos (every @type known, every field name right).
func TestResources(t *testing.T) {
	res, err := Resources(mustConfig(t, testConfig), testOptions)
	if err != nil {
		t.Fatal(err)
	}
	if len(res[resourcev3.ListenerType]) != 1 || len(res[resourcev3.ClusterType]) != 4 {
		t.Errorf("resources: %d listeners, %d clusters", len(res[resourcev3.ListenerType]), len(res[resourcev3.ClusterType]))
	}
	js := string(JSON(Listener(mustConfig(t, testConfig), testOptions)))
	for _, want := range []string{`"alpha/tls/443"`, `"alpha/http/80"`, `"alpha/cidr/22"`, `"beta/tls/8443"`, `"172.31.0.4"`} {
		if !strings.Contains(js, want) {
			t.Errorf("listener lacks %s", want)
		}
	}
	if strings.Contains(js, `"empty/`) {
		t.Error("a project without rules got a chain")
	}
}

// TestBootstrapValidates runs `envoy --mode validate` on the static bootstrap.
func TestBootstrapValidates(t *testing.T) {
	nettest.Privileged(t, "envoy")
	dir := t.TempDir()
	for name, b := range map[string]M{
		"static.json": Bootstrap(mustConfig(t, testConfig), testOptions),
		"empty.json":  Bootstrap(mustConfig(t, "projects: {}\n"), testOptions),
		"xds.json":    XDSBootstrap(testOptions, filepath.Join(dir, "xds.sock")),
	} {
		path := filepath.Join(dir, name)
		os.WriteFile(path, JSON(b), 0o644)
		if out, err := exec.Command("envoy", "--mode", "validate", "-c", path).CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s", name, err, out)
		}
	}
}
