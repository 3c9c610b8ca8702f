package config

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// NormalizeName checks a host name pattern of an sni or http rule and returns
// it in canonical form: lower case, without a trailing dot. A pattern is an
// exact name ("github.com") or "*." followed by a name ("*.github.com", any
// depth of subdomain but not the apex). Labels are letters, digits, '-' and
// '_', 1-63 characters, not starting or ending with '-'; the whole name is at
// most 253 characters. IP addresses are refused: TLS SNI never carries one.
// Anything else is refused too, in particular '\' (a DNS presentation
// escape, as in "secret\.github.com") and every byte outside that set, before
// any case folding (so "\u212a" cannot fold to 'k'): a name accepted here is
// exactly its labels split on '.'.
func NormalizeName(s string) (string, error) {
	if strings.TrimSpace(s) == "" {
		return "", errors.New("name is empty")
	}
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 { // checked before ToLower, which folds some non-ASCII runes to ASCII
			return "", fmt.Errorf("%q has a non-ASCII byte (IDNs are written in their xn-- form)", s)
		}
	}
	name := strings.ToLower(strings.TrimSuffix(s, "."))
	wild := false
	if rest, ok := strings.CutPrefix(name, "*."); ok {
		wild, name = true, rest
	}
	if name == "" {
		return "", fmt.Errorf("%q has no name after the wildcard", s)
	}
	if strings.Contains(name, "*") {
		return "", fmt.Errorf("%q: a wildcard is only allowed as a whole first label, as in *.example.com", s)
	}
	if _, err := netip.ParseAddr(name); err == nil {
		return "", fmt.Errorf("%q is an IP address, not a name (use a cidr rule for addresses)", s)
	}
	if len(name) > 253 {
		return "", fmt.Errorf("%q is longer than 253 characters", s)
	}
	for _, label := range strings.Split(name, ".") {
		if err := checkLabel(label); err != nil {
			return "", fmt.Errorf("%q: %w", s, err)
		}
	}
	if wild {
		return "*." + name, nil
	}
	return name, nil
}

// HostName checks a concrete host name (a DNS question, a TLS server name, an
// HTTP Host) by NormalizeName's rules, wildcards refused, and returns its
// canonical form.
func HostName(s string) (string, error) {
	n, err := NormalizeName(s)
	if err != nil {
		return "", err
	}
	if strings.HasPrefix(n, "*.") {
		return "", fmt.Errorf("%q is a wildcard pattern, not a host name", s)
	}
	return n, nil
}

// IsHostByte reports whether b may appear in a host name label: a letter,
// digit, '-' or '_' (NormalizeName's set, either case).
func IsHostByte(b byte) bool {
	return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' || b == '-' || b == '_'
}

func checkLabel(l string) error {
	if l == "" {
		return errors.New("empty label (two dots in a row?)")
	}
	if len(l) > 63 {
		return fmt.Errorf("label %q is longer than 63 characters", l)
	}
	if l[0] == '-' || l[len(l)-1] == '-' {
		return fmt.Errorf("label %q starts or ends with '-'", l)
	}
	for i := 0; i < len(l); i++ {
		if !IsHostByte(l[i]) {
			return fmt.Errorf("label %q has character %q (allowed: letters, digits, '-', '_')", l, l[i])
		}
	}
	return nil
}
