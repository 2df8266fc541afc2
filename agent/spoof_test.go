package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sys/unix"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/testenv"
)

// Identity-spoofing attempts. Each test backs a claim of
// docs/security-model.md.

// TestSpoofHelperProcess is the client side of the spoofing tests, run as
// another uid (or under unshare, or setuid). PGWARD_SPOOF is "<mode> <socket>".
func TestSpoofHelperProcess(t *testing.T) {
	spec := os.Getenv("PGWARD_SPOOF")
	if spec == "" {
		return // not a test: the client process of the spoofing tests, run by it with its variable set (a skip would fail make test under CI=true)
	}
	f := strings.Fields(spec)
	mode, socket := f[0], f[1]
	dial := func() int { // a raw socket without CLOEXEC, so it survives exec
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
		if err == nil {
			err = unix.Connect(fd, &unix.SockaddrUnix{Name: socket})
		}
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(2)
		}
		return fd
	}
	switch mode {
	case "connect-sleep": // connect and stay
		dial()
		fmt.Printf("PID %d %d\n", os.Getpid(), os.Geteuid())
		time.Sleep(10 * time.Second)
	case "connect-exit": // connect and leave at once
		dial()
		fmt.Printf("PID %d %d\n", os.Getpid(), os.Geteuid())
	case "connect-exec": // connect, then become another program
		fd := dial()
		fmt.Printf("PID %d %d\n", os.Getpid(), os.Geteuid())
		_ = fd
		err := syscall.Exec("/bin/sleep", []string{"sleep", "10"}, os.Environ())
		fmt.Println("ERR", err)
		os.Exit(2)
	case "recv-fd": // receive a connection over SCM_RIGHTS (fd 3) and log in on it
		sock := os.NewFile(3, "scm")
		uc, err := net.FileConn(sock)
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(2)
		}
		buf, oob := make([]byte, 1), make([]byte, unix.CmsgSpace(4))
		_, oobn, _, _, err := uc.(*net.UnixConn).ReadMsgUnix(buf, oob)
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(2)
		}
		msgs, _ := unix.ParseSocketControlMessage(oob[:oobn])
		fds, _ := unix.ParseUnixRights(&msgs[0])
		conn, _ := net.FileConn(os.NewFile(uintptr(fds[0]), "pgward"))
		cfg, err := pgx.ParseConfig(f[2])
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(2)
		}
		cfg.DialFunc = func(context.Context, string, string) (net.Conn, error) { return conn, nil }
		c, err := pgx.ConnectConfig(context.Background(), cfg)
		if err != nil {
			fmt.Println("ERR", err)
			os.Exit(2)
		}
		var who string
		c.QueryRow(context.Background(), "select current_user").Scan(&who)
		fmt.Printf("USER %s %d\n", who, os.Geteuid())
		c.Close(context.Background())
	}
	os.Exit(0)
}

// spoofListener is a Unix socket any uid may connect to.
func spoofListener(t *testing.T) (*net.UnixListener, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "pgws-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	path := filepath.Join(dir, "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(path, 0o777)
	t.Cleanup(func() { ln.Close() })
	return ln, path
}

// startHelper runs the helper through prefix (e.g. unshare) as uid, and
// returns the accepted connection and the helper's pid and euid as printed.
func startHelper(t *testing.T, ln *net.UnixListener, uid uint32, mode, socket string, prefix ...string) (*net.UnixConn, *exec.Cmd, int, int) {
	t.Helper()
	bin, err := testenv.TestBinary()
	if err != nil {
		t.Fatal(err)
	}
	args := append(append([]string{}, prefix...), bin, "-test.run=^TestSpoofHelperProcess$")
	cmd := testenv.RunAs(uid, uid, args[0], args[1:]...)
	cmd.Env = append(cmd.Env, "PGWARD_SPOOF="+mode+" "+socket)
	out, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	ln.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		var pid, euid int
		if _, err := fmt.Sscanf(sc.Text(), "PID %d %d", &pid, &euid); err == nil {
			go func() {
				for sc.Scan() {
				}
			}()
			return c, cmd, pid, euid
		}
		t.Logf("helper: %s", sc.Text())
	}
	t.Fatal("helper printed no PID")
	return nil, nil, 0, 0
}

