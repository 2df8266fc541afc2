package agent

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pgward/pgward/bpf"
	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/testenv"
)

// The tracker's table, without a kernel.

func newTableTracker(size int, wait time.Duration) *Tracker {
	return &Tracker{
		log:     slog.New(slog.DiscardHandler),
		opts:    TrackerOptions{TableSize: size, MatchWait: wait},
		order:   list.New(),
		unix:    map[uint64]*list.Element{},
		tcp:     map[tcpKey]*list.Element{},
		changed: make(chan struct{}),
	}
}

func watchedUnix(tgid uint32, inode uint64) ConnectRecord {
	return ConnectRecord{bpf.Event{Kind: bpf.KindConnectUnix, TGID: tgid, Inode: inode, Watched: true, Path: "/run/pgward/.s.PGSQL.5432"}}
}

func TestTrackerTable(t *testing.T) {
	tr := newTableTracker(2, 10*time.Millisecond)
	for i := uint64(1); i <= 4; i++ {
		tr.handle(watchedUnix(uint32(100+i), i))
	}
	if got := tr.evicted.Load(); got != 2 {
		t.Errorf("evicted = %d, want 2", got)
	}
	ctx := context.Background()
	find := func(ino uint64) (ConnectRecord, bool) {
		return tr.wait(ctx, func() (*list.Element, bool) { el, ok := tr.unix[ino]; return el, ok })
	}
	for ino, want := range map[uint64]bool{1: false, 2: false, 3: true, 4: true} {
		r, ok := find(ino)
		if ok != want || (ok && r.TGID != uint32(100+ino)) {
			t.Errorf("inode %d: %+v, %v; want found %v", ino, r, ok, want)
		}
	}
	// A record is matched once.
	if _, ok := find(4); ok {
		t.Error("inode 4 matched twice")
	}

	// Not watched (a direct connect only), and TCP connects without a source port, are not kept.
	tr.handle(ConnectRecord{bpf.Event{Kind: bpf.KindConnectUnix, Inode: 9, Guarded: true}})
	tr.handle(ConnectRecord{bpf.Event{Kind: bpf.KindConnect4, Inode: 10, Watched: true}})
	if tr.order.Len() != 0 {
		t.Errorf("table holds %d records, want 0", tr.order.Len())
	}

	// IPv4-mapped and plain IPv4 4-tuples are the same connection.
	src, dst := netip.MustParseAddrPort("[::ffff:127.0.0.1]:40000"), netip.MustParseAddrPort("[::ffff:127.0.0.1]:5432")
	tr.handle(ConnectRecord{bpf.Event{Kind: bpf.KindTCPEstablished, TGID: 7, Src: src, Addr: dst, Watched: true}})
	if r, ok := tr.lookupTCP(ctx, netip.MustParseAddrPort("127.0.0.1:5432"), netip.MustParseAddrPort("127.0.0.1:40000")); !ok || r.TGID != 7 {
		t.Errorf("LookupTCP = %+v, %v", r, ok)
	}
}

func TestTrackerLateEvent(t *testing.T) {
	tr := newTableTracker(16, time.Second)
	go func() {
		time.Sleep(20 * time.Millisecond)
		tr.handle(watchedUnix(5, 55))
	}()
	start := time.Now()
	r, ok := tr.wait(context.Background(), func() (*list.Element, bool) { el, ok := tr.unix[55]; return el, ok })
	if !ok || r.TGID != 5 {
		t.Fatalf("late record not found: %+v, %v", r, ok)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Errorf("found after %v", d)
	}

	tr.opts.MatchWait = 30 * time.Millisecond
	start = time.Now()
	if _, ok := tr.wait(context.Background(), func() (*list.Element, bool) { return nil, false }); ok {
		t.Error("found a record that never came")
	}
	if d := time.Since(start); d < 30*time.Millisecond || d > time.Second {
		t.Errorf("gave up after %v, want MatchWait", d)
	}
}

// The tracker against the kernel: clients in a child cgroup, as other uids.

// trClient is a process that connected once, as startTrClient reports it.
type trClient struct {
	PID   int
	Inode uint64
	Errno int
}

// startTrClient runs a process in cg, as uid:gid, that connects once to
// network/addr, reports, and keeps the connection until the test ends.
func startTrClient(t *testing.T, cg testenv.Cgroup, uid uint32, network, addr string) *trClient {
	t.Helper()
	bin, err := testenv.TestBinary()
	if err != nil {
		t.Fatal(err)
	}
	cmd := testenv.RunAs(uid, uid, bin, "-test.run=^TestTrackerClientProcess$")
	cmd.Env = append(cmd.Env, "PGWARD_TRACKER_CLIENT="+network+" "+addr)
	c := &trClient{}
	c.PID = testenv.StartChild(t, cg, cmd, c).Cmd.Process.Pid
	return c
}

