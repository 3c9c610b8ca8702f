package config

import (
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// ParsePolicy validates one project's policy given on its own (an API body
// or a file for `vmegress policy set`): a YAML or JSON mapping with the keys
// of a project in the config file but subnet (mode, max_connections,
// allow, deny). The rules and messages are the config file's; each issue also
// carries the path of the value at fault (Issue.Field).
func ParsePolicy(file, name string, data []byte) (Project, error) {
	if file == "" {
		file = "<policy>"
	}
	p := &parser{file: file, cfg: Default()}
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return Project{}, &Error{File: file, Issues: []Issue{{Pos: Position{1, 1}, Msg: "invalid policy: " + strings.TrimPrefix(err.Error(), "yaml: ")}}}
	}
	if len(doc.Content) == 0 {
		return Project{}, &Error{File: file, Issues: []Issue{{Pos: Position{1, 1}, Msg: "policy is empty"}}}
	}
	root := doc.Content[0]
	if root.Kind == yaml.MappingNode {
		for i := 0; i+1 < len(root.Content); i += 2 {
			if root.Content[i].Value == "subnet" {
				p.errf(root.Content[i], "subnet is not part of a policy: it is the project's placement")
			}
		}
	}
	key := &yaml.Node{Kind: yaml.ScalarNode, Value: name, Line: 1, Column: 1}
	if err := ValidProjectName(name); err != nil {
		p.errf(key, "%v", err)
	}
	p.project(key, root)
	if len(p.issues) > 0 {
		for i := range p.issues {
			p.issues[i].Field = pathOf(root, p.issues[i].node)
		}
		return Project{}, &Error{File: file, Issues: p.issues}
	}
	pr := p.cfg.Projects[len(p.cfg.Projects)-1]
	pr.Pos = Position{}
	for i := range pr.Allow {
		pr.Allow[i].Pos = Position{}
	}
	for i := range pr.Deny {
		pr.Deny[i].Pos = Position{}
	}
	return pr, nil
}

// pathOf names target's place under root: "allow[2].ports[0]", or "" for
// root itself or a node not found.
func pathOf(root, target *yaml.Node) string {
	var walk func(n *yaml.Node, path string) (string, bool)
	walk = func(n *yaml.Node, path string) (string, bool) {
		if n == target {
			return path, true
		}
		switch n.Kind {
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				k, v := n.Content[i], n.Content[i+1]
				sub := k.Value
				if path != "" {
					sub = path + "." + k.Value
				}
				if k == target {
					return sub, true
				}
				if got, ok := walk(v, sub); ok {
					return got, true
				}
			}
		case yaml.SequenceNode:
			for i, e := range n.Content {
				if got, ok := walk(e, path+"["+strconv.Itoa(i)+"]"); ok {
					return got, true
				}
			}
		}
		return "", false
	}
	got, _ := walk(root, "")
	return got
}

// PolicyDocument renders a project's policy in ParsePolicy's JSON form (what
// the API returns and the state directory keeps for API projects). A
// preset's rules are rendered as the one {preset: NAME} entry they came from.
func PolicyDocument(p Project) map[string]any {
	doc := map[string]any{"mode": p.Mode, "max_connections": p.MaxConnections, "allow": ruleDocuments(p.Allow)}
	if len(p.Deny) > 0 {
		doc["deny"] = ruleDocuments(p.Deny)
	}
	return doc
}

func ruleDocuments(rules []Rule) []map[string]any {
	out := make([]map[string]any, 0, len(rules))
	for i := 0; i < len(rules); i++ {
		r := rules[i]
		if r.Preset != "" {
			// One entry for one expansion: a preset named twice stays twice.
			out = append(out, map[string]any{"preset": r.Preset})
			if pre, ok := LookupPreset(r.Preset); ok {
				if exp, err := pre.Rules(listAllow); err == nil {
					i += len(exp) - 1
				}
			}
			continue
		}
		m := map[string]any{}
		switch r.Kind {
		case KindCIDR:
			m["cidr"] = r.Prefix.String()
		default:
			m[string(r.Kind)] = r.Name
		}
		if len(r.Ports) > 0 {
			m["ports"] = r.Ports
		}
		if len(r.Methods) > 0 {
			m["methods"] = r.Methods
		}
		if len(r.Paths) > 0 {
			m["paths"] = r.Paths
		}
		if len(r.Inject) > 0 {
			inj := map[string]string{}
			for _, h := range r.Inject {
				inj[h.Name] = h.Value
			}
			m["inject"] = inj
		}
		out = append(out, m)
	}
	return out
}

// FirstField returns the field of err's first issue ("" if none).
func FirstField(err error) string {
	if ce, ok := err.(*Error); ok && len(ce.Issues) > 0 {
		return ce.Issues[0].Field
	}
	return ""
}
