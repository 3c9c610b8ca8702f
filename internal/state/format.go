package state

import (
	"bytes"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// header is the state file's first line. The format is one project a line,
// tab-separated, because `net up` reads and writes the whole file under
// its lock: at thousands of projects JSON cost it more than everything else
// it does (see BENCHMARKS.md).
const header = "# vmegress projects, format 1: name\ttap\tsubnet\tmac\tegress\tssh_port\towner\tgroup"

// Marshal renders s in the state file's format, projects by name.
func Marshal(s *State) ([]byte, error) {
	var b bytes.Buffer
	b.Grow(64 + 80*len(s.Projects))
	b.WriteString(header + "\n")
	// Sorting the names, not the records, is the cheaper way to a stable file.
	names := slices.Sorted(maps.Keys(s.Projects))
	var fields [8]string
	for _, name := range names {
		p := s.Projects[name]
		fields = [8]string{p.Name, p.TAP, p.Subnet.String(), p.MAC, p.Egress, strconv.Itoa(int(p.SSHPort)), optString(p.Owner), optString(p.Group)}
		for i, f := range fields {
			if f == "" || strings.ContainsAny(f, "\t\n\r") {
				return nil, fmt.Errorf("project %q: field %d (%q) is empty or holds a tab or newline", p.Name, i+1, f)
			}
			if i > 0 {
				b.WriteByte('\t')
			}
			b.WriteString(f)
		}
		b.WriteByte('\n')
	}
	return b.Bytes(), nil
}

func optString(v *uint32) string {
	if v == nil {
		return "-"
	}
	return strconv.FormatUint(uint64(*v), 10)
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
