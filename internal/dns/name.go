package dns

import (
	"fmt"
	"strings"

	mdns "github.com/miekg/dns"

	"github.com/vmegress/vmegress/internal/config"
)

// maxWireName is the longest domain name in wire format (RFC 1035 §3.1).
const maxWireName = 255

// QueryName returns the host name a question asks for, decided on its wire
// labels, not on its presentation text: the miekg/dns library shows a label
// holding a '.' as "\." ("secret\.github.com" is the two labels
// [secret.github, com]), so matching the text against "*.github.com" would
// allow a name that is not under github.com at all. Every label must hold
// host name bytes only (letters, digits, '-', '_'); then the labels joined by
// '.' are the name, checked and normalised by config.HostName like every
// other name vmegress matches.
func QueryName(q string) (string, error) {
	labels, err := WireLabels(q)
	if err != nil {
		return "", err
	}
	for _, l := range labels {
		for i := 0; i < len(l); i++ {
			if !config.IsHostByte(l[i]) {
				return "", fmt.Errorf("label %q holds byte %#02x, outside host names (letters, digits, '-', '_')", l, l[i])
			}
		}
	}
	name, err := config.HostName(strings.Join(labels, "."))
	if err != nil {
		return "", fmt.Errorf("not a host name: %w", err)
	}
	return name, nil
}

// WireLabels returns the labels of a presentation-format domain name as they
// go on the wire (escapes resolved: "a\.b.c" is ["a.b", "c"]), without the
// root label.
func WireLabels(q string) ([]string, error) {
	buf := make([]byte, maxWireName)
	n, err := mdns.PackDomainName(mdns.Fqdn(q), buf, 0, nil, false)
	if err != nil {
		return nil, fmt.Errorf("encoding the name %q: %w", q, err)
	}
	var labels []string
	for off := 0; off < n; {
		l := int(buf[off])
		off++
		if l == 0 || off+l > n {
			break
		}
		labels = append(labels, string(buf[off:off+l]))
		off += l
	}
	return labels, nil
}