// (a) A socket connected by a granted process and passed over SCM_RIGHTS
// to an ungranted one: pgward attributes the session to the process that
// called connect() (SO_PEERCRED is fixed then), so the receiver acts with
// the sender's grant — the socket is a capability its owner chose to
// delegate. The audit names the connecting process.
func TestSpoofSCMRightsAttributedToConnector(t *testing.T) {
	testenv.RequireRoot(t)
	h := newHarness(t, nil)
	uid := testenv.UnprivilegedIDs(t, 1)[0]
	bin, err := testenv.TestBinary()
	if err != nil {
		t.Fatal(err)
	}
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	mine, theirs := os.NewFile(uintptr(pair[0]), "mine"), os.NewFile(uintptr(pair[1]), "theirs")
	defer mine.Close()
	cmd := testenv.RunAs(uid, uid, bin, "-test.run=^TestSpoofHelperProcess$")
	cmd.Env = append(cmd.Env, "PGWARD_SPOOF=recv-fd - postgres://"+testenv.ScramUser+"@/orders?host="+h.dir+"&sslmode=disable")
	cmd.ExtraFiles = []*os.File{theirs}
	outp, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	theirs.Close()
	defer cmd.Wait()
	// This (granted, root) process connects, then hands the socket over.
	conn, err := net.Dial("unix", h.agent.SocketPath())
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := conn.(*net.UnixConn).File()
	conn.Close()
	uc, _ := net.FileConn(mine)
	if _, _, err := uc.(*net.UnixConn).WriteMsgUnix([]byte{1}, unix.UnixRights(int(raw.Fd())), nil); err != nil {
		t.Fatal(err)
	}
	raw.Close()
	sc := bufio.NewScanner(outp)
	var line string
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "USER ") || strings.HasPrefix(sc.Text(), "ERR ") {
			line = sc.Text()
		}
	}
	if want := fmt.Sprintf("USER %s %d", testenv.ScramUser, uid); line != want {
		t.Fatalf("receiver said %q, want %q", line, want)
	}
	ev := findEvent(t, h, "db.session.start", func(ev map[string]any) bool { return ev["success"] == true })
	p := ev["process"].(map[string]any)
	if num(p["uid"]) != 0 || num(p["pid"]) != uint64(os.Getpid()) {
		t.Fatalf("session attributed to %v; want the connecting process (pid %d, uid 0)", p, os.Getpid())
	}
}

// (b) A process that connects and then execs another binary: pgward reads
// /proc/<pid>/exe through the pidfd pin when it resolves the connection, so
// it sees the image running then — the new one — never a stale one of
// another process. (comm from the eBPF record is the connect-time name.)
func TestSpoofExecAfterConnect(t *testing.T) {
	testenv.RequireRoot(t)
	ln, path := spoofListener(t)
	uid := testenv.UnprivilegedIDs(t, 1)[0]
	c, _, pid, _ := startHelper(t, ln, uid, "connect-exec", path)
	deadline := time.Now().Add(5 * time.Second)
	for {
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if strings.HasSuffix(exe, "/sleep") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("helper did not exec: exe %q", exe)
		}
		time.Sleep(10 * time.Millisecond)
	}
	id, err := (&Resolver{}).Resolve(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(id.Exe, "/sleep") || id.PID != int32(pid) || id.UID != uid || !id.Pinned {
		t.Fatalf("after exec pgward saw %+v; want exe …/sleep, pid %d, uid %d, pinned", id, pid, uid)
	}
}

// (c) Pid reuse: a client that connects and exits before pgward resolves
// it is refused (ErrProcessGone): with SO_PEERPIDFD the pin tells a dead
// process from a new one on the same pid, so /proc of a stranger is never
// attributed to the connection.
func TestSpoofDeadConnectorRefused(t *testing.T) {
	testenv.RequireRoot(t)
	ln, path := spoofListener(t)
	uid := testenv.UnprivilegedIDs(t, 1)[0]
	c, cmd, _, _ := startHelper(t, ln, uid, "connect-exit", path)
	cmd.Wait() // exited and reaped: its pid is free for reuse
	_, err := (&Resolver{}).Resolve(context.Background(), c)
	if !errors.Is(err, ErrProcessGone) && !errors.Is(err, ErrNoPeerCredentials) {
		t.Fatalf("resolving a dead connector: %v; want ErrProcessGone", err)
	}
	// End to end: refused with 28000 (TestSpoofDeadConnectorRefused backs
	// the claim; the broker maps any resolver error to 28000).
}

