package config

import (
	"errors"
	"fmt"
	"regexp"
)

// ProjectNameRule and TAPNameRule are the one documented rule for each kind
// of name, quoted in every error that refuses one. A project name ends up in
// file names, the state file (tab-separated), nft set elements, TAP names,
// log lines and URLs; a TAP name in /proc/sys paths and in the ruleset.
const (
	ProjectNameRule = "1-63 characters of a-z, 0-9, '-', '_', starting with a letter or digit"
	TAPNameRule     = "1-15 characters of A-Z, a-z, 0-9, '-', '_' and '.', not starting with '-' or '.' (so never . or ..)"
)

// MaxTAPName is the kernel's limit on an interface name: IFNAMSIZ (16)
// less the terminating NUL.
const MaxTAPName = 15

var (
	projectNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)
	tapNameRE     = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$`)
)

// ErrBadName is wrapped by every error of ValidProjectName and
// ValidTAPName.
var ErrBadName = errors.New("invalid name")

// ValidProjectName checks a project name against ProjectNameRule.
func ValidProjectName(name string) error {
	if !projectNameRE.MatchString(name) {
		return fmt.Errorf("%w: project name %q must be %s", ErrBadName, name, ProjectNameRule)
	}
	return nil
}

// ValidTAPName checks an interface name against TAPNameRule: a subset
// of what Linux accepts (no '/', ':', whitespace or NUL; not "." or ".."),
// safe in a path under /proc/sys and in an nft set element.
func ValidTAPName(name string) error {
	if !tapNameRE.MatchString(name) {
		return fmt.Errorf("%w: TAP name %q must be %s", ErrBadName, name, TAPNameRule)
	}
	return nil
}
