package client

import (
	"encoding/json"
	"time"
)

// ProjectSpec is the body of PUT /v1/projects/{name}: where the project sits
// on the host. Every field is optional.
type ProjectSpec struct {
	// TAP is the interface name (default tap-NAME).
	TAP string `json:"tap,omitempty"`
	// Subnet is a fixed /30 of vm_cidr (default: the next free one).
	Subnet string `json:"subnet,omitempty"`
	// Owner and Group may open the TAP (Firecracker's jailer user).
	Owner *uint32 `json:"owner,omitempty"`
	Group *uint32 `json:"group,omitempty"`
	// SSHPort forwards this host port to the guest's port 22.
	SSHPort uint16 `json:"ssh_port,omitempty"`
	// Egress is "proxy" (default) or "nat" (the spec's direct NAT, unfiltered).
	Egress string `json:"egress,omitempty"`
	// AllowPrivilegedSSHPort permits an SSHPort below 1024.
	AllowPrivilegedSSHPort bool `json:"allow_privileged_ssh_port,omitempty"`
	// Policy, when given, replaces the project's egress policy (a project
	// the config file names keeps the file's: giving one is a conflict).
	Policy *Policy `json:"policy,omitempty"`
}

// Policy is a project's egress policy, with the config file's keys and rules.
type Policy struct {
	// Mode is "enforce" (default) or "audit" (allow all, report would_deny).
	Mode string `json:"mode,omitempty"`
	// MaxConnections caps the project's open connections (default 1024).
	MaxConnections int `json:"max_connections,omitempty"`
	// Allow lists what the project may reach; nothing else leaves.
	Allow []Rule `json:"allow"`
	// Deny is evaluated before Allow: what a deny rule matches is refused
	// whatever Allow says (a deny rule without ports applies on every port).
	Deny []Rule `json:"deny,omitempty"`
}

// Rule is one allow or deny rule: exactly one of SNI, HTTP, TCP, CIDR or Preset, and ports
// (default 443 for SNI, 80 for HTTP; required for TCP and CIDR).
type Rule struct {
	SNI  string `json:"sni,omitempty"`
	HTTP string `json:"http,omitempty"`
	// TCP is a name (or *. wildcard) on any port, not inspected: allowed to
	// the addresses vmegress's resolver handed the project for it.
	TCP  string `json:"tcp,omitempty"`
	CIDR string `json:"cidr,omitempty"`
	// HTTPS is a name whose TLS vmegress terminates (the guest trusts the
	// vmegress CA), so Methods, Paths and Inject can apply per request.
	HTTPS string `json:"https,omitempty"`
	// Preset names a shipped preset (vmegress policy presets); no ports.
	Preset string   `json:"preset,omitempty"`
	Ports  []uint16 `json:"ports,omitempty"`
	// Methods and Paths restrict an https or http rule's requests (paths:
	// exact, or a prefix ending in *); empty: any.
	Methods []string `json:"methods,omitempty"`
	Paths   []string `json:"paths,omitempty"`
	// Inject sets request headers on the way out (https and http rules);
	// values may name secrets as ${secret:NAME}, read on the host.
	Inject map[string]string `json:"inject,omitempty"`
}

// Project is GET /v1/projects/{name}: placement, policy, where the policy
// comes from and the project's live counters.
type Project struct {
	Name string `json:"name"`
	// Placement is nil when the project is not placed on the host.
	Placement *Placement `json:"placement,omitempty"`
	// Source is "file" (the config file owns the policy) or "api".
	Source string `json:"source"`
	Policy Policy `json:"policy"`
	// ActiveConnections are the project's open proxied connections.
	ActiveConnections int64 `json:"active_connections"`
	// Connections and DNSQueries count verdicts since the daemon started.
	Connections map[string]uint64 `json:"connections,omitempty"`
	DNSQueries  map[string]uint64 `json:"dns_queries,omitempty"`
	Generation  uint64            `json:"generation"`
}

// PolicyResult is the answer of PUT /v1/projects/{name}/policy.
type PolicyResult struct {
	Project string `json:"project"`
	// Generation is the engine's snapshot number in force when the call
	// returned: new connections are decided by this policy from then on.
	Generation uint64 `json:"generation"`
}

// Placement is a placed project as the guest sees it: what `net up --json`
// prints and PUT /v1/projects/{name} returns.
type Placement struct {
	Project    string          `json:"project"`
	TAP        string          `json:"tap"`
	HostIP     string          `json:"host_ip"`
	GuestIP    string          `json:"guest_ip"`
	Netmask    string          `json:"netmask"`
	Subnet     string          `json:"subnet"`
	MAC        string          `json:"mac"`
	Egress     string          `json:"egress"`
	SSHPort    uint16          `json:"ssh_port,omitempty"`
	Nameserver string          `json:"nameserver"`
	KernelIP   string          `json:"kernel_ip_arg"`
	Firecraker json.RawMessage `json:"firecracker_network_interface"`
	// Changed is false when the same placement was asked twice.
	Changed bool `json:"changed"`
	// Generation is the engine's snapshot number after the call.
	Generation uint64 `json:"generation"`
}