// (d) A client in its own user and pid namespace, root inside it: SO_PEERCRED
// translates into pgward's namespaces, so pgward sees the real (host) uid and
// pid, never the namespace's 0 and 1.
func TestSpoofUserAndPIDNamespace(t *testing.T) {
	testenv.RequireRoot(t)
	ln, path := spoofListener(t)
	uid := testenv.UnprivilegedIDs(t, 1)[0]
	c, _, nspid, nseuid := startHelper(t, ln, uid, "connect-sleep", path, "unshare", "--user", "--map-root-user", "--pid", "--fork")
	if nseuid != 0 || nspid > 2 {
		t.Fatalf("helper not namespaced: pid %d euid %d inside", nspid, nseuid)
	}
	id, err := (&Resolver{}).Resolve(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	if id.UID != uid || id.PID <= 2 {
		t.Fatalf("pgward saw uid %d pid %d; want host uid %d and a host pid (inside: uid 0, pid %d)", id.UID, id.PID, uid, nspid)
	}
}

// (e) A setuid helper: what counts is the effective uid at connect().
func TestSpoofSetuidHelper(t *testing.T) {
	testenv.RequireRoot(t)
	ln, path := spoofListener(t)
	ids := testenv.UnprivilegedIDs(t, 2)
	runner, owner := ids[0], ids[1]
	bin, err := testenv.TestBinary()
	if err != nil {
		t.Fatal(err)
	}
	suid := filepath.Join(filepath.Dir(bin), "suid-"+strconv.Itoa(int(owner)))
	b, _ := os.ReadFile(bin)
	if err := os.WriteFile(suid, b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(suid, int(owner), int(owner)); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(suid, 0o4755|os.ModeSetuid); err != nil {
		t.Fatal(err)
	}
	cmd := testenv.RunAs(runner, runner, suid, "-test.run=^TestSpoofHelperProcess$")
	cmd.Env = append(cmd.Env, "PGWARD_SPOOF=connect-sleep "+path)
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	ln.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var pid, euid int
	fmt.Fscanf(bufio.NewReader(out), "PID %d %d", &pid, &euid)
	if euid != int(owner) {
		testenv.SkipUnlessCI(t, "setuid bit not honoured here (euid %d; nosuid mount?)", euid)
	}
	id, err := (&Resolver{}).Resolve(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	if id.UID != owner {
		t.Fatalf("setuid helper run by uid %d, owned by %d: pgward saw uid %d", runner, owner, id.UID)
	}
}

// lostRecord is an Attester whose connect records were all lost.
type lostRecord struct{}

func (lostRecord) AttestUnix(context.Context, *net.UnixConn, *broker.Identity) (bool, error) {
	return false, nil
}
func (lostRecord) AttestTCP(context.Context, *net.TCPConn) (broker.Identity, bool, error) {
	return broker.Identity{}, false, nil
}

// (f) A process whose connect record was lost (ring buffer overrun, tracker
// down): with identity.require_ebpf it is refused; without, it gets the
// unattested peer-credential identity. End to end: TestEBPFRequireRecord.
func TestSpoofLostConnectRecord(t *testing.T) {
	ln, path := spoofListener(t)
	go func() {
		c, err := net.Dial("unix", path)
		if err == nil {
			time.Sleep(2 * time.Second)
			c.Close()
		}
	}()
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := (&Resolver{Attester: lostRecord{}, RequireEBPF: true}).Resolve(context.Background(), c); !errors.Is(err, ErrNotAttested) {
		t.Fatalf("require_ebpf without a record: %v", err)
	}
	id, err := (&Resolver{Attester: lostRecord{}}).Resolve(context.Background(), c)
	if err != nil || id.Attested {
		t.Fatalf("without require_ebpf: %+v %v", id, err)
	}
}
