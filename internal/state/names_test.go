package state

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/vmegress/vmegress/internal/config"
)

// TestHostileNames: names outside config's rules are neither written nor
// read (issue 12, item 9: "#x" was written, then skipped as a comment when
// read, and its /30 handed to another project).
func TestHostileNames(t *testing.T) {
	good := Project{Name: "beta", TAP: "tap-beta", Subnet: netip.MustParsePrefix("172.31.0.4/30"), MAC: MAC("beta"), Egress: EgressProxy}
	for _, bad := range []Project{
		{Name: "#x", TAP: "tap-x"},
		{Name: "a*", TAP: "tap-a"},
		{Name: "a/b", TAP: "tap-ab"},
		{Name: "../../etc", TAP: "tap-etc"},
		{Name: "x", TAP: "../../etc"},
		{Name: "x", TAP: "tap x"},
	} {
		bad.Subnet, bad.MAC, bad.Egress = netip.MustParsePrefix("172.31.0.0/30"), MAC(bad.Name), EgressProxy
		if _, err := Marshal(&State{Projects: map[string]Project{bad.Name: bad, "beta": good}}); !errors.Is(err, config.ErrBadName) {
			t.Errorf("Marshal(%q, %q): %v; want ErrBadName", bad.Name, bad.TAP, err)
		}
		line := strings.Join([]string{bad.Name, bad.TAP, bad.Subnet.String(), bad.MAC, bad.Egress, "0", "-", "-"}, "\t")
		file := header + "\n" + line + "\n"
		_, err := Unmarshal([]byte(file))
		if strings.HasPrefix(bad.Name, "#") {
			// A comment line by the format: reading it cannot tell; writing it is what is refused.
			continue
		}
		if !errors.Is(err, config.ErrBadName) || !strings.Contains(err.Error(), "line 2") {
			t.Errorf("Unmarshal(%q): %v; want ErrBadName at line 2", line, err)
		}
	}
}
