package hostnet

import (
	"context"
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// WatchAddrsAndRoutes calls changed after every address or route change
// of the network namespace ns (nil: the caller's), from its first call on,
// until ctx ends; it returns once both subscriptions are in place (or with
// the error that kept them from being made). lost is called, once, when a
// subscription ends or fails before ctx does (the kernel dropped events or
// the socket broke): from then on changes may go untold.
func WatchAddrsAndRoutes(ctx context.Context, ns *netns.NsHandle, changed func(), lost func(error)) error {
	done := make(chan struct{})
	addrs := make(chan netlink.AddrUpdate, 64) // drained at once: only a signal
	routes := make(chan netlink.RouteUpdate, 64)
	errs := make(chan error, 2)
	onErr := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{Namespace: ns, ErrorCallback: onErr}); err != nil {
		close(done)
		return fmt.Errorf("subscribing to address changes: %w", err)
	}
	if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{Namespace: ns, ErrorCallback: onErr}); err != nil {
		close(done)
		return fmt.Errorf("subscribing to route changes: %w", err)
	}
	go func() {
		defer close(done)
		for {
			select {
			case <-ctx.Done():
				return
			case _, ok := <-addrs:
				if !ok {
					lost(errors.New("the address subscription ended"))
					return
				}
				changed()
			case _, ok := <-routes:
				if !ok {
					lost(errors.New("the route subscription ended"))
					return
				}
				changed()
			case err := <-errs:
				lost(err)
				return
			}
		}
	}()
	return nil
}
