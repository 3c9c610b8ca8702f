package policytest

import (
	"fmt"
	"slices"
	"strings"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/policy"
)

// ProjectDiff is what changed in one project between two configs.
type ProjectDiff struct {
	Project string `json:"project"`
	// Status is "added", "removed" or "changed".
	Status  string   `json:"status"`
	Added   []string `json:"added,omitempty"`   // rules, "allow sni:x" / "deny cidr:y"
	Removed []string `json:"removed,omitempty"` // rules
	// Other lists changed settings (mode, max_connections, subnet).
	Other []string `json:"other,omitempty"`
}

// Change is an expectation whose verdict differs between the configs.
type Change struct {
	Expectation `json:"expectation"`
	File        string `json:"file"`
	Old         string `json:"old"`
	OldRule     string `json:"old_rule,omitempty"`
	New         string `json:"new"`
	NewRule     string `json:"new_rule,omitempty"`
}

// Diff compares old and new per project, and the verdicts of the
// expectations of files (their own configs are not used).
func Diff(old, new *config.Config, files []*File) ([]ProjectDiff, []Change, error) {
	var out []ProjectDiff
	names := map[string]bool{}
	for _, p := range old.Projects {
		names[p.Name] = true
	}
	for _, p := range new.Projects {
		names[p.Name] = true
	}
	sorted := make([]string, 0, len(names))
	for n := range names {
		sorted = append(sorted, n)
	}
	slices.Sort(sorted)
	for _, n := range sorted {
		a, b := old.Project(n), new.Project(n)
		d := ProjectDiff{Project: n, Status: "changed"}
		switch {
		case a == nil:
			d.Status, d.Added = "added", rules(b)
		case b == nil:
			d.Status, d.Removed = "removed", rules(a)
		default:
			ra, rb := rules(a), rules(b)
			d.Added = minus(rb, ra)
			d.Removed = minus(ra, rb)
			if a.Mode != b.Mode {
				d.Other = append(d.Other, fmt.Sprintf("mode %s -> %s", a.Mode, b.Mode))
			}
			if a.MaxConnections != b.MaxConnections {
				d.Other = append(d.Other, fmt.Sprintf("max_connections %d -> %d", a.MaxConnections, b.MaxConnections))
			}
			if a.Subnet != b.Subnet {
				d.Other = append(d.Other, fmt.Sprintf("subnet %v -> %v", a.Subnet, b.Subnet))
			}
			if len(d.Added)+len(d.Removed)+len(d.Other) == 0 {
				continue
			}
		}
		out = append(out, d)
	}
	if len(files) == 0 {
		return out, nil, nil
	}
	po, err := policy.Compile(old)
	if err != nil {
		return nil, nil, fmt.Errorf("compiling the old config: %w", err)
	}
	pn, err := policy.Compile(new)
	if err != nil {
		return nil, nil, fmt.Errorf("compiling the new config: %w", err)
	}
	var changes []Change
	for _, f := range files {
		for _, x := range f.Expect {
			a, b := Check(po, x), Check(pn, x)
			if a.Verdict != b.Verdict {
				changes = append(changes, Change{Expectation: x, File: f.Path, Old: string(a.Verdict), OldRule: a.Rule, New: string(b.Verdict), NewRule: b.Rule})
			}
		}
	}
	return out, changes, nil
}

// rules lists a project's rules as "allow KIND:VALUE" and "deny ...", in order.
func rules(p *config.Project) []string {
	var out []string
	for _, r := range p.Allow {
		out = append(out, "allow "+r.String())
	}
	for _, r := range p.Deny {
		out = append(out, "deny "+r.String())
	}
	return out
}

func minus(a, b []string) []string {
	var out []string
	for _, s := range a {
		if !slices.Contains(b, s) {
			out = append(out, s)
		}
	}
	return out
}

// DiffText renders a diff for people.
func DiffText(ds []ProjectDiff, cs []Change) string {
	var b strings.Builder
	if len(ds) == 0 {
		b.WriteString("no project changed\n")
	}
	for _, d := range ds {
		fmt.Fprintf(&b, "project %s (%s)\n", d.Project, d.Status)
		for _, r := range d.Added {
			fmt.Fprintf(&b, "  + %s\n", r)
		}
		for _, r := range d.Removed {
			fmt.Fprintf(&b, "  - %s\n", r)
		}
		for _, o := range d.Other {
			fmt.Fprintf(&b, "  ~ %s\n", o)
		}
	}
	for _, c := range cs {
		fmt.Fprintf(&b, "%s:%d: project %s: %s: %s (%s) -> %s (%s)\n", c.File, c.Line, c.Project, c.What(), c.Old, orDash(c.OldRule), c.New, orDash(c.NewRule))
	}
	return b.String()
}

func orDash(s string) string {
	if s == "" {
		return "no rule"
	}
	return s
}
