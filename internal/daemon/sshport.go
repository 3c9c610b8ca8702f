package daemon

import "fmt"

// CheckSSHPort refuses a host port for an inbound SSH forward that would
// take over a host service: below 1024 unless allowPrivileged.
func CheckSSHPort(port uint16, allowPrivileged bool) error {
	if port < 1024 && !allowPrivileged {
		return fmt.Errorf("ssh port %d is below 1024 (a host service's range); pass --allow-privileged-ssh-port (API: allow_privileged_ssh_port) if that is meant", port)
	}
	return nil
}
