package client_test

import (
	"context"
	"fmt"
	"log"

	"github.com/vmegress/vmegress/client"
)

// An orchestrator's life cycle of one sandbox: place it with its policy,
// show its user what is blocked, widen the policy while it runs, remove it.
func Example() {
	ctx := context.Background()
	c := client.New(client.DefaultSocket)
	jailer := uint32(1000)
	pl, err := c.PutProject(ctx, "sbx-42", client.ProjectSpec{Owner: &jailer,
		Policy: &client.Policy{Allow: []client.Rule{{SNI: "pypi.org"}, {SNI: "files.pythonhosted.org"}}}})
	if err != nil {
		log.Fatal(err)
	}
	// Start the microVM on pl.TAP with pl.MAC and the kernel argument pl.KernelIP
	// (or PUT pl.Firecraker as Firecracker's network interface).
	fmt.Println(pl.TAP, pl.GuestIP, pl.KernelIP)

	watch, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		for ev, err := range c.Events(watch, client.EventFilter{Project: "sbx-42", Verdict: "deny"}) {
			if err != nil {
				return
			}
			fmt.Printf("blocked: %s %s%s%s: %s\n", ev.Type, ev.Dst, ev.SNI, ev.Host+ev.Name, ev.Reason)
		}
	}()

	if _, err := c.SetPolicy(ctx, "sbx-42", client.Policy{Allow: []client.Rule{{SNI: "*.github.com"}, {Preset: "pypi"}}}); err != nil {
		log.Fatal(err)
	}
	if _, err := c.DeleteProject(ctx, "sbx-42"); err != nil {
		log.Fatal(err)
	}
}
