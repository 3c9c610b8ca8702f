package hostnet

import (
	"context"
	"os/exec"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/vmegress/vmegress/internal/nettest"
)

// TestWatchAddrsAndRoutes: an address and a route added in a throwaway
// namespace are both told.
func TestWatchAddrsAndRoutes(t *testing.T) {
	nettest.Privileged(t)
	ns := nettest.NewNS(t)
	h, err := netns.GetFromName(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	changed := make(chan struct{}, 64)
	if err := WatchAddrsAndRoutes(ctx, &h, func() { changed <- struct{}{} }, func(err error) { t.Errorf("lost: %v", err) }); err != nil {
		t.Fatal(err)
	}
	run := func(argv ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, argv...)...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", argv, err, out)
		}
	}
	wait := func(what string) {
		t.Helper()
		select {
		case <-changed:
		case <-time.After(10 * time.Second): // a bound on a hang, not a speed assertion
			t.Fatalf("%s was not told", what)
		}
		for len(changed) > 0 { // one change may be told more than once
			<-changed
		}
	}
	run("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
	run("ip", "link", "set", "d0", "up")
	for len(changed) > 0 {
		<-changed
	}
	run("ip", "addr", "add", "192.0.2.1/32", "dev", "d0")
	wait("an address added")
	run("ip", "route", "add", "198.51.100.0/24", "dev", "d0")
	wait("a route added")
}
