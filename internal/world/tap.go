package world

import (
	"context"
	"fmt"
	"net/netip"
	"os"

	"golang.org/x/sys/unix"
)

// openTAP attaches to TAP name in namespace ns (IFF_TAP|IFF_NO_PI).
func openTAP(ns, name string) (*os.File, error) {
	var f *os.File
	err := InNS(ns, func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("opening /dev/net/tun: %w", err)
		}
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			unix.Close(fd)
			return err
		}
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			return fmt.Errorf("attaching to TAP %s: %w", name, err)
		}
		f = os.NewFile(uintptr(fd), name)
		return nil
	})
	return f, err
}

// relay copies Ethernet frames from src to dst until either fails.
func relay(dst, src *os.File) {
	buf := make([]byte, 65536)
	for {
		n, err := src.Read(buf)
		if err != nil {
			return
		}
		if _, err := dst.Write(buf[:n]); err != nil {
			return
		}
	}
}

// PlugTAP plays the microVM behind a TAP that `vmegress net up` made on the
// host: a guest namespace gets its own TAP "eth0" (the guest's MAC, address
// and default route, as the kernel's ip= argument would set them), and the
// world copies frames between the two TAPs in user space, as Firecracker
// does between the TAP and the guest's virtio-net.
func (w *World) PlugTAP(ctx context.Context, project, hostTAP string, guestIP, hostIP netip.Addr, mac string) (*Guest, error) {
	g := &Guest{Name: project, NS: fmt.Sprintf("%s-vm%d", w.ID, len(w.Guests)), TAP: hostTAP,
		HostIP: hostIP, GuestIP: guestIP, Subnet: netip.PrefixFrom(hostIP, 30).Masked()}
	if err := w.addNS(ctx, g.NS); err != nil {
		return nil, err
	}
	steps := [][]string{
		NS(g.NS, "ip", "tuntap", "add", "eth0", "mode", "tap"),
		NS(g.NS, "ip", "link", "set", "eth0", "address", mac),
		NS(g.NS, "ip", "addr", "add", guestIP.String()+"/30", "dev", "eth0"),
		NS(g.NS, "ip", "link", "set", "eth0", "up"),
		NS(g.NS, "ip", "route", "add", "default", "via", hostIP.String()),
	}
	for _, s := range steps {
		if err := Run(ctx, s...); err != nil {
			return nil, fmt.Errorf("building guest %s: %w", project, err)
		}
	}
	if err := writeEtc(g.NS, "127.0.0.1 localhost\n", "nameserver "+GuestNameserver.String()+"\n"); err != nil {
		return nil, err
	}
	host, err := openTAP(w.Host, hostTAP)
	if err != nil {
		return nil, err
	}
	guest, err := openTAP(g.NS, "eth0")
	if err != nil {
		host.Close()
		return nil, err
	}
	go relay(guest, host)
	go relay(host, guest)
	w.onClose(func() { host.Close(); guest.Close() })
	w.mu.Lock()
	w.Guests = append(w.Guests, g)
	w.mu.Unlock()
	return g, nil
}
