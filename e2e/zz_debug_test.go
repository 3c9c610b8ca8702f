package e2e

import (
	"testing"

	"github.com/vmegress/vmegress/client"
)

func TestZZDebug(t *testing.T) {
	e := newWorldWith(t, nil, "projects:\n  filep:\n    allow:\n      - sni: github.com\n")
	e.start()
	c := client.New(e.w.APISocket())
	if _, err := c.PutProject(e.ctx, "steady", client.ProjectSpec{Policy: &client.Policy{Allow: sni("www.github.com")}}); err != nil {
		t.Fatal(err)
	}
	doc, _ := e.vmegress("--config", e.cfg, "doctor")
	t.Log(doc)
	out, _ := e.vmegress("--config", e.cfg, "status")
	t.Log(out)
}
