// Command guestinit is the whole userland of the e2e tests' real microVM: the
// initramfs's /init. It loads the virtio modules, configures eth0 from the
// kernel's ip= argument (as a guest with a built-in driver would get it),
// runs the spec's verification (6.10) and powers off. Its report goes to the
// serial console, one "CHECK name: result" line per check.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// modules, in dependency order, as the test puts them in the initramfs.
var modules = []string{"virtio_ring.ko", "virtio.ko", "virtio_mmio.ko", "failover.ko", "net_failover.ko", "virtio_net.ko"}

func main() {
	defer func() {
		fmt.Println("VMEGRESS-GUEST-DONE")
		unix.Sync()
		unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	}()
	os.MkdirAll("/proc", 0o755)
	os.MkdirAll("/sys", 0o755)
	os.MkdirAll("/dev", 0o755)
	unix.Mount("proc", "/proc", "proc", 0, "")
	unix.Mount("sysfs", "/sys", "sysfs", 0, "")
	unix.Mount("devtmpfs", "/dev", "devtmpfs", 0, "")
	for _, m := range modules {
		if err := load("/modules/" + m); err != nil {
			ents, _ := os.ReadDir("/")
			var names []string
			for _, e := range ents {
				names = append(names, e.Name())
			}
			fmt.Printf("CHECK module %s: FAIL %v (/ holds %v)\n", m, err, names)
			return
		}
	}
	if err := configure(); err != nil {
		fmt.Printf("CHECK network: FAIL %v\n", err)
		return
	}
	fmt.Println("CHECK network: OK")
	check("github", "https://www.github.com")
	check("example", "https://example.com")
}

func load(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.FinitModule(int(f.Fd()), "", 0); err != nil && err != unix.EEXIST {
		return err
	}
	return nil
}

// configure applies ip=<client>::<gw>:<mask>::<dev>:off:<dns> to eth0.
func configure() error {
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return err
	}
	var ipArg string
	for _, f := range strings.Fields(string(cmdline)) {
		if v, ok := strings.CutPrefix(f, "ip="); ok {
			ipArg = v
		}
	}
	p := strings.Split(ipArg, ":")
	if len(p) < 8 {
		return fmt.Errorf("no usable ip= argument in %q", cmdline)
	}
	var link netlink.Link
	for i := 0; i < 100; i++ {
		if link, err = netlink.LinkByName("eth0"); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("no eth0: %w", err)
	}
	mask := net.IPMask(net.ParseIP(p[3]).To4())
	if err := netlink.AddrAdd(link, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(p[0]), Mask: mask}}); err != nil {
		return fmt.Errorf("address: %w", err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return err
	}
	lo, _ := netlink.LinkByName("lo")
	netlink.LinkSetUp(lo)
	if err := netlink.RouteAdd(&netlink.Route{Gw: net.ParseIP(p[2])}); err != nil {
		return fmt.Errorf("default route: %w", err)
	}
	os.MkdirAll("/etc", 0o755)
	return os.WriteFile("/etc/resolv.conf", []byte("nameserver "+p[7]+"\n"), 0o644)
}

func check(name, url string) {
	pool := x509.NewCertPool()
	if pem, err := os.ReadFile("/ca.pem"); err == nil {
		pool.AppendCertsFromPEM(pem)
	}
	client := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	resp, err := client.Get(url)
	if err != nil {
		fmt.Printf("CHECK %s: REFUSED %v\n", name, err)
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
	fmt.Printf("CHECK %s: OK %d %s\n", name, resp.StatusCode, strings.TrimSpace(string(body)))
}