// TestTrackerClientProcess is the client that startTrClient runs.
func TestTrackerClientProcess(t *testing.T) {
	spec := os.Getenv("PGWARD_TRACKER_CLIENT")
	if spec == "" {
		return // not a test: the client process of the tracker tests, run by it with its variable set (a skip would fail make test under CI=true)
	}
	runtime.LockOSThread()
	network, addr, _ := strings.Cut(spec, " ")
	var (
		family int
		sa     unix.Sockaddr
	)
	if network == "unix" {
		family, sa = unix.AF_UNIX, &unix.SockaddrUnix{Name: addr}
	} else {
		ap := netip.MustParseAddrPort(addr)
		family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var st unix.Stat_t
	unix.Fstat(fd, &st)
	res := struct {
		Inode uint64
		Errno int
	}{Inode: st.Ino}
	if err := unix.Connect(fd, sa); err != nil {
		var errno unix.Errno
		errors.As(err, &errno)
		res.Errno = int(errno)
	}
	testenv.Report(res)
}

// runTracker starts a tracker on cg and runs it until the test ends.
func runTracker(t *testing.T, opts TrackerOptions) *Tracker {
	t.Helper()
	tr, err := NewTracker(opts, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("NewTracker: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- tr.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		if err := tr.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return tr
}

func TestTrackerUnix(t *testing.T) {
	testenv.RequireRoot(t)
	cg := testenv.NewCgroup(t, "")
	ids := testenv.UnprivilegedIDs(t, 2)

	dir, err := os.MkdirTemp("", "pgward-tracker-sock-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	path := filepath.Join(dir, ".s.PGSQL.5432")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	os.Chmod(path, 0o777)

	tr := runTracker(t, TrackerOptions{CgroupPath: cg.Path, Watch: []bpf.Endpoint{{Path: path}}})

	// Two clients of different uids connect before either is accepted: each
	// accepted connection must match its own client exactly.
	clients := map[int]*trClient{}
	for _, uid := range ids {
		c := startTrClient(t, cg, uid, "unix", path)
		if c.Errno != 0 {
			t.Fatalf("connect: %v", unix.Errno(c.Errno))
		}
		clients[c.PID] = c
	}
	for range ids {
		conn, err := ln.AcceptUnix()
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_, peer, err := PeerInode(conn)
		if err != nil {
			t.Fatalf("PeerInode: %v", err)
		}
		cred := peerCred(t, conn)

		r, ok := tr.LookupUnix(conn)
		if !ok {
			t.Fatalf("no record for the connection from pid %d", cred.Pid)
		}
		c := clients[int(cred.Pid)]
		if c == nil || r.TGID != uint32(cred.Pid) || r.UID != cred.Uid || r.GID != cred.Gid {
			t.Fatalf("record %+v for a connection from pid %d uid %d", r.Event, cred.Pid, cred.Uid)
		}
		if r.Inode != peer || r.Inode != c.Inode {
			t.Errorf("record inode %d, unix_diag peer %d, client socket %d", r.Inode, peer, c.Inode)
		}
		if r.CgroupID != cg.ID || r.Comm != "client" || r.StartTime == 0 || r.NSPID != uint32(cred.Pid) {
			t.Errorf("record %+v: want cgroup %d, comm client, start time, nspid %d", r.Event, cg.ID, cred.Pid)
		}
	}

	// AttestUnix, as the resolver calls it.
	c := startTrClient(t, cg, ids[0], "unix", path)
	conn, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cred := peerCred(t, conn)
	id := broker.Identity{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}
	if ok, err := tr.AttestUnix(context.Background(), conn, &id); !ok || err != nil {
		t.Fatalf("AttestUnix = %v, %v", ok, err)
	}
	if !id.Attested || id.CgroupID != cg.ID || id.Comm != "client" || id.PID != int32(c.PID) {
		t.Errorf("attested identity %+v", id)
	}

	// A connection nobody recorded (this process, outside the cgroup) does
	// not match, after MatchWait.
	mine, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer mine.Close()
	conn, err = ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if r, ok := tr.LookupUnix(conn); ok {
		t.Errorf("matched %+v to an unrecorded connection", r.Event)
	}

	if s := tr.Stats(); s.Events < 3 || s.Lost != 0 || len(s.Attached) == 0 {
		t.Errorf("Stats = %+v", s)
	}
}

func peerCred(t *testing.T, conn *net.UnixConn) *unix.Ucred {
	t.Helper()
	raw, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var cred *unix.Ucred
	var credErr error
	raw.Control(func(fd uintptr) { cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) })
	if credErr != nil {
		t.Fatal(credErr)
	}
	return cred
}

func TestTrackerTCP(t *testing.T) {
	testenv.RequireRoot(t)
	cg := testenv.NewCgroup(t, "")
	uid := testenv.UnprivilegedIDs(t, 1)[0]

	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := netip.MustParseAddrPort(ln.Addr().String())
	tr := runTracker(t, TrackerOptions{CgroupPath: cg.Path, Watch: []bpf.Endpoint{{TCP: addr}}})

	c := startTrClient(t, cg, uid, "tcp4", addr.String())
	if c.Errno != 0 {
		t.Fatalf("connect: %v", unix.Errno(c.Errno))
	}
	conn, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	remote := netip.MustParseAddrPort(conn.RemoteAddr().String())

	r, ok := tr.LookupTCP(addr, remote)
	if !ok {
		t.Fatalf("no record for %s -> %s", remote, addr)
	}
	if r.TGID != uint32(c.PID) || r.UID != uid || r.Src != remote || r.Inode != c.Inode || r.CgroupID != cg.ID {
		t.Errorf("record %+v, want pid %d uid %d from %s", r.Event, c.PID, uid, remote)
	}

	// Another connection on the same listener, from this process: no record.
	mine, err := net.Dial("tcp4", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer mine.Close()
	conn2, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close()
	if _, ok, err := tr.AttestTCP(context.Background(), conn2); ok || err != nil {
		t.Errorf("AttestTCP of an unrecorded connection = %v, %v", ok, err)
	}
}

func TestTrackerDirectConnects(t *testing.T) {
	testenv.RequireRoot(t)
	cg := testenv.NewCgroup(t, "")
	uid := testenv.UnprivilegedIDs(t, 1)[0]

	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	db := netip.MustParseAddrPort(ln.Addr().String())

	direct := make(chan ConnectRecord, 4)
	tr := runTracker(t, TrackerOptions{
		CgroupPath: cg.Path,
		Guard:      []bpf.Endpoint{{TCP: db}},
		OnDirect:   func(r ConnectRecord) { direct <- r },
	})
	next := func() ConnectRecord {
		t.Helper()
		select {
		case r := <-direct:
			return r
		case <-time.After(time.Second):
			t.Fatal("no direct connect reported")
		}
		return ConnectRecord{}
	}

	c := startTrClient(t, cg, uid, "tcp4", db.String())
	if r := next(); c.Errno != 0 || r.TGID != uint32(c.PID) || r.Blocked || r.Addr != db {
		t.Errorf("observed direct connect: errno %d, record %+v", c.Errno, r.Event)
	}

	if err := tr.SetEnforce(true); err != nil {
		t.Fatal(err)
	}
	c = startTrClient(t, cg, uid, "tcp4", db.String())
	if r := next(); unix.Errno(c.Errno) != unix.ECONNREFUSED || r.TGID != uint32(c.PID) || !r.Blocked {
		t.Errorf("enforced direct connect: errno %v, record %+v", unix.Errno(c.Errno), r.Event)
	}

	// Unguarded again: nothing reported, connect works.
	if err := tr.SetGuarded(nil); err != nil {
		t.Fatal(err)
	}
	c = startTrClient(t, cg, uid, "tcp4", db.String())
	select {
	case r := <-direct:
		t.Errorf("unguarded connect reported: %+v", r.Event)
	case <-time.After(200 * time.Millisecond):
	}
	if c.Errno != 0 {
		t.Errorf("unguarded connect: %v", unix.Errno(c.Errno))
	}
}

// Without the privileges for eBPF, NewTracker says ErrEBPFUnavailable, which
// `ebpf.enabled: auto` falls back on. As root (where eBPF is available) the
// test runs itself again as an unprivileged uid, with
// PGWARD_TRACKER_UNPRIVILEGED=1.
func TestTrackerUnavailable(t *testing.T) {
	child := os.Getenv("PGWARD_TRACKER_UNPRIVILEGED") == "1"
	if os.Geteuid() == 0 && !child {
		uid := testenv.UnprivilegedIDs(t, 1)[0]
		bin, err := testenv.TestBinary()
		if err != nil {
			t.Fatal(err)
		}
		cmd := testenv.RunAs(uid, uid, bin, "-test.run=^TestTrackerUnavailable$", "-test.v")
		cmd.Env = append(cmd.Env, "PGWARD_TRACKER_UNPRIVILEGED=1")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--- PASS: TestTrackerUnavailable") {
			t.Fatalf("as uid %d: %v\n%s", uid, err, out)
		}
		return
	}
	if child && os.Geteuid() == 0 {
		t.Fatal("the unprivileged run of TestTrackerUnavailable runs as root")
	}
	tr, err := NewTracker(TrackerOptions{}, slog.New(slog.DiscardHandler))
	if err == nil {
		tr.Close()
	}
	if !errors.Is(err, ErrEBPFUnavailable) {
		t.Errorf("NewTracker as uid %d: %v, want ErrEBPFUnavailable", os.Geteuid(), err)
	}
}
