package bpf

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pgward/pgward/testenv"
)

const (
	clientUID = 12345
	clientGID = 23456
)

// collector reads a Probes' events until it is closed.
type collector struct{ ch chan Event }

func collect(tb testing.TB, p *Probes) *collector {
	c := &collector{ch: make(chan Event, 1024)}
	go func() {
		defer close(c.ch)
		for {
			e, err := p.Read()
			if errors.Is(err, ErrClosed) {
				return
			}
			if err != nil {
				tb.Errorf("read: %v", err)
				return
			}
			c.ch <- e
		}
	}()
	return c
}

// next returns the next event of process tgid, or fails the test after a second.
func (c *collector) next(tb testing.TB, tgid int) Event {
	tb.Helper()
	e, ok := c.wait(tgid, time.Second)
	if !ok {
		tb.Fatalf("no event from pid %d", tgid)
	}
	return e
}

// wait returns the next event of process tgid within d.
func (c *collector) wait(tgid int, d time.Duration) (Event, bool) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case e, ok := <-c.ch:
			if !ok {
				return Event{}, false
			}
			if e.TGID == uint32(tgid) {
				return e, true
			}
		case <-timer.C:
			return Event{}, false
		}
	}
}

// none fails the test if process tgid emits an event within a short while.
func (c *collector) none(tb testing.TB, tgid int) {
	tb.Helper()
	if e, ok := c.wait(tgid, 200*time.Millisecond); ok {
		tb.Fatalf("unexpected event %+v", e)
	}
}

// checkIdentity compares an event's identity with what the kernel says about the client.
func checkIdentity(tb testing.TB, e Event, c *client, spec clientSpec) {
	tb.Helper()
	if e.TGID != uint32(c.TGID) {
		tb.Errorf("TGID = %d, want %d", e.TGID, c.TGID)
	}
	if !spec.NewPID && e.PID != uint32(c.TID) {
		tb.Errorf("PID = %d, want thread %d", e.PID, c.TID)
	}
	if e.UID != spec.UID || e.GID != spec.GID {
		tb.Errorf("UID, GID = %d, %d, want %d, %d", e.UID, e.GID, spec.UID, spec.GID)
	}
	if e.Comm != spec.Comm {
		tb.Errorf("Comm = %q, want %q", e.Comm, spec.Comm)
	}
	if e.CgroupID != spec.Cgroup.ID {
		tb.Errorf("CgroupID = %d, want %d (%s)", e.CgroupID, spec.Cgroup.ID, spec.Cgroup.Path)
	}
	// /proc/<pid>/stat starttime is start_boottime in USER_HZ (100) ticks.
	if got, want := e.StartTime/(1e9/100), procStartTime(tb, c.TGID); got != want {
		tb.Errorf("StartTime = %d ns = %d ticks, /proc says %d", e.StartTime, got, want)
	}
	if want := procNSPID(tb, c.TGID); e.NSPID != want {
		tb.Errorf("NSPID = %d, want %d", e.NSPID, want)
	}
	if e.Inode == 0 || e.Inode != c.Inode {
		tb.Errorf("Inode = %d, want the client's socket inode %d", e.Inode, c.Inode)
	}
	if e.Time == 0 {
		tb.Error("Time not set")
	}
}

// socketDir is a directory for socket files that any uid may reach.
func socketDir(tb testing.TB) string {
	dir, err := os.MkdirTemp("", "pgward-sock-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	return dir
}

func listenUnix(tb testing.TB, path string) net.Listener {
	tb.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		tb.Fatal(err)
	}
	if path[0] != '@' {
		if err := os.Chmod(path, 0o777); err != nil {
			tb.Fatal(err)
		}
	}
	acceptAll(tb, ln)
	return ln
}

func listenTCP(tb testing.TB, addr string) netip.AddrPort {
	tb.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	acceptAll(tb, ln)
	return netip.MustParseAddrPort(ln.Addr().String())
}

func loadProbes(tb testing.TB, opts Options) *Probes {
	tb.Helper()
	p, err := Load(opts)
	if err != nil {
		tb.Fatalf("Load: %v", err)
	}
	tb.Cleanup(func() {
		if err := p.Close(); err != nil {
			tb.Errorf("Close: %v", err)
		}
	})
	return p
}

