package config

import (
	"fmt"
	"strings"
)

// ValidProjectName checks a project name against the one rule the config
// file, the CLI and the API share.
func ValidProjectName(name string) error {
	if !projectNameRE.MatchString(name) {
		return fmt.Errorf("project name %q must be 1-63 characters of a-z, 0-9, '-', '_', starting with a letter or digit", name)
	}
	return nil
}

// ValidTAPName checks an interface name for a project's TAP: 1-15
// characters (the kernel's IFNAMSIZ less its NUL) of letters, digits, '-',
// '_' and '.', not "." or "..".
func ValidTAPName(name string) error {
	ok := name != "" && len(name) <= 15 && name != "." && name != ".." &&
		strings.Trim(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.") == ""
	if !ok {
		return fmt.Errorf("TAP name %q must be 1-15 characters of letters, digits, '-', '_', '.'", name)
	}
	return nil
}
