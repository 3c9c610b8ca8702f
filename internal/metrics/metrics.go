// Package metrics holds vmegress's Prometheus metrics. They are registered on
// a registry the caller injects; every method is safe on a nil *Metrics, so
// components run without metrics in tests. Labels are bounded: project,
// verdict, direction, result, rule comment, and one capped destination
// label (denied names: see Denied) — never an address.
//
// Both data planes feed the same series: the builtin proxy calls the
// methods; on the Envoy plane the daemon passes each of Envoy's access-log
// lines to AccessLine, and ActiveFunc reads Envoy's open connections.
package metrics

import (
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are vmegress's counters and gauges.
type Metrics struct {
	connections  *prometheus.CounterVec
	bytes        *prometheus.CounterVec
	active       *activeCollector
	denied       *prometheus.CounterVec
	dnsQueries   *prometheus.CounterVec
	reloads      *prometheus.CounterVec
	driftRepairs prometheus.Counter
	dataplaneUp  prometheus.Gauge

	destMu sync.Mutex
	dests  map[string]map[string]struct{} // project → destination labels in use
}

// New creates the metrics and registers them on reg.
func New(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		connections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmegress_proxy_connections_total", Help: "Guest connections decided by the data plane, by project and verdict.",
		}, []string{"project", "verdict"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmegress_proxy_bytes_total", Help: "Bytes proxied, by project and direction (up: guest to internet).",
		}, []string{"project", "direction"}),
		active: newActiveCollector(),
		denied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmegress_proxy_denied_destinations_total",
			Help: "Connections (http requests on Envoy) the data plane refused, by project, verdict (deny, would_deny) and destination: " +
				"the name asked for (SNI or Host) and port, NAME:PORT, or (no name):PORT; at most MaxDestinations per project, the rest as (other).",
		}, []string{"project", "verdict", "destination"}),
		dnsQueries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmegress_dns_queries_total", Help: "Guest DNS queries by project and verdict.",
		}, []string{"project", "verdict"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmegress_policy_reloads_total", Help: "Policy reloads by result (success, failure).",
		}, []string{"result"}),
		driftRepairs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vmegress_firewall_drift_repairs_total", Help: "Times the ruleset or routing was found changed behind the daemon's back and restored.",
		}),
		dataplaneUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "vmegress_dataplane_up", Help: "1 while the data plane accepts connections.",
		}),
	}
	reg.MustRegister(m.connections, m.bytes, m.active, m.denied, m.dnsQueries, m.reloads, m.driftRepairs, m.dataplaneUp)
	m.reloads.WithLabelValues("success")
	m.reloads.WithLabelValues("failure")
	return m
}

// Connection counts one decided connection.
func (m *Metrics) Connection(project, verdict string) {
	if m != nil {
		m.connections.WithLabelValues(project, verdict).Inc()
	}
}

// Connections counts n decided connections.
func (m *Metrics) Connections(project, verdict string, n int) {
	if m != nil {
		m.connections.WithLabelValues(project, verdict).Add(float64(n))
	}
}

// Bytes counts proxied bytes.
func (m *Metrics) Bytes(project string, up, down int64) {
	if m != nil {
		m.bytes.WithLabelValues(project, "up").Add(float64(up))
		m.bytes.WithLabelValues(project, "down").Add(float64(down))
	}
}

// Active moves a project's open-connection gauge by delta.
func (m *Metrics) Active(project string, delta float64) {
	if m != nil {
		m.active.vec.WithLabelValues(project).Add(delta)
	}
}

// SetActiveFunc makes vmegress_proxy_active_connections read f at scrape
// time (open connections by project) instead of the counts Active keeps:
// the Envoy plane, whose connections the daemon does not see open. A scrape
// where f fails exports the error.
func (m *Metrics) SetActiveFunc(f func() (map[string]float64, error)) {
	if m != nil {
		m.active.fn.Store(&f)
	}
}

// activeCollector is vmegress_proxy_active_connections: the gauge Active
// moves, or what fn reads when it is set.
type activeCollector struct {
	vec  *prometheus.GaugeVec
	desc *prometheus.Desc
	fn   atomic.Pointer[func() (map[string]float64, error)]
}

