package bpf

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Test helpers: a temporary child cgroup, and clients started in it as
// separate processes (this test binary re-executed), as any uid.

func requireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("loading eBPF programs and creating cgroups needs root")
	}
}

type cgroup struct {
	path string
	id   uint64 // the directory's inode: the cgroup v2 id
}

// newCgroup creates a temporary cgroup under parent ("" = the cgroup2 root).
func newCgroup(tb testing.TB, parent string) cgroup {
	tb.Helper()
	if parent == "" {
		root, err := Cgroup2Root()
		if err != nil {
			tb.Skipf("no cgroup2: %v", err)
		}
		parent = root
	}
	dir, err := os.MkdirTemp(parent, "pgward-test-")
	if err != nil {
		tb.Fatalf("create cgroup: %v", err)
	}
	tb.Cleanup(func() {
		// Exited clients leave the cgroup asynchronously.
		for i := 0; ; i++ {
			err := unix.Rmdir(dir)
			if err == nil || errors.Is(err, unix.ENOENT) {
				return
			}
			if i == 50 {
				tb.Errorf("remove cgroup %s: %v", dir, err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		tb.Fatal(err)
	}
	return cgroup{path: dir, id: st.Ino}
}

// enterCgroup moves this whole test process into cg until the test ends.
func enterCgroup(tb testing.TB, cg cgroup) {
	tb.Helper()
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		tb.Fatal(err)
	}
	var orig string
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			orig = rest
		}
	}
	root, err := Cgroup2Root()
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(cg.path, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
		tb.Fatalf("enter cgroup: %v", err)
	}
	tb.Cleanup(func() {
		back := filepath.Join(root, orig, "cgroup.procs")
		if err := os.WriteFile(back, []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			tb.Errorf("leave cgroup: %v", err)
		}
	})
}

// helperBinary is a copy of this test binary that any uid may execute.
var helperBinary = sync.OnceValues(func() (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "pgward-helper-")
	if err != nil {
		return "", err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", err
	}
	src, err := os.Open(self)
	if err != nil {
		return "", err
	}
	defer src.Close()
	path := filepath.Join(dir, "client")
	dst, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
	if err != nil {
		return "", err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return "", err
	}
	return path, dst.Close()
})

// clientSpec describes one client connect.
type clientSpec struct {
	Network string // tcp4, tcp6 or unix
	Addr    string // ip:port or socket path
	Comm    string // the connecting thread's name
	Cgroup  cgroup // run in this cgroup
	UID     uint32 // run as uid/gid (0: root)
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
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

func (c *client) Close() error {
	c.stdin.Close()
	return c.cmd.Wait()
}

const helperMarker = "PGWARD-HELPER-RESULT "

// startClient starts a client process that connects once, reports, and holds
// its socket open until Close.
func startClient(tb testing.TB, spec clientSpec) *client {
	tb.Helper()
	bin, err := helperBinary()
	if err != nil {
		tb.Fatalf("helper binary: %v", err)
	}
	dir, err := os.Open(spec.Cgroup.path)
	if err != nil {
		tb.Fatal(err)
	}
	defer dir.Close()

	cmd := exec.Command(bin, "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(),
		"PGWARD_HELPER=1",
		"PGWARD_HELPER_NET="+spec.Network,
		"PGWARD_HELPER_ADDR="+spec.Addr,
		"PGWARD_HELPER_COMM="+spec.Comm,
	)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	if spec.UID != 0 || spec.GID != 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: spec.UID, Gid: spec.GID}
	}
	if spec.NewPID {
		cmd.SysProcAttr.Cloneflags |= syscall.CLONE_NEWPID
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start client: %v", err)
	}
	c := &client{cmd: cmd, stdin: stdin}
	tb.Cleanup(func() { c.Close() })

	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), helperMarker); ok {
			if err := json.Unmarshal([]byte(rest), &c.clientResult); err != nil {
				tb.Fatal(err)
			}
			c.TGID = cmd.Process.Pid
			go io.Copy(io.Discard, stdout)
			return c
		}
	}
	tb.Fatalf("client reported nothing: %v", sc.Err())
	return nil
}

// TestHelperProcess is the client that startClient runs.
func TestHelperProcess(t *testing.T) {
	if os.Getenv("PGWARD_HELPER") != "1" {
		t.Skip("the client process of other tests")
	}
	runtime.LockOSThread()
	res, err := helperConnect(os.Getenv("PGWARD_HELPER_NET"), os.Getenv("PGWARD_HELPER_ADDR"), os.Getenv("PGWARD_HELPER_COMM"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(2)
	}
	b, _ := json.Marshal(res)
	fmt.Printf("%s%s\n", helperMarker, b)
	io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
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
