package engine

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/state"
)

// Effective merges the config with the projects `net up` placed: a config
// project without a subnet takes its allocation; a placed project the
// config does not name joins with no rules (it allows nothing). A config
// subnet that disagrees with the placement is an error: the TAP carries the
// placed address, so the config's would never match.
func Effective(cfg *config.Config, st *state.State) (*config.Config, error) {
	return EffectiveWith(cfg, st, nil)
}

// EffectiveWith is Effective with the policies of the projects the API owns:
// a placed project the config does not name takes its API policy (none:
// it allows nothing); an API policy of a project not placed joins unplaced.
// The config file wins over an API policy of the same name.
func EffectiveWith(cfg *config.Config, st *state.State, api map[string]config.Project) (*config.Config, error) {
	if (st == nil || len(st.Projects) == 0) && len(api) == 0 {
		return cfg, nil
	}
	if st == nil {
		st = &state.State{Projects: map[string]state.Project{}}
	}
	out := *cfg
	out.Projects = append([]config.Project(nil), cfg.Projects...)
	seen := make(map[string]bool, len(out.Projects)+len(st.Projects)+len(api))
	for i := range out.Projects {
		p := &out.Projects[i]
		seen[p.Name] = true
		placed, ok := st.Projects[p.Name]
		if !ok {
			continue
		}
		switch {
		case !p.Subnet.IsValid():
			p.Subnet = placed.Subnet
		case p.Subnet != placed.Subnet:
			return nil, fmt.Errorf("project %q: the config says subnet %s but `net up` placed it at %s (run `vmegress net down %s` and up again)",
				p.Name, p.Subnet, placed.Subnet, p.Name)
		}
	}
	// Only the placed projects the config does not name are sorted, by
	// name (not whole records): cheap at thousands of projects.
	var names []string
	for name := range st.Projects {
		if !seen[name] {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, name := range names {
		placed := st.Projects[name]
		seen[placed.Name] = true
		p, ok := api[placed.Name]
		if !ok {
			p = config.Project{Name: placed.Name, Mode: "enforce", MaxConnections: config.DefaultMaxConnections}
		}
		p.Subnet = placed.Subnet
		out.Projects = append(out.Projects, p)
	}
	var unplaced []string
	for name := range api {
		if !seen[name] {
			unplaced = append(unplaced, name)
		}
	}
	slices.Sort(unplaced)
	for _, name := range unplaced {
		p := api[name]
		p.Subnet = netip.Prefix{}
		out.Projects = append(out.Projects, p)
	}
	// Every subnet is a /30, so two overlap only when they are equal: a map
	// finds that in linear time (thousands of projects).
	owner := make(map[netip.Prefix]string, len(out.Projects))
	for _, p := range out.Projects {
		if !p.Subnet.IsValid() {
			continue
		}
		if p.Subnet.Bits() != 30 {
			return nil, fmt.Errorf("project %q: subnet %s is not a /30", p.Name, p.Subnet)
		}
		key := p.Subnet.Masked()
		if other, dup := owner[key]; dup {
			return nil, fmt.Errorf("projects %q and %q both have subnet %s", other, p.Name, key)
		}
		owner[key] = p.Name
	}
	return &out, nil
}

// replacePolicy is EffectiveWith for a change of one API project's policy
// that does not move the project (the state is unchanged): eff, the merged
// config before the change, with that project's entry replaced by p at its
// placement. It copies the list of projects once and recompiles nothing;
// ok is false when eff has no entry for p.Name (the caller merges anew).
func replacePolicy(eff *config.Config, p config.Project) (out *config.Config, ok bool) {
	i := slices.IndexFunc(eff.Projects, func(q config.Project) bool { return q.Name == p.Name })
	if i < 0 {
		return nil, false
	}
	c := *eff
	c.Projects = slices.Clone(eff.Projects)
	p.Subnet = eff.Projects[i].Subnet
	c.Projects[i] = p
	return &c, true
}

// withPlaced is EffectiveWith for the placement of one project the config
// file does not name: eff (the merge before) with that project, as
// pol says (nil: allows nothing), placed at subnet, in its sorted place among
// the placed API projects, and its earlier entry (placed elsewhere, or
// unplaced) gone. It copies the list once and sorts nothing; ok is false
// for a project the file names (the caller merges anew).
func withPlaced(file, eff *config.Config, name string, subnet netip.Prefix, pol *config.Project) (out *config.Config, ok bool, err error) {
	if file.Project(name) != nil || eff == file {
		return nil, false, nil
	}
	p := config.Project{Name: name, Mode: "enforce", MaxConnections: config.DefaultMaxConnections}
	if pol != nil {
		p = *pol
	}
	p.Subnet = subnet
	projects := make([]config.Project, 0, len(eff.Projects)+1)
	for i := range eff.Projects {
		if q := &eff.Projects[i]; q.Name != name {
			projects = append(projects, *q)
		}
	}
	// File projects, then placed API ones by name, then unplaced ones.
	lo, hi := len(file.Projects), len(file.Projects)
	for hi < len(projects) && projects[hi].Subnet.IsValid() {
		hi++
	}
	at, _ := slices.BinarySearchFunc(projects[lo:hi], name, func(q config.Project, n string) int { return strings.Compare(q.Name, n) })
	projects = slices.Insert(projects, lo+at, p)
	if subnet.Bits() != 30 {
		return nil, true, fmt.Errorf("project %q: subnet %s is not a /30", name, subnet)
	}
	for i := range projects {
		if q := &projects[i]; q.Name != name && q.Subnet.IsValid() && q.Subnet.Masked() == subnet.Masked() {
			return nil, true, fmt.Errorf("projects %q and %q both have subnet %s", q.Name, name, subnet.Masked())
		}
	}
	c := *eff
	c.Projects = projects
	return &c, true, nil
}