func newActiveCollector() *activeCollector {
	const name, help = "vmegress_proxy_active_connections", "Open proxied connections by project."
	return &activeCollector{
		vec:  prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, []string{"project"}),
		desc: prometheus.NewDesc(name, help, []string{"project"}, nil),
	}
}

func (c *activeCollector) Describe(ch chan<- *prometheus.Desc) { c.vec.Describe(ch) }

func (c *activeCollector) Collect(ch chan<- prometheus.Metric) {
	fn := c.fn.Load()
	if fn == nil {
		c.vec.Collect(ch)
		return
	}
	counts, err := (*fn)()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.desc, err)
		return
	}
	for project, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, n, project)
	}
}

// MaxDestinations is how many distinct destination label values each
// project gets in vmegress_proxy_denied_destinations_total; later ones are
// counted as "(other)". Names come from guests, which can make up any
// number of them: the cap bounds the series a guest can create (and the
// daemon's and Prometheus' memory) at MaxDestinations+1 label values per
// project (times the two verdicts), while the few destinations a misconfigured or curious guest
// keeps trying show by name.
const MaxDestinations = 50

// Label values of the destination label beyond NAME:PORT.
const (
	OtherDestination = "(other)"   // past MaxDestinations
	NoName           = "(no name)" // a connection that named nothing (NoName+":PORT")
	BadName          = "(invalid)" // a name that is not a host name (BadName+":PORT")
)

// maxNameLen is the longest DNS name (RFC 1035).
const maxNameLen = 253

// Denied counts a refused connection by its destination: the name it
// asked for (sni or Host, "" when none) and the port it went to. Verdicts
// other than deny and would_deny (audit mode) are ignored.
func (m *Metrics) Denied(project, verdict, name string, port uint16) {
	if m == nil || (verdict != "deny" && verdict != "would_deny") {
		return
	}
	m.denied.WithLabelValues(project, verdict, m.destination(project, Destination(name, port))).Inc()
}

// Destination is the destination label of name and port, before the cap.
func Destination(name string, port uint16) string {
	return destName(name) + ":" + strconv.Itoa(int(port))
}

// destName is name lowercased without a trailing dot, NoName when empty,
// BadName when it is not made of host-name characters.
func destName(name string) string {
	name = strings.TrimSuffix(strings.ToLower(name), ".")
	if name == "" {
		return NoName
	}
	if len(name) > maxNameLen {
		return BadName
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_' || c == '*') {
			return BadName
		}
	}
	return name
}

// destination returns d if project has it or room for it, else OtherDestination.
func (m *Metrics) destination(project, d string) string {
	m.destMu.Lock()
	defer m.destMu.Unlock()
	seen := m.dests[project]
	if _, ok := seen[d]; ok {
		return d
	}
	if len(seen) >= MaxDestinations {
		return OtherDestination
	}
	if seen == nil {
		if m.dests == nil {
			m.dests = map[string]map[string]struct{}{}
		}
		seen = map[string]struct{}{}
		m.dests[project] = seen
	}
	seen[d] = struct{}{}
	return d
}

// DNSQuery counts one guest query.
func (m *Metrics) DNSQuery(project, verdict string) {
	if m != nil {
		m.dnsQueries.WithLabelValues(project, verdict).Inc()
	}
}

// Reload counts a policy reload; ok is its success.
func (m *Metrics) Reload(ok bool) {
	if m == nil {
		return
	}
	if ok {
		m.reloads.WithLabelValues("success").Inc()
	} else {
		m.reloads.WithLabelValues("failure").Inc()
	}
}

// DriftRepaired counts a restored ruleset or routing.
func (m *Metrics) DriftRepaired() {
	if m != nil {
		m.driftRepairs.Inc()
	}
}

// DataplaneUp sets the data plane's health gauge.
func (m *Metrics) DataplaneUp(up bool) {
	if m == nil {
		return
	}
	if up {
		m.dataplaneUp.Set(1)
	} else {
		m.dataplaneUp.Set(0)
	}
}

