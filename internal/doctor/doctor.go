// Package doctor runs vmegress's named host checks (the spec's verification,
// sections 6.3 and 6.10): each check passes or fails, and a failure says how
// to fix it.
package doctor

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Result is one check's outcome.
type Result struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
	// Fix says what to do when the check failed.
	Fix string `json:"fix,omitempty"`
}

// Check is a named check.
type Check struct {
	Name string
	Run  func(ctx context.Context) Result
}

// Run runs every check in order.
func Run(ctx context.Context, checks []Check) []Result {
	out := make([]Result, 0, len(checks))
	for _, c := range checks {
		r := c.Run(ctx)
		r.Name = c.Name
		out = append(out, r)
	}
	return out
}

// Failed reports whether any result failed.
func Failed(rs []Result) bool {
	for _, r := range rs {
		if !r.OK {
			return true
		}
	}
	return false
}

// Pass and Fail build results.
func Pass(format string, args ...any) Result {
	return Result{OK: true, Detail: fmt.Sprintf(format, args...)}
}

// Fail builds a failed result with its fix.
func Fail(fix, format string, args ...any) Result {
	return Result{Detail: fmt.Sprintf(format, args...), Fix: fix}
}

// Capability bits of /proc/PID/status CapEff (linux/capability.h).
const (
	capNetAdmin = 12
	capNetRaw   = 13
)

// Capabilities checks that the process may do what the daemon does.
func Capabilities(statusFile string) Result {
	b, err := os.ReadFile(statusFile)
	if err != nil {
		return Fail("run doctor on Linux with /proc mounted", "reading %s: %v", statusFile, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				break
			}
			var missing []string
			if caps&(1<<capNetAdmin) == 0 {
				missing = append(missing, "CAP_NET_ADMIN")
			}
			if caps&(1<<capNetRaw) == 0 {
				missing = append(missing, "CAP_NET_RAW")
			}
			if len(missing) > 0 {
				return Fail("run as root, or grant them (the systemd unit does: AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW)",
					"missing %s", strings.Join(missing, ", "))
			}
			return Pass("CAP_NET_ADMIN and CAP_NET_RAW present")
		}
	}
	return Fail("run doctor on Linux", "no CapEff line in %s", statusFile)
}

// UpstreamDNSFix is what to do when no upstream resolver answers.
const UpstreamDNSFix = "set dns.upstreams to resolvers this host reaches (with systemd-resolved, the nameservers in " +
	"/run/systemd/resolve/resolv.conf, not its stub 127.0.0.53), or fix /etc/resolv.conf; the resolver's " +
	"upstream sockets carry the upstream mark, so a firewall outside vmegress must let marked DNS out"

// UpstreamDNS checks that an upstream resolver answers: probe sends one query
// to an upstream the way the daemon's resolver does (with the upstream mark,
// unmarked to a loopback stub) and returns nil when it answered.
func UpstreamDNS(ctx context.Context, upstreams []string, probe func(ctx context.Context, upstream string) error) Result {
	if len(upstreams) == 0 {
		return Fail(UpstreamDNSFix, "no upstream resolvers")
	}
	var answered, failed []string
	for _, u := range upstreams {
		if err := probe(ctx, u); err != nil {
			failed = append(failed, err.Error())
		} else {
			answered = append(answered, u)
		}
	}
	if len(answered) == 0 {
		return Fail(UpstreamDNSFix, "no upstream resolver answers: %s", strings.Join(failed, "; "))
	}
	if len(failed) > 0 {
		return Pass("%s answer; not answering: %s", strings.Join(answered, ", "), strings.Join(failed, "; "))
	}
	return Pass("%s answer", strings.Join(answered, ", "))
}
