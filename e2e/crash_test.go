package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmegress/vmegress/client"
	"github.com/vmegress/vmegress/internal/state"
	"github.com/vmegress/vmegress/internal/world"
)

// crashRounds is how many times the daemon is killed (each round: churn,
// kill -9 at a random moment, restart, checks; under a second each).
const crashRounds = 30

// TestCrashConsistency: kill -9 of the daemon at random points while
// projects are placed and removed through the API and the config file is
// rewritten and reloaded leaves, after the next start, the state, the TAPs
// and the ruleset consistent, and never an open path: the steady project's
// guest still reaches only what its policy allows, every TAP the state lists
// exists, a TAP the state does not list is harmless (a guest interface with
// forwarding off, in no project: the ruleset and the proxy refuse its
// traffic; placing its project again adopts it), no guest interface
// forwards, and doctor's ruleset and policy routing checks pass.
func TestCrashConsistency(t *testing.T) {
	t.Parallel()
	cfgA := "projects:\n  filep:\n    allow:\n      - sni: github.com\n"
	cfgB := "projects:\n  filep:\n    allow:\n      - sni: www.github.com\n      - sni: example.com\n"
	e := newWorldWith(t, nil, cfgA)
	e.start()
	c := client.New(e.w.APISocket())
	steady, err := c.PutProject(e.ctx, "steady", client.ProjectSpec{Policy: &client.Policy{Allow: sni("www.github.com")}})
	if err != nil {
		t.Fatalf("placing steady: %v", err)
	}
	g := e.plug(steady)
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0))
	for round := 0; round < crashRounds; round++ {
		d := e.d
		ctx, stop := context.WithCancel(e.ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			for i := 0; ctx.Err() == nil; i++ {
				name := fmt.Sprintf("churn%d", i%3)
				if i%2 == 0 {
					c.PutProject(ctx, name, client.ProjectSpec{Policy: &client.Policy{Allow: sni("github.com")}})
				} else {
					c.DeleteProject(ctx, fmt.Sprintf("churn%d", (i+1)%3))
				}
				if i%3 == 0 {
					body := cfgA
					if i%6 == 0 {
						body = cfgB
					}
					e.writeConfig(body)
					d.Cmd.Process.Signal(syscall.SIGHUP)
				}
			}
		}()
		// Somewhere in the churn: 20–400 ms in.
		time.Sleep(time.Duration(20+rng.IntN(380)) * time.Millisecond)
		d.Kill()
		stop()
		<-done
		e.start()
		checkAfterCrash(t, e, c, g, round)
		if t.Failed() {
			t.Fatalf("round %d (seed %d) left an inconsistency", round, seed)
		}
	}
}

func checkAfterCrash(t *testing.T, e *env, c *client.Client, g *world.Guest, round int) {
	t.Helper()
	// The steady project's guest is still filtered by its policy.
	if body, err := e.curlFrom(g, "https://www.github.com"); err != nil || !strings.HasPrefix(body, "hello from") {
		t.Errorf("round %d: steady's guest no longer reaches what its policy allows: %q, %v", round, body, err)
	}
	if body, err := e.curlFrom(g, "https://example.com", "--resolve", "example.com:443:"+world.ExampleIP.String()); err == nil {
		t.Errorf("round %d: steady's guest reached a denied destination: %q", round, body)
	}
	st, err := state.Store{Dir: e.w.StateDir()}.Load()
	if err != nil {
		t.Fatalf("round %d: reading the state: %v", round, err)
	}
	out, err := world.Output(e.ctx, world.NS(e.w.Host, "ip", "-j", "link", "show")...)
	if err != nil {
		t.Fatal(err)
	}
	var links []struct {
		Name string `json:"ifname"`
	}
	if err := json.Unmarshal([]byte(out), &links); err != nil {
		t.Fatalf("ip -j link: %v", err)
	}
	have := map[string]bool{}
	for _, l := range links {
		have[l.Name] = true
	}
	listed := map[string]bool{}
	for _, p := range st.Projects {
		listed[p.TAP] = true
		if !have[p.TAP] {
			t.Errorf("round %d: the state lists %s on %s, which does not exist", round, p.Name, p.TAP)
		}
	}
	// No guest interface forwards (every project here is proxied). /proc/sys/net
	// shows the namespace of the thread that reads it.
	for name := range have {
		if !strings.HasPrefix(name, "tap-") {
			continue
		}
		var fwd []byte
		err := world.InNS(e.w.Host, func() error {
			var err error
			fwd, err = os.ReadFile("/proc/sys/net/ipv4/conf/" + name + "/forwarding")
			return err
		})
		if err != nil {
			t.Errorf("round %d: reading forwarding of %s: %v", round, name, err)
		} else if strings.TrimSpace(string(fwd)) != "0" {
			t.Errorf("round %d: guest interface %s forwards", round, name)
		}
	}
	// A TAP the state does not list: created by a placement the kill cut
	// short. Harmless: forwarding off (checked above: no kernel path), in
	// no project's /30 (the proxy and resolver refuse it), and adopted when
	// its project is placed again (the churn does so every round).
	for name := range have {
		if !strings.HasPrefix(name, "tap-") || listed[name] {
			continue
		}
		t.Logf("round %d: %s exists and the state does not list it", round, name)
	}
	// The API lists exactly the projects the state holds.
	ps, err := c.Projects(e.ctx)
	if err != nil {
		t.Fatalf("round %d: listing projects: %v", round, err)
	}
	var names []string
	for _, p := range ps {
		if p.Placement != nil {
			names = append(names, p.Name)
		}
	}
	var want []string
	for n := range st.Projects {
		want = append(want, n)
	}
	slices.Sort(names)
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Errorf("round %d: the API lists %v placed, the state %v", round, names, want)
	}
	doc, _ := e.vmegress("--config", e.cfg, "doctor", "--json")
	var results []struct {
		Name   string `json:"name"`
		OK     bool   `json:"ok"`
		Detail string `json:"detail"`
	}
	if err := json.Unmarshal([]byte(doc), &results); err != nil {
		t.Fatalf("doctor --json: %v\n%s", err, doc)
	}
	for _, r := range results {
		switch r.Name {
		case "ruleset", "policy routing": // "guest interfaces" fails on TAPs no VM holds (down): not a crash's doing
			if !r.OK {
				t.Errorf("round %d: doctor's %s check fails: %s", round, r.Name, r.Detail)
			}
		}
	}
}
