package state

import (
	"bytes"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/vmegress/vmegress/internal/config"
)

// header is the state file's first line. The format is one project a line,
// tab-separated, because `net up` reads and writes the whole file under
// its lock: at thousands of projects JSON cost it more than everything else
// it does (see BENCHMARKS.md).
const header = "# vmegress projects, format 1: name\ttap\tsubnet\tmac\tegress\tssh_port\towner\tgroup"

// Marshal renders s in the state file's format, projects by name.
func Marshal(s *State) ([]byte, error) {
	// Sorting the names, not the records, is the cheaper way to a stable
	// file; appending in place keeps it to a few allocations (this runs on
	// every `net up` with every project).
	names := slices.Sorted(maps.Keys(s.Projects))
	b := make([]byte, 0, len(header)+1+96*len(names))
	b = append(append(b, header...), '\n')
	for _, name := range names {
		p := s.Projects[name]
		if p.Name == "" || p.TAP == "" || p.MAC == "" || p.Egress == "" || !p.Subnet.IsValid() {
			return nil, fmt.Errorf("project %q: a field is empty", name)
		}
		// "#x" would be read back as a comment, "a*" breaks the ruleset.
		if err := config.ValidProjectName(p.Name); err != nil {
			return nil, err
		}
		if err := config.ValidTAPName(p.TAP); err != nil {
			return nil, fmt.Errorf("project %q: %w", name, err)
		}
		b = append(append(b, p.Name...), '\t')
		b = append(append(b, p.TAP...), '\t')
		b = append(p.Subnet.AppendTo(b), '\t')
		b = append(append(b, p.MAC...), '\t')
		b = append(append(b, p.Egress...), '\t')
		b = append(strconv.AppendUint(b, uint64(p.SSHPort), 10), '\t')
		b = append(appendOpt(b, p.Owner), '\t')
		b = append(appendOpt(b, p.Group), '\n')
	}
	// A tab or line break inside a field would shift the fields of the line
	// or split it: counted once over the whole text, not per field.
	if bytes.Count(b, []byte{'\n'}) != len(names)+1 || bytes.Count(b, []byte{'\t'}) != strings.Count(header, "\t")+7*len(names) || bytes.IndexByte(b, '\r') >= 0 {
		for _, name := range names {
			p := s.Projects[name]
			for _, f := range []string{p.Name, p.TAP, p.MAC, p.Egress} {
				if strings.ContainsAny(f, "\t\n\r") {
					return nil, fmt.Errorf("project %q: field %q holds a tab or line break", name, f)
				}
			}
		}
		return nil, fmt.Errorf("state holds a tab or line break in a field")
	}
	return b, nil
}

func appendOpt(b []byte, v *uint32) []byte {
	if v == nil {
		return append(b, '-')
	}
	return strconv.AppendUint(b, uint64(*v), 10)
}

// Unmarshal parses the state file's format; errors name the line.
func Unmarshal(data []byte) (*State, error) {
	s := &State{Projects: make(map[string]Project, bytes.Count(data, []byte{'\n'}))}
	text := string(data)
	if !strings.HasPrefix(text, "# vmegress projects, format 1:") {
		return nil, fmt.Errorf("line 1: not a vmegress state file of format 1")
	}
	n := 0
	for len(text) > 0 {
		var line string
		line, text, _ = strings.Cut(text, "\n")
		n++
		if line == "" || line[0] == '#' {
			continue
		}
		p, err := parseLine(line)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		if _, dup := s.Projects[p.Name]; dup {
			return nil, fmt.Errorf("line %d: project %q twice", n, p.Name)
		}
		s.Projects[p.Name] = p
	}
	return s, nil
}

func parseLine(line string) (Project, error) {
	if strings.IndexByte(line, '\r') >= 0 {
		return Project{}, fmt.Errorf("carriage return in the line")
	}
	var f [8]string
	rest := line
	for i := range f {
		var ok bool
		f[i], rest, ok = strings.Cut(rest, "\t")
		if (i < len(f)-1) != ok {
			return Project{}, fmt.Errorf("want %d tab-separated fields", len(f))
		}
		if f[i] == "" {
			return Project{}, fmt.Errorf("field %d is empty", i+1)
		}
	}
	p := Project{Name: f[0], TAP: f[1], MAC: f[3], Egress: f[4]}
	// A name no command would accept today (an older vmegress recorded it)
	// is refused, not skipped: skipped, its /30 would be handed out again.
	if err := config.ValidProjectName(p.Name); err != nil {
		return Project{}, fmt.Errorf("%w (remove the line, then net up the project again)", err)
	}
	if err := config.ValidTAPName(p.TAP); err != nil {
		return Project{}, fmt.Errorf("project %q: %w (remove the line, then net up the project again)", p.Name, err)
	}
	var err error
	if p.Subnet, err = netip.ParsePrefix(f[2]); err != nil {
		return Project{}, fmt.Errorf("project %q: subnet: %w", p.Name, err)
	}
	if p.Egress != EgressProxy && p.Egress != EgressNAT {
		return Project{}, fmt.Errorf("project %q: egress %q is not %s or %s", p.Name, p.Egress, EgressProxy, EgressNAT)
	}
	port, err := strconv.ParseUint(f[5], 10, 16)
	if err != nil {
		return Project{}, fmt.Errorf("project %q: ssh_port: %w", p.Name, err)
	}
	p.SSHPort = uint16(port)
	if p.Owner, err = parseOpt(f[6]); err != nil {
		return Project{}, fmt.Errorf("project %q: owner: %w", p.Name, err)
	}
	if p.Group, err = parseOpt(f[7]); err != nil {
		return Project{}, fmt.Errorf("project %q: group: %w", p.Name, err)
	}
	return p, nil
}

func parseOpt(s string) (*uint32, error) {
	if s == "-" {
		return nil, nil
	}
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return nil, err
	}
	u := uint32(v)
	return &u, nil
}
