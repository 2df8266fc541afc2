package bpf

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/pgward/pgward/testenv"
)

// Test helpers: clients started as separate processes (this test binary
// re-executed, see testenv.StartChild) in a temporary cgroup, as any uid.

func requireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		testenv.SkipUnlessCI(tb, "loading eBPF programs and creating cgroups needs root")
	}
}

// clientSpec describes one client connect.
type clientSpec struct {
	Network string         // tcp4, tcp6 or unix
	Addr    string         // ip:port or socket path
	Comm    string         // the connecting thread's name
	Cgroup  testenv.Cgroup // run in this cgroup
	UID     uint32         // run as uid/gid (0: root)
	GID     uint32
	NewPID  bool // in a new pid namespace
}

// clientResult is what the client reports about its connect.
type clientResult struct {
	TGID  int    // as seen by the test (host pid)
	TID   int    // the connecting thread, as the client sees it
	Inode uint64 // its socket's inode
	Errno int    // of connect(), 0 on success
	Local string // its TCP source address
}

// client is a running client process; Close ends it.
type client struct {
	clientResult
	*testenv.Child
}

// startClient starts a client process that connects once, reports, and holds
// its socket open until Close.
func startClient(tb testing.TB, spec clientSpec) *client {
	tb.Helper()
	bin, err := testenv.TestBinary()
	if err != nil {
		tb.Fatalf("helper binary: %v", err)
	}
	cmd := testenv.RunAs(spec.UID, spec.GID, bin, "-test.run=^TestHelperProcess$")
	cmd.Env = append(cmd.Env,
		"PGWARD_HELPER=1",
		"PGWARD_HELPER_NET="+spec.Network,
		"PGWARD_HELPER_ADDR="+spec.Addr,
		"PGWARD_HELPER_COMM="+spec.Comm,
	)
	if spec.NewPID {
		if cmd.SysProcAttr == nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		cmd.SysProcAttr.Cloneflags |= syscall.CLONE_NEWPID
	}
	c := &client{}
	c.Child = testenv.StartChild(tb, spec.Cgroup, cmd, &c.clientResult)
	c.TGID = c.Cmd.Process.Pid
	return c
}

// TestHelperProcess is the client that startClient runs.
func TestHelperProcess(t *testing.T) {
	if os.Getenv("PGWARD_HELPER") != "1" {
		return // not a test: the client process of other tests, run by it with its variable set (a skip would fail make test under CI=true)
	}
	runtime.LockOSThread()
	res, err := helperConnect(os.Getenv("PGWARD_HELPER_NET"), os.Getenv("PGWARD_HELPER_ADDR"), os.Getenv("PGWARD_HELPER_COMM"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(2)
	}
	testenv.Report(res)
}

// helperConnect connects with raw system calls on the current (locked)
// thread, so that the thread's comm and id are the ones the kernel records.
func helperConnect(network, addr, comm string) (clientResult, error) {
	var res clientResult
	if comm != "" {
		name := append([]byte(comm), 0)
		err := unix.Prctl(unix.PR_SET_NAME, uintptr(unsafe.Pointer(&name[0])), 0, 0, 0)
		runtime.KeepAlive(name)
		if err != nil {
			return res, fmt.Errorf("set comm: %w", err)
		}
	}
	res.TID = unix.Gettid()

	var (
		family int
		sa     unix.Sockaddr
	)
	switch network {
	case "tcp4", "tcp6":
		ap, err := netip.ParseAddrPort(addr)
		if err != nil {
			return res, err
		}
		if network == "tcp4" {
			family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
		} else {
			family, sa = unix.AF_INET6, &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
		}
	case "unix":
		family, sa = unix.AF_UNIX, &unix.SockaddrUnix{Name: addr}
	default:
		return res, fmt.Errorf("network %q", network)
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return res, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return res, err
	}
	res.Inode = st.Ino
	if err := unix.Connect(fd, sa); err != nil {
		var errno unix.Errno
		if !errors.As(err, &errno) {
			return res, err
		}
		res.Errno = int(errno)
		return res, nil
	}
	if family != unix.AF_UNIX {
		local, err := unix.Getsockname(fd)
		if err != nil {
			return res, err
		}
		switch a := local.(type) {
		case *unix.SockaddrInet4:
			res.Local = netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)).String()
		case *unix.SockaddrInet6:
			res.Local = netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port)).String()
		}
	}
	return res, nil // fd stays open until the process exits
}

// procStartTime is /proc/<pid>/stat's starttime (clock ticks since boot).
func procStartTime(tb testing.TB, pid int) uint64 {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		tb.Fatal(err)
	}
	// comm may contain spaces and parentheses: fields start after the last ')'.
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	v, err := strconv.ParseUint(fields[19], 10, 64) // field 22 overall
	if err != nil {
		tb.Fatal(err)
	}
	return v
}

// procNSPID is the last entry of /proc/<pid>/status NSpid.
func procNSPID(tb testing.TB, pid int) uint32 {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			f := strings.Fields(rest)
			v, _ := strconv.ParseUint(f[len(f)-1], 10, 32)
			return uint32(v)
		}
	}
	tb.Fatal("no NSpid")
	return 0
}

// acceptAll accepts and holds connections until the test ends.
func acceptAll(tb testing.TB, ln net.Listener) {
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	tb.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
}
