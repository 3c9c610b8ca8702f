package doctor

import (
	"context"
	"errors"
	"strings"
	"testing"
)

func TestUpstreamDNS(t *testing.T) {
	probe := func(_ context.Context, u string) error {
		if u == "192.0.2.10:53" {
			return nil
		}
		return errors.New("asking " + u + ": i/o timeout")
	}
	r := UpstreamDNS(context.Background(), []string{"127.0.0.53:53"}, probe)
	if r.OK || !strings.Contains(r.Detail, "127.0.0.53:53: i/o timeout") || !strings.Contains(r.Fix, "/run/systemd/resolve/resolv.conf") {
		t.Errorf("no upstream answers: %+v", r)
	}
	r = UpstreamDNS(context.Background(), []string{"127.0.0.53:53", "192.0.2.10:53"}, probe)
	if !r.OK || !strings.Contains(r.Detail, "192.0.2.10:53 answer") || !strings.Contains(r.Detail, "not answering: asking 127.0.0.53:53") {
		t.Errorf("one answers: %+v", r)
	}
	if r := UpstreamDNS(context.Background(), nil, probe); r.OK {
		t.Errorf("no upstreams: %+v", r)
	}
}