func TestProbeConnect(t *testing.T) {
	requireRoot(t)
	cg := testenv.NewCgroup(t, "")
	p := loadProbes(t, Options{CgroupPath: cg.Path, ExemptTGID: uint32(os.Getpid())})
	events := collect(t, p)

	for _, want := range []string{ProgConnect4, ProgConnect6, ProgConnectUnix} {
		if !slices.Contains(p.Attached(), want) {
			t.Errorf("%s not attached; attached %v, skipped %v", want, p.Attached(), p.Skipped())
		}
	}

	tcp := listenTCP(t, "127.0.0.1:0")
	sockPath := filepath.Join(socketDir(t), ".s.PGSQL.5432")
	listenUnix(t, sockPath)

	spec := func(network, addr string) clientSpec {
		return clientSpec{Network: network, Addr: addr, Comm: "pgw-client", Cgroup: cg, UID: clientUID, GID: clientGID}
	}

	t.Run("guarded tcp4", func(t *testing.T) {
		ep := Endpoint{TCP: tcp}
		if err := p.Guard(ep); err != nil {
			t.Fatal(err)
		}
		defer p.Unguard(ep)

		s := spec("tcp4", tcp.String())
		c := startClient(t, s)
		if c.Errno != 0 {
			t.Fatalf("connect: %v", unix.Errno(c.Errno))
		}
		e := events.next(t, c.TGID)
		if e.Kind != KindConnect4 || !e.Guarded || e.Watched || e.Blocked || e.Family != unix.AF_INET || e.Addr != tcp {
			t.Errorf("event %+v, want a guarded, unblocked connect4 to %s", e, tcp)
		}
		checkIdentity(t, e, c, s)
		events.none(t, c.TGID) // source ports are for watched endpoints
	})

	t.Run("guarded ipv4-mapped tcp6", func(t *testing.T) {
		ep := Endpoint{TCP: tcp}
		if err := p.Guard(ep); err != nil {
			t.Fatal(err)
		}
		defer p.Unguard(ep)

		mapped := netip.AddrPortFrom(netip.AddrFrom16(tcp.Addr().As16()), tcp.Port())
		s := spec("tcp6", mapped.String())
		c := startClient(t, s)
		if c.Errno != 0 {
			t.Fatalf("connect: %v", unix.Errno(c.Errno))
		}
		e := events.next(t, c.TGID)
		if e.Kind != KindConnect6 || !e.Guarded || e.Family != unix.AF_INET6 || e.Addr != mapped {
			t.Errorf("event %+v, want a guarded connect6 to %s", e, mapped)
		}
		checkIdentity(t, e, c, s)
	})

	t.Run("any address on a port", func(t *testing.T) {
		ep := Endpoint{TCP: netip.AddrPortFrom(netip.IPv4Unspecified(), tcp.Port())}
		if err := p.Guard(ep); err != nil {
			t.Fatal(err)
		}
		defer p.Unguard(ep)

		other := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), tcp.Port()) // reaches nothing, but is seen
		c := startClient(t, spec("tcp4", other.String()))
		if e := events.next(t, c.TGID); e.Kind != KindConnect4 || !e.Guarded || e.Addr != other {
			t.Errorf("event %+v, want a guarded connect4 to %s", e, other)
		}
	})

	t.Run("unguarded", func(t *testing.T) {
		c := startClient(t, spec("tcp4", tcp.String()))
		if c.Errno != 0 {
			t.Fatalf("connect: %v", unix.Errno(c.Errno))
		}
		events.none(t, c.TGID)
		u := startClient(t, spec("unix", sockPath))
		if u.Errno != 0 {
			t.Fatalf("connect: %v", unix.Errno(u.Errno))
		}
		events.none(t, u.TGID)
	})

	t.Run("enforce", func(t *testing.T) {
		tcpEP, unixEP := Endpoint{TCP: tcp}, Endpoint{Path: sockPath}
		for _, ep := range []Endpoint{tcpEP, unixEP} {
			if err := p.Guard(ep); err != nil {
				t.Fatal(err)
			}
			defer p.Unguard(ep)
		}
		if err := p.SetEnforce(true); err != nil {
			t.Fatal(err)
		}
		defer p.SetEnforce(false)

		for _, s := range []clientSpec{spec("tcp4", tcp.String()), spec("unix", sockPath)} {
			c := startClient(t, s)
			if unix.Errno(c.Errno) != unix.ECONNREFUSED {
				t.Errorf("%s connect: errno %v, want ECONNREFUSED", s.Network, unix.Errno(c.Errno))
			}
			e := events.next(t, c.TGID)
			if !e.Guarded || !e.Blocked {
				t.Errorf("event %+v, want guarded and blocked", e)
			}
			checkIdentity(t, e, c, s)
		}

		// The exempt process (this one) still connects, without an event.
		cg.Enter(t)
		for _, network := range []string{"tcp", "unix"} {
			addr := tcp.String()
			if network == "unix" {
				addr = sockPath
			}
			conn, err := net.Dial(network, addr)
			if err != nil {
				t.Errorf("exempt %s dial: %v", network, err)
				continue
			}
			conn.Close()
		}
		events.none(t, os.Getpid())
	})

	t.Run("exempt cgroup", func(t *testing.T) {
		child := testenv.NewCgroup(t, cg.Path)
		ep := Endpoint{TCP: tcp}
		if err := p.Guard(ep); err != nil {
			t.Fatal(err)
		}
		defer p.Unguard(ep)
		if err := p.SetExempt(uint32(os.Getpid()), child.ID); err != nil {
			t.Fatal(err)
		}
		defer p.SetExempt(uint32(os.Getpid()), 0)
		if err := p.SetEnforce(true); err != nil {
			t.Fatal(err)
		}
		defer p.SetEnforce(false)

		s := spec("tcp4", tcp.String())
		s.Cgroup = child
		c := startClient(t, s)
		if c.Errno != 0 {
			t.Fatalf("exempt cgroup connect: %v", unix.Errno(c.Errno))
		}
		events.none(t, c.TGID)

		if err := p.SetExempt(0, 1); err == nil {
			t.Error("SetExempt accepted cgroup id 1")
		}
	})

	t.Run("watched unix", func(t *testing.T) {
		ep := Endpoint{Path: sockPath}
		if err := p.Watch(ep); err != nil {
			t.Fatal(err)
		}
		defer p.Unwatch(ep)

		s := spec("unix", sockPath)
		c := startClient(t, s)
		if c.Errno != 0 {
			t.Fatalf("connect: %v", unix.Errno(c.Errno))
		}
		e := events.next(t, c.TGID)
		if e.Kind != KindConnectUnix || !e.Watched || e.Guarded || e.Blocked || e.Path != sockPath || e.Family != unix.AF_UNIX {
			t.Errorf("event %+v, want a watched connect_unix to %s", e, sockPath)
		}
		checkIdentity(t, e, c, s)
	})

	t.Run("watched abstract unix", func(t *testing.T) {
		name := "@pgward-test-" + filepath.Base(cg.Path)
		listenUnix(t, name)
		ep := Endpoint{Path: name}
		if err := p.Watch(ep); err != nil {
			t.Fatal(err)
		}
		defer p.Unwatch(ep)

		c := startClient(t, spec("unix", name))
		if e := events.next(t, c.TGID); e.Kind != KindConnectUnix || !e.Watched || e.Path != name {
			t.Errorf("event %+v, want a watched connect_unix to %s", e, name)
		}
	})

	t.Run("watched tcp in a pid namespace", func(t *testing.T) {
		ep := Endpoint{TCP: tcp}
		if err := p.Watch(ep); err != nil {
			t.Fatal(err)
		}
		defer p.Unwatch(ep)

		s := spec("tcp4", tcp.String())
		s.NewPID = true
		c := startClient(t, s)
		e := events.next(t, c.TGID)
		if e.Kind != KindConnect4 || !e.Watched || e.Guarded {
			t.Errorf("event %+v, want a watched connect4", e)
		}
		if e.NSPID != 1 {
			t.Errorf("NSPID = %d, want 1 (the client is its pid namespace's init)", e.NSPID)
		}
		checkIdentity(t, e, c, s)

		if !slices.Contains(p.Attached(), ProgInetSockSetState) {
			t.Fatalf("%s not attached by Watch; skipped %v", ProgInetSockSetState, p.Skipped())
		}
		est := events.next(t, c.TGID)
		if est.Kind != KindTCPEstablished || est.Src.String() != c.Local || est.Addr != tcp || !est.Watched {
			t.Errorf("event %+v, want tcp_established %s -> %s", est, c.Local, tcp)
		}
		checkIdentity(t, est, c, s)
	})

	if n := p.Lost(); n != 0 {
		t.Errorf("Lost = %d", n)
	}
}