// Removed is the answer of DELETE /v1/projects/{name}.
type Removed struct {
	Project string `json:"project"`
	// Found is false when the project was not placed (nothing done).
	Found  bool   `json:"found"`
	TAP    string `json:"tap,omitempty"`
	Subnet string `json:"subnet,omitempty"`
	// Generation is the engine's snapshot number after the call.
	Generation uint64 `json:"generation"`
}

// ErrorBody is every error answer's body.
type ErrorBody struct {
	Error string `json:"error"`
	// Field names the request field at fault, when one is.
	Field string `json:"field,omitempty"`
}

// Status is GET /v1/status: the daemon, its data plane and per-project counters.
type Status struct {
	Version      string    `json:"version"`
	Ready        bool      `json:"ready"`
	Started      time.Time `json:"started"`
	Config       string    `json:"config"`
	Dataplane    string    `json:"dataplane"`
	Firewall     string    `json:"firewall"`
	Upstream     string    `json:"upstream"`
	LastReload   time.Time `json:"last_reload"`
	LastError    string    `json:"last_reload_error,omitempty"`
	Interception bool      `json:"interception_installed"`
	// Generation counts the engine's snapshots (each change adds one).
	Generation uint64          `json:"generation"`
	Projects   []ProjectStatus `json:"projects"`
}

// ProjectStatus is one project's line in Status.
type ProjectStatus struct {
	Name        string            `json:"name"`
	Subnet      string            `json:"subnet,omitempty"`
	Mode        string            `json:"mode"`
	Rules       int               `json:"rules"`
	Active      int64             `json:"active_connections"`
	Connections map[string]uint64 `json:"connections"` // by verdict
	DNSQueries  map[string]uint64 `json:"dns_queries"` // by verdict
}

// Event is one line of GET /v1/events: a decision (Type "connection" or
// "dns", with the access log's fields), a change (Type "change"), or
// "lagged" (the reader fell behind and was dropped: reconnect).
type Event struct {
	Type    string `json:"type"`
	Time    string `json:"time"`
	Project string `json:"project,omitempty"`
	Src     string `json:"src,omitempty"`
	Dst     string `json:"dst,omitempty"`
	SNI     string `json:"sni,omitempty"`
	Host    string `json:"host,omitempty"`
	// Name and QType are a DNS query's.
	Name    string `json:"name,omitempty"`
	QType   string `json:"qtype,omitempty"`
	Verdict string `json:"verdict,omitempty"`
	Rule    string `json:"rule,omitempty"`
	Reason  string `json:"reason,omitempty"`
	// Change is what a change did (placed, removed, policy, config).
	Change     string `json:"change,omitempty"`
	Generation uint64 `json:"generation,omitempty"`
	// Raw is the whole line as the daemon sent it.
	Raw json.RawMessage `json:"-"`
}

// EventFilter selects events ("" matches any).
type EventFilter struct {
	Project string
	Verdict string
}

// ExplainRequest is the body of POST /v1/explain.
type ExplainRequest struct {
	Project string `json:"project"`
	// Host is a name or an address; Port defaults to 443.
	Host string `json:"host"`
	Port uint16 `json:"port,omitempty"`
	// As is what the client sends first: tls, http, raw or none ("": by the
	// port's rules; both kinds where both apply).
	As string `json:"as,omitempty"`
	// Addr is the destination address when Host is a name (cidr rules
	// match addresses only).
	Addr string `json:"addr,omitempty"`
	// Method and Path are the request, where the connection's requests are
	// decided one by one (https rules; http rules with methods, paths or
	// inject). Default GET /.
	Method string `json:"method,omitempty"`
	Path   string `json:"path,omitempty"`
}

// Explanation is one verdict of POST /v1/explain (and `policy explain --json`).
type Explanation struct {
	Project    string `json:"project"`
	Connection string `json:"connection"`
	// As is what the client was taken to send (tls, http, raw, none; "any"
	// when the verdict is made before anything is read).
	As string `json:"as"`
	// Inspect is what the data plane reads (none, tls, http, tls-or-http).
	Inspect string `json:"inspect"`
	Verdict string `json:"verdict"`
	Rule    string `json:"rule,omitempty"`
	Reason  string `json:"reason,omitempty"`
	// DNS is what the resolver would answer the guest for Host.
	DNS string `json:"dns,omitempty"`
	// NoName: Host is an address and the verdict depends on the name the
	// client sends; NoAddr: Host is a name given without Addr.
	NoName bool `json:"no_name,omitempty"`
	NoAddr bool `json:"no_addr,omitempty"`
	// Request is the request decided ("GET /v1/models") where requests are
	// decided one by one.
	Request string `json:"request,omitempty"`
}
