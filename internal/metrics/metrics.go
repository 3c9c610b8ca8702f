// Package metrics holds vmegress's Prometheus metrics. They are registered on
// a registry the caller injects; every method is safe on a nil *Metrics, so
// components run without metrics in tests. Labels are bounded: project,
// verdict, direction, result, rule comment — never a host name.
package metrics

import "github.com/prometheus/client_golang/prometheus"

// Metrics are vmegress's counters and gauges.
type Metrics struct {
	connections  *prometheus.CounterVec
	bytes        *prometheus.CounterVec
	active       *prometheus.GaugeVec
	dnsQueries   *prometheus.CounterVec
	reloads      *prometheus.CounterVec
	driftRepairs prometheus.Counter
	dataplaneUp  prometheus.Gauge
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
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "vmegress_proxy_active_connections", Help: "Open proxied connections by project.",
		}, []string{"project"}),
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
	reg.MustRegister(m.connections, m.bytes, m.active, m.dnsQueries, m.reloads, m.driftRepairs, m.dataplaneUp)
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
		m.active.WithLabelValues(project).Add(delta)
	}
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
