// Package suggest turns observed traffic (vmegress access-log lines) into
// allow rules that would have covered it: the step from audit to enforce.
package suggest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/vmegress/vmegress/internal/config"
)

// Line is the part of an access-log line suggest reads.
type Line struct {
	Time    time.Time `json:"time"`
	Msg     string    `json:"msg"`
	Project string    `json:"project"`
	Dst     string    `json:"dst"`
	SNI     string    `json:"sni"`
	Host    string    `json:"host"`
	Name    string    `json:"name"` // dns lines
	Verdict string    `json:"verdict"`
}

// Observed is what one project did.
type Observed struct {
	TLS, HTTP map[string]map[uint16]bool // name → ports
	Addrs     map[netip.Addr]map[uint16]bool
	// Resolved are names queried but never seen in a connection.
	Resolved    map[string]bool
	Connections int
	Queries     int
}

// Read collects project's lines at or after since from r. Lines that are not
// JSON (or not for the project) are skipped.
func Read(r io.Reader, project string, since time.Time) (*Observed, error) {
	o := &Observed{TLS: map[string]map[uint16]bool{}, HTTP: map[string]map[uint16]bool{},
		Addrs: map[netip.Addr]map[uint16]bool{}, Resolved: map[string]bool{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var l Line
		if json.Unmarshal(sc.Bytes(), &l) != nil || l.Project != project || l.Time.Before(since) {
			continue
		}
		switch l.Msg {
		case "dns":
			if n, err := config.NormalizeName(l.Name); err == nil {
				o.Resolved[n] = true
				o.Queries++
			}
		case "connection":
			dst, err := netip.ParseAddrPort(l.Dst)
			if err != nil {
				continue
			}
			o.Connections++
			switch {
			case l.SNI != "":
				add(o.TLS, l.SNI, dst.Port())
			case l.Host != "":
				add(o.HTTP, l.Host, dst.Port())
			default:
				if o.Addrs[dst.Addr()] == nil {
					o.Addrs[dst.Addr()] = map[uint16]bool{}
				}
				o.Addrs[dst.Addr()][dst.Port()] = true
			}
		}
	}
	for n := range o.TLS {
		delete(o.Resolved, n)
	}
	for n := range o.HTTP {
		delete(o.Resolved, n)
	}
	return o, sc.Err()
}

func add(m map[string]map[uint16]bool, name string, port uint16) {
	n, err := config.NormalizeName(name)
	if err != nil || strings.HasPrefix(n, "*.") {
		return
	}
	if m[n] == nil {
		m[n] = map[uint16]bool{}
	}
	m[n][port] = true
}

// Rule is one suggested allow rule.
type Rule struct {
	Kind  config.RuleKind
	Value string
	Ports []uint16 // nil: the kind's default
}

// Rules returns the allow rules covering o. Names that share a parent with
// at least one other observed name become "*.parent" (a parent of at least
// two labels: never "*.com"); everything else stays exact.
func (o *Observed) Rules() []Rule {
	var out []Rule
	out = append(out, nameRules(config.KindSNI, o.TLS, 443)...)
	out = append(out, nameRules(config.KindHTTP, o.HTTP, 80)...)
	addrs := make([]netip.Addr, 0, len(o.Addrs))
	for a := range o.Addrs {
		addrs = append(addrs, a)
	}
	slices.SortFunc(addrs, func(a, b netip.Addr) int { return a.Compare(b) })
	for _, a := range addrs {
		out = append(out, Rule{Kind: config.KindCIDR, Value: netip.PrefixFrom(a, a.BitLen()).String(), Ports: sortedPorts(o.Addrs[a])})
	}
	return out
}

func nameRules(kind config.RuleKind, names map[string]map[uint16]bool, defPort uint16) []Rule {
	byParent := map[string][]string{}
	for n := range names {
		if i := strings.IndexByte(n, '.'); i > 0 && strings.Contains(n[i+1:], ".") {
			byParent[n[i+1:]] = append(byParent[n[i+1:]], n)
		}
	}
	covered := map[string]bool{}
	var out []Rule
	for parent, kids := range byParent {
		if len(kids) < 2 {
			continue
		}
		ports := map[uint16]bool{}
		for _, k := range kids {
			covered[k] = true
			for p := range names[k] {
				ports[p] = true
			}
		}
		out = append(out, Rule{Kind: kind, Value: "*." + parent, Ports: portsOrDefault(ports, defPort)})
	}
	for n, ports := range names {
		if !covered[n] {
			out = append(out, Rule{Kind: kind, Value: n, Ports: portsOrDefault(ports, defPort)})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Value < out[j].Value })
	return out
}

func sortedPorts(m map[uint16]bool) []uint16 {
	out := make([]uint16, 0, len(m))
	for p := range m {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

func portsOrDefault(m map[uint16]bool, def uint16) []uint16 {
	if len(m) == 1 && m[def] {
		return nil
	}
	return sortedPorts(m)
}

// YAML renders rules as a config fragment for project, ready to paste.
func YAML(project string, rules []Rule, o *Observed) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# from %d connections and %d DNS queries\nprojects:\n  %s:\n    allow:\n", o.Connections, o.Queries, project)
	if len(rules) == 0 {
		b.WriteString("      []\n")
	}
	for _, r := range rules {
		fmt.Fprintf(&b, "      - %s: %q\n", r.Kind, r.Value)
		if len(r.Ports) > 0 {
			ps := make([]string, len(r.Ports))
			for i, p := range r.Ports {
				ps[i] = fmt.Sprint(p)
			}
			fmt.Fprintf(&b, "        ports: [%s]\n", strings.Join(ps, ", "))
		}
	}
	resolved := make([]string, 0, len(o.Resolved))
	for n := range o.Resolved {
		resolved = append(resolved, n)
	}
	sort.Strings(resolved)
	for _, n := range resolved {
		fmt.Fprintf(&b, "      # resolved but never connected to: %s\n", n)
	}
	return b.String()
}