// TestProbeUnixTracepointFallback checks sys_enter_connect, which Load uses
// for Unix sockets when cgroup/connect_unix is missing (Linux < 6.7).
func TestProbeUnixTracepointFallback(t *testing.T) {
	requireRoot(t)
	cg := testenv.NewCgroup(t, "")
	// The program set without connect_unix, as a kernel < 6.7 leaves it.
	spec, err := loadConnect()
	if err != nil {
		t.Fatal(err)
	}
	delete(spec.Programs, connectProgConnectUnix)
	p, err := load(spec, Options{CgroupPath: cg.Path, ExemptTGID: uint32(os.Getpid()), Enforce: true})
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	if !slices.Contains(p.Attached(), ProgSysEnterConnect) || slices.Contains(p.Attached(), ProgConnectUnix) {
		t.Fatalf("attached %v, skipped %v: want the tracepoint instead of connect_unix", p.Attached(), p.Skipped())
	}
	events := collect(t, p)

	sockPath := filepath.Join(socketDir(t), "guarded.sock")
	listenUnix(t, sockPath)
	if err := p.Guard(Endpoint{Path: sockPath}); err != nil {
		t.Fatal(err)
	}
	s := clientSpec{Network: "unix", Addr: sockPath, Comm: "pgw-fallback", Cgroup: cg, UID: clientUID, GID: clientGID}
	c := startClient(t, s)
	if c.Errno != 0 {
		t.Fatalf("connect: %v (the fallback must only observe)", unix.Errno(c.Errno))
	}
	e := events.next(t, c.TGID)
	if e.Kind != KindConnectUnixTP || !e.Guarded || e.Blocked || e.Path != sockPath {
		t.Errorf("event %+v, want an unblocked guarded sys_enter_connect", e)
	}
	// The tracepoint is not bound to a cgroup: the identity is still the client's.
	checkIdentity(t, e, c, s)
}