// CounterFunc reads named counters (the ruleset's drop counters) at scrape time.
type CounterFunc func() (map[string]uint64, error)

// RulesetCollector exports the ruleset's counters as
// vmegress_firewall_packets_total{rule="<comment>"}.
type RulesetCollector struct {
	Read CounterFunc
	desc *prometheus.Desc
}

// NewRulesetCollector returns a collector over read.
func NewRulesetCollector(read CounterFunc) *RulesetCollector {
	return &RulesetCollector{Read: read, desc: prometheus.NewDesc("vmegress_firewall_packets_total",
		"Packets counted by the vmegress ruleset's rules (mostly drops), by rule comment.", []string{"rule"}, nil)}
}

// Describe implements prometheus.Collector.
func (c *RulesetCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector.
func (c *RulesetCollector) Collect(ch chan<- prometheus.Metric) {
	counts, err := c.Read()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.desc, err)
		return
	}
	for rule, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, float64(n), rule)
	}
}

// GaugeFunc reads a gauge's values by project at scrape time.
type GaugeFunc func() (map[string]float64, error)

// KernelFlowsCollector is vmegress_kernel_active_flows: the open flows the
// kernel forwards (cidr and tcp rules), which no data plane sees, by
// project, read at scrape time (a scrape where Read fails exports the
// error).
type KernelFlowsCollector struct {
	Read GaugeFunc
	desc *prometheus.Desc
}

// NewKernelFlowsCollector returns a collector over read.
func NewKernelFlowsCollector(read GaugeFunc) *KernelFlowsCollector {
	return &KernelFlowsCollector{Read: read, desc: prometheus.NewDesc("vmegress_kernel_active_flows",
		"Open flows the kernel forwards (cidr and tcp rules), by project: read from conntrack at scrape time.", []string{"project"}, nil)}
}

// Describe implements prometheus.Collector.
func (c *KernelFlowsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector.
func (c *KernelFlowsCollector) Collect(ch chan<- prometheus.Metric) {
	counts, err := c.Read()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.desc, err)
		return
	}
	for project, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, n, project)
	}
}

// AccessLine counts one access-log line of the Envoy plane (a connection,
// or a request on an http chain), decoded from its JSON, as the builtin
// proxy counts its connections: vmegress_proxy_connections_total by project
// and verdict, vmegress_proxy_bytes_total, and for a refusal
// vmegress_proxy_denied_destinations_total. Lines of another type ("dns")
// are ignored. The type is "type", or "msg" as Envoy writes it.
func (m *Metrics) AccessLine(line map[string]any) {
	if m == nil {
		return
	}
	typ, _ := line["type"].(string)
	if typ == "" {
		typ, _ = line["msg"].(string)
	}
	if typ != "connection" {
		return
	}
	project, verdict := str(line["project"]), str(line["verdict"])
	if verdict == "" {
		return // not one of ours
	}
	m.Connection(project, verdict)
	up, down := num(line["bytes_up"]), num(line["bytes_down"])
	if up > 0 || down > 0 {
		m.Bytes(project, up, down)
	}
	name := str(line["sni"])
	if h := str(line["host"]); h != "" {
		name = h
		if host, _, err := net.SplitHostPort(h); err == nil {
			name = host // an http request's :authority may carry a port
		}
	}
	var port uint16
	if ap, err := netip.ParseAddrPort(str(line["dst"])); err == nil {
		port = ap.Port()
	}
	m.Denied(project, verdict, name, port)
}

// str is a line's string value; Envoy writes "-" or null for a value it
// does not have.
func str(v any) string {
	s, _ := v.(string)
	if s == "-" {
		return ""
	}
	return s
}

// num is a line's count: a JSON number, or a string of digits.
func num(v any) int64 {
	switch v := v.(type) {
	case float64:
		if v > 0 {
			return int64(v)
		}
	case string:
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n > 0 {
			return n
		}
	}
	return 0
}
