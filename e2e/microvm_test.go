package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmegress/vmegress/internal/nettest"
	"github.com/vmegress/vmegress/internal/world"
)

// cpioNewc writes an initramfs (cpio "newc") holding files (path → content,
// mode), with their parent directories.
func cpioNewc(files map[string][]byte, modes map[string]uint32) []byte {
	var b bytes.Buffer
	ino := 1
	entry := func(name string, mode uint32, data []byte) {
		fmt.Fprintf(&b, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
		ino++
		b.WriteString(name)
		b.WriteByte(0)
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
		b.Write(data)
		for b.Len()%4 != 0 {
			b.WriteByte(0)
		}
	}
	dirs := map[string]bool{}
	var names []string
	for n := range files {
		names = append(names, n)
		for d := filepath.Dir(n); d != "." && d != "/"; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	var dl []string
	for d := range dirs {
		dl = append(dl, d)
	}
	sort.Strings(dl)
	for _, d := range dl {
		entry(d, 0o040755, nil)
	}
	sort.Strings(names)
	for _, n := range names {
		entry(n, 0o100000|modes[n], files[n])
	}
	entry("TRAILER!!!", 0, nil)
	return b.Bytes()
}

// guestModules are the virtio modules Debian's kernel needs for a microvm's NIC.
var guestModules = map[string]string{
	"virtio.ko":       "kernel/drivers/virtio/virtio.ko",
	"virtio_ring.ko":  "kernel/drivers/virtio/virtio_ring.ko",
	"virtio_mmio.ko":  "kernel/drivers/virtio/virtio_mmio.ko",
	"failover.ko":     "kernel/net/core/failover.ko",
	"net_failover.ko": "kernel/drivers/net/net_failover.ko",
	"virtio_net.ko":   "kernel/drivers/net/virtio_net.ko",
}

func cpuKHz() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "cpu MHz"); ok {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":")), 64)
			if err == nil {
				return strconv.Itoa(int(mhz * 1000))
			}
		}
	}
	return ""
}

// TestRealMicroVM boots a real Linux guest (QEMU's microvm machine, Debian's
// kernel, nothing in userland but a static init) behind a TAP made by
// `vmegress net up`, and runs the spec's verification from inside it: only
// its kernel, its ip= argument and vmegress on the host stand between it and
// the fake internet.
func TestRealMicroVM(t *testing.T) {
	t.Parallel()
	nettest.Privileged(t, "qemu-system-x86_64")
	kdir := os.Getenv("VMEGRESS_GUEST_KERNEL_DIR")
	if kdir == "" {
		if nettest.Required() {
			t.Fatal("VMEGRESS_E2E=1 but VMEGRESS_GUEST_KERNEL_DIR (an unpacked Debian linux-image package) is not set")
		}
		t.Skip("VMEGRESS_GUEST_KERNEL_DIR not set")
	}
	vmlinuz, _ := filepath.Glob(filepath.Join(kdir, "boot", "vmlinuz-*"))
	moddirs, _ := filepath.Glob(filepath.Join(kdir, "lib", "modules", "*"))
	if len(vmlinuz) != 1 || len(moddirs) != 1 {
		t.Fatalf("no kernel and modules under %s", kdir)
	}
	e := newWorldWith(t, nil, `projects:
  alpha:
    allow:
      - sni: github.com
      - sni: "*.github.com"
`)
	e.start()
	_, info := e.netUpOnly("alpha")

	// The initramfs: the static init, the modules, the world's CA.
	dir := t.TempDir()
	initBin := filepath.Join(dir, "init")
	build := exec.Command("go", "build", "-o", initBin, "./guestinit")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the guest init: %v\n%s", err, out)
	}
	files := map[string][]byte{}
	modes := map[string]uint32{}
	add := func(name, path string, mode uint32) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		files[name], modes[name] = b, mode
	}
	add("init", initBin, 0o755)
	add("ca.pem", e.w.CAFile, 0o644)
	for name, rel := range guestModules {
		add("modules/"+name, filepath.Join(moddirs[0], rel), 0o644)
	}
	initrd := filepath.Join(dir, "initrd.cpio")
	if err := os.WriteFile(initrd, cpioNewc(files, modes), 0o644); err != nil {
		t.Fatal(err)
	}

	cmdline := "console=ttyS0 panic=-1 quiet " + info["kernel_ip_arg"].(string)
	if khz := cpuKHz(); khz != "" {
		cmdline += " tsc_early_khz=" + khz
	}
	args := []string{"netns", "exec", e.w.Host, "qemu-system-x86_64", "-M", "microvm", "-m", "256", "-nographic", "-no-reboot",
		"-kernel", vmlinuz[0], "-initrd", initrd, "-append", cmdline,
		"-netdev", "tap,id=n0,ifname=" + info["tap"].(string) + ",script=no,downscript=no",
		"-device", "virtio-net-device,netdev=n0,mac=" + info["mac"].(string)}
	// Software emulation (TCG): /dev/kvm may exist here but nested KVM
	// refuses some of the host CPU's MSRs, and the figure that matters is
	// what the guest can reach, not how fast it boots.
	args = append(args, "-cpu", "max")
	ctx, cancel := context.WithTimeout(e.ctx, 120*time.Second)
	defer cancel()
	start := time.Now()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	console := string(out)
	t.Logf("guest ran %s:\n%s", time.Since(start).Round(time.Millisecond), grep(console, "CHECK"))
	if err != nil || !strings.Contains(console, "VMEGRESS-GUEST-DONE") {
		t.Fatalf("guest did not finish (%v); console:\n%s", err, console)
	}
	for _, want := range []string{"CHECK network: OK", "CHECK github: OK 200 hello from www.github.com", "CHECK example: REFUSED"} {
		if !strings.Contains(console, want) {
			t.Errorf("console lacks %q:\n%s", want, grep(console, "CHECK"))
		}
	}
	// The guest powered off with its connection open, so the proxy has not
	// logged it yet; the server saw it, from the host's address.
	if h := e.hits("tls:www.github.com"); len(h) == 0 || !strings.HasPrefix(h[0].Remote, world.HostUplinkIP.String()+":") {
		t.Errorf("www.github.com's server saw %+v", h)
	}
	e.accessLine("msg", "dns", "name", "example.com", "verdict", "deny")
	if h := e.hits("tls:example.com"); len(h) > 0 {
		t.Errorf("example.com's server saw the guest: %+v", h)
	}
	e.noLeaks()
}

// netUpOnly runs `vmegress net up` without plugging a namespace guest.
func (e *env) netUpOnly(project string) (string, map[string]any) {
	e.t.Helper()
	out, err := e.vmegress("--config", e.cfg, "net", "up", project, "--json")
	if err != nil {
		e.t.Fatalf("net up %s: %v", project, err)
	}
	var info map[string]any
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		e.t.Fatalf("net up --json: %v\n%s", err, out)
	}
	return out, info
}