func TestProbeOptions(t *testing.T) {
	if _, err := Load(Options{ExemptCgroupID: 1}); err == nil {
		t.Error("Load accepted exempt cgroup id 1")
	}
	if _, err := Load(Options{RingBufferSize: 1000}); err == nil {
		t.Error("Load accepted a ring buffer size that is not a power of two")
	}
}

func TestProbeEndpoint(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    Endpoint
		wantErr bool
	}{
		{in: "127.0.0.1:5432", want: Endpoint{TCP: netip.MustParseAddrPort("127.0.0.1:5432")}},
		{in: "[::1]:5432", want: Endpoint{TCP: netip.MustParseAddrPort("[::1]:5432")}},
		{in: ":5432", want: Endpoint{TCP: netip.MustParseAddrPort("[::]:5432")}},
		{in: "/run/pgward/.s.PGSQL.5432", want: Endpoint{Path: "/run/pgward/.s.PGSQL.5432"}},
		{in: "@pgward", want: Endpoint{Path: "@pgward"}},
		{in: "@", wantErr: true},
		{in: "127.0.0.1:0", wantErr: true},
		{in: "db.internal:5432", wantErr: true},
		{in: "/" + string(make([]byte, 107)), wantErr: true},
		{in: "", wantErr: true},
	} {
		got, err := ParseEndpoint(tc.in)
		if (err != nil) != tc.wantErr || (err == nil && got != tc.want) {
			t.Errorf("ParseEndpoint(%q) = %+v, %v; want %+v, error %v", tc.in, got, err, tc.want, tc.wantErr)
		}
	}

	// IPv4 and its mapped form share a key; the unspecified address is the wildcard.
	v4 := Endpoint{TCP: netip.MustParseAddrPort("10.0.0.1:5432")}
	mapped := Endpoint{TCP: netip.MustParseAddrPort("[::ffff:10.0.0.1]:5432")}
	if v4.tcpKey() != mapped.tcpKey() {
		t.Error("IPv4 and IPv4-mapped endpoints have different keys")
	}
	any4 := Endpoint{TCP: netip.MustParseAddrPort("0.0.0.0:5432")}
	any6 := Endpoint{TCP: netip.MustParseAddrPort("[::]:5432")}
	if k := any4.tcpKey(); k != any6.tcpKey() || k.Addr != [16]byte{} {
		t.Error("unspecified endpoints are not the all-zero wildcard")
	}
}

func TestCgroup2Root(t *testing.T) {
	root, err := Cgroup2Root()
	if err != nil {
		testenv.SkipUnlessCI(t, "no cgroup2: %v", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil || st.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Errorf("Cgroup2Root() = %s: not a cgroup2 mount (%v)", root, err)
	}
	if got := unescapeMountinfo(`/a\040b`); got != "/a b" {
		t.Errorf("unescapeMountinfo = %q", got)
	}
}
