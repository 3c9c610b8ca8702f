package client

import "encoding/json"

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
