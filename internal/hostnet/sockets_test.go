package hostnet

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// diagHandle is a netlink handle with NETLINK_INET_DIAG in the named netns.
func diagHandle(t *testing.T, ns string) *netlink.Handle {
	t.Helper()
	h, err := netns.GetFromName(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE, unix.NETLINK_INET_DIAG)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nl.Close)
	return nl
}

// TestCheckPortFree (issue 12, item 11): a port the host listens on is
// refused, naming the process that listens.
func TestCheckPortFree(t *testing.T) {
	_, ns := enterNS(t)
	nl := diagHandle(t, ns)
	l, err := net.Listen("tcp", "127.0.0.1:0") // in ns: the thread is there
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	err = CheckPortFree(nl, port, "")
	me, _ := os.ReadFile("/proc/self/comm")
	want := fmt.Sprintf("%s (pid %d) on 127.0.0.1:%d", strings.TrimSpace(string(me)), os.Getpid(), port)
	if !errors.Is(err, ErrPortInUse) || !strings.Contains(err.Error(), want) {
		t.Errorf("CheckPortFree(%d) = %v; want ErrPortInUse naming %q", port, err, want)
	}
	l6, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l6.Close()
	if p6 := uint16(l6.Addr().(*net.TCPAddr).Port); !errors.Is(CheckPortFree(nl, p6, ""), ErrPortInUse) {
		t.Errorf("an IPv6 listener on %d was not found", p6)
	}
	// Nothing listens on port 1 of a fresh namespace.
	if err := CheckPortFree(nl, 1, ""); err != nil {
		t.Errorf("CheckPortFree(1) = %v", err)
	}
}
