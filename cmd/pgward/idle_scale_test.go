package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgward/pgward/testenv"
	"github.com/pgward/pgward/testenv/faultpg"
)

// Environment of the re-executed children (see TestMain).
const (
	// envIdleUpstream makes this test binary the fake upstream of
	// TestIdleSessionsScale, listening on the socket file it names.
	envIdleUpstream = "PGWARD_CMD_IDLE_UPSTREAM"
	// envGCAck makes the agent child run debug.FreeOSMemory on SIGUSR1 and
	// then write how many times it has done so to the file it names.
	envGCAck = "PGWARD_CMD_CHILD_GC_ACK"
)

const (
	idleTarget   = 10000 // the figure
	idleWorkers  = 16    // concurrent logins while opening
	idlePassword = "idle-secret"
	idleMaxKiB   = 64 // the bound per idle session
)

// TestIdleSessionsScale holds idleTarget (10,000) idle sessions on one
// agent and measures the agent's RSS per idle session.
//
// Three processes share the descriptors, since RLIMIT_NOFILE is per
// process: pgward (this binary re-executed as `pgward agent`, 2 per
// session), a fake upstream (this binary again, 1 per session) that
// accepts a cleartext login, answers simple queries and otherwise holds the
// connection, and this test with one pgconn client per session (1 each).
// When pgward's hard limit cannot hold 2 × 10,000 plus its own descriptors,
// and cannot be raised (no CAP_SYS_RESOURCE), the test holds as many as fit
// and logs exactly why.
//
// Measured in the agent: VmRSS right after start, with no session, and
// with every session held, each also after debug.FreeOSMemory (SIGUSR1, see
// envGCAck); the per-session figure is the settled difference over N and
// must stay within idleMaxKiB. Goroutines (go_goroutines) and descriptors
// per session are logged. While they are held, a fresh login must work
// quickly, also to a real Postgres when its binaries are installed; at the
// end every session runs a query, and after all close the sessions gauge
// and pgward's descriptors return to their baseline.
//
// PGWARD_IDLE_SESSIONS overrides N. Under -race N is 1,000: the race
// detector dies past 8,128 live goroutines, and pgward runs two per
// session; its shadow memory also makes RSS meaningless, so the bound is
// not asserted there.
func TestIdleSessionsScale(t *testing.T) {
	start := time.Now()
	want := idleTarget
	if v, err := strconv.Atoi(os.Getenv("PGWARD_IDLE_SESSIONS")); err == nil && v > 0 {
		want = v
	}
	if raceEnabled {
		want = min(want, 1000)
	}
	// Children inherit the limits; root with CAP_SYS_RESOURCE may raise the
	// hard one far enough for pgward's 2 descriptors per session. (Every Go
	// process, pgward and the fake upstream too, raises its soft limit to
	// the hard one at start.)
	raised := raiseNoFile(t, uint64(2*want+1000))

	// A real Postgres for the sanity session, when installed (CI requires it).
	var pg *testenv.Postgres
	if _, err := testenv.FindBinDir(); err == nil || testenv.InCI() {
		pg = testenv.Require(t)
	} else {
		t.Logf("no PostgreSQL server binaries (%v): the real-Postgres session is left out", err)
	}

	dir, err := os.MkdirTemp("", "pgwi-") // short: socket paths are limited to 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}

	upSock := filepath.Join(dir, "up.sock")
	up, _ := startTestChild(t, "upstream", []string{envIdleUpstream + "=" + upSock})
	waitDial(t, upSock, up)

	port := freePort(t)
	cfgPath := writeIdleConfig(t, dir, upSock, pg, port, want)
	ack := filepath.Join(dir, "gc.ack")
	agent, agentErr := startTestChild(t, "agent", []string{
		"PGWARD_CMD_CHILD=agent --config " + cfgPath,
		envGCAck + "=" + ack,
		"PGWARD_LOG_LEVEL=warn", "PGWARD_LOG_FORMAT=text",
	})
	waitDial(t, filepath.Join(dir, ".s.PGSQL.5432"), agent)
	metricsURL := fmt.Sprintf("http://127.0.0.1:%d/metrics", port)
	waitHTTP(t, fmt.Sprintf("http://127.0.0.1:%d/readyz", port), agent, agentErr)
	pid := agent.Process.Pid

	// (a) The agent with no session: as it stands, and settled.
	gc := &gcTrigger{t: t, pid: pid, ack: ack}
	idleRaw := procStatusKiB(t, pid, "VmRSS")
	idleRSS := gc.settle()
	baseGo := metricValue(t, metricsURL, "go_goroutines")
	baseFDs := countFDs(t, pid)
	upBaseFDs := countFDs(t, up.Process.Pid)
	soft, hard := noFileLimits(t, pid)

	cfg, err := pgconn.ParseConfig(fmt.Sprintf("host=%s port=5432 user=app dbname=idle sslmode=disable connect_timeout=30", dir))
	if err != nil {
		t.Fatal(err)
	}

	// A few sessions first, to count pgward's descriptors per session.
	opened := time.Now()
	conns := openSessions(t, cfg, idleWorkers)
	perFD := (countFDs(t, pid) - baseFDs + len(conns) - 1) / len(conns)
	if perFD < 2 {
		t.Fatalf("pgward holds %d descriptors for %d sessions; want 2 each", countFDs(t, pid)-baseFDs, len(conns))
	}
	// What fits under pgward's hard limit: its own descriptors, a reserve
	// for the logins in flight (pidfd and a /proc file each), the fresh and
	// the real-Postgres logins and the metrics scrapes, then perFD a session.
	reserve := 4*idleWorkers + 16
	fit := (int(soft) - baseFDs - reserve) / perFD
	n := min(want, fit)
	if n < want {
		t.Logf("holding %d sessions, not %d: pgward's RLIMIT_NOFILE is %d (hard %d) and raising it failed (%v; "+
			"it needs CAP_SYS_RESOURCE); it allows %d fds × N + %d (its own %d at start, %d reserved for %d logins in flight, "+
			"the fresh logins and metrics scrapes), so N ≤ %d",
			n, want, soft, hard, raised, perFD, baseFDs+reserve, baseFDs, reserve, idleWorkers, fit)
		if n < want/2 {
			t.Fatalf("only %d of %d sessions fit under RLIMIT_NOFILE %d", n, want, soft)
		}
	}
	conns = append(conns, openSessions(t, cfg, n-len(conns))...)
	openTime := time.Since(opened)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close(context.Background())
		}
	})

	// (b) The agent holding n idle sessions.
	if got := metricValue(t, metricsURL, "pgward_sessions_active"); got != float64(n) {
		t.Fatalf("pgward_sessions_active %v, want %d", got, n)
	}
	heldGo := metricValue(t, metricsURL, "go_goroutines")
	heldFDs := countFDs(t, pid)
	heldRaw := procStatusKiB(t, pid, "VmRSS")
	heldRSS := gc.settle()
	perKiB := float64(heldRSS-idleRSS) / float64(n)
	t.Logf("pgward idle: VmRSS %d KiB at start, %d KiB settled (debug.FreeOSMemory)", idleRaw, idleRSS)
	t.Logf("pgward with %d idle sessions: VmRSS %d KiB, %d KiB settled: %.1f KiB per idle session (%.1f unsettled); "+
		"%.2f goroutines and %.2f fds per session; opened in %v (%.0f logins/s, %d at a time)",
		n, heldRaw, heldRSS, perKiB, float64(heldRaw-idleRaw)/float64(n),
		(heldGo-baseGo)/float64(n), float64(heldFDs-baseFDs)/float64(n), openTime.Round(time.Millisecond),
		float64(n)/openTime.Seconds(), idleWorkers)
	if raceEnabled {
		t.Logf("-race: the RSS bound is not asserted (shadow memory)")
	} else if perKiB > idleMaxKiB {
		t.Errorf("%.1f KiB per idle session, want ≤ %d KiB", perKiB, idleMaxKiB)
	}

	// A fresh login, while they are held, is still quick.
	freshLogin(t, cfg, "idle", "select 1")
	if pg != nil {
		real := cfg.Copy()
		real.User, real.Database = testenv.ScramUser, "real"
		freshLogin(t, real, "real Postgres", "select count(*) from pg_stat_activity")
	}

	// Every session is alive: each runs a query.
	queried := time.Now()
	var failed atomic.Int64
	var firstErr atomic.Value
	forEach(len(conns), idleWorkers, func(i int) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		res, err := conns[i].Exec(ctx, "select 1").ReadAll()
		if err == nil && (len(res) != 1 || len(res[0].Rows) != 1 || string(res[0].Rows[0][0]) != "1") {
			err = fmt.Errorf("result %v", res)
		}
		if err != nil {
			failed.Add(1)
			firstErr.CompareAndSwap(nil, fmt.Errorf("session %d: %w", i, err))
		}
	})
	if f := failed.Load(); f > 0 {
		t.Fatalf("%d of %d held sessions failed a query; first: %v", f, n, firstErr.Load())
	}
	t.Logf("every held session answered a query, in %v", time.Since(queried).Round(time.Millisecond))

	// All close: the gauge and the descriptors return to their baseline.
	closed := time.Now()
	forEach(len(conns), idleWorkers, func(i int) { conns[i].Close(context.Background()) })
	deadline := time.Now().Add(30 * time.Second)
	for {
		// A scrape may time out while pgward ends thousands of sessions at
		// once on a loaded machine; only the deadline fails the test.
		active, err := scrapeMetric(metricsURL, "pgward_sessions_active")
		if err != nil {
			t.Logf("while the sessions end: %v", err)
		}
		fds, upFDs := countFDs(t, pid), countFDs(t, up.Process.Pid)
		if err == nil && active == 0 && fds <= baseFDs && upFDs <= upBaseFDs {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v after closing: pgward_sessions_active %v (%v), pgward fds %d (baseline %d), upstream fds %d (baseline %d)",
				time.Since(closed).Round(time.Millisecond), active, err, fds, baseFDs, upFDs, upBaseFDs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("all closed; sessions gauge and descriptors back to baseline in %v", time.Since(closed).Round(time.Millisecond))
	stopTestChild(t, agent, agentErr)
	t.Logf("wall time %v", time.Since(start).Round(time.Millisecond))
}

// freshLogin connects with cfg, runs sql and closes, and fails the test when
// that takes more than a few seconds.
func freshLogin(t *testing.T, cfg *pgconn.Config, what, sql string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	began := time.Now()
	c, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatalf("fresh login to %s while the sessions are held: %v", what, err)
	}
	loggedIn := time.Since(began)
	_, err = c.Exec(ctx, sql).ReadAll()
	c.Close(ctx)
	if err != nil {
		t.Fatalf("%s on a fresh session to %s: %v", sql, what, err)
	}
	took := time.Since(began)
	t.Logf("fresh login to %s while the sessions are held: %v, with a query %v", what, loggedIn.Round(time.Microsecond), took.Round(time.Microsecond))
	if took > 3*time.Second {
		t.Errorf("fresh login to %s took %v, want < 3s", what, took)
	}
}

// openSessions logs n clients in, idleWorkers at a time.
func openSessions(t *testing.T, cfg *pgconn.Config, n int) []*pgconn.PgConn {
	t.Helper()
	conns := make([]*pgconn.PgConn, n)
	var failed atomic.Int64
	var firstErr atomic.Value
	forEach(n, idleWorkers, func(i int) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgconn.ConnectConfig(ctx, cfg)
		if err != nil {
			failed.Add(1)
			firstErr.CompareAndSwap(nil, err)
			return
		}
		conns[i] = c
	})
	if f := failed.Load(); f > 0 {
		for _, c := range conns {
			if c != nil {
				c.Close(context.Background())
			}
		}
		t.Fatalf("%d of %d logins failed; first: %v", f, n, firstErr.Load())
	}
	return conns
}

// forEach calls f(0) … f(n-1), workers at a time.
func forEach(n, workers int, f func(int)) {
	next := make(chan int)
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := range next {
				f(i)
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
}

func writeIdleConfig(t *testing.T, dir, upSock string, pg *testenv.Postgres, port, sessions int) string {
	t.Helper()
	secrets := fmt.Sprintf("idle:\n  app: { password: %q }\n", idlePassword)
	upstreams := fmt.Sprintf("  idle: { address: %q, auth: [password] }\n", upSock)
	grants := "  - { principal: me, upstream: idle, roles: [app] }\n"
	if pg != nil {
		secrets += fmt.Sprintf("real:\n  %s: { password: %q }\n", testenv.ScramUser, testenv.ScramPassword)
		upstreams += fmt.Sprintf("  real: { address: %q, database: %q }\n", pg.SocketPath(), testenv.Database)
		grants += fmt.Sprintf("  - { principal: me, upstream: real, roles: [%s] }\n", testenv.ScramUser)
	}
	secretsPath := filepath.Join(dir, "secrets.yaml")
	if err := os.WriteFile(secretsPath, []byte(secrets), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`listen: { unix_dir: %q, port: 5432, max_connections: %d }
upstreams:
%ssecrets: { backend: file, file: { path: %q } }
principals:
  me: { match: { uid: [%d] } }
grants:
%saudit: { path: %q, durability: write }
metrics: { listen: "127.0.0.1:%d" }
ebpf: { enabled: "false" }
`, dir, sessions+1000, upstreams, secretsPath, os.Getuid(), grants, filepath.Join(dir, "audit.jsonl"), port)
	path := filepath.Join(dir, "pgward.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// raiseNoFile raises this process's RLIMIT_NOFILE (and so its children's)
// to want if allowed, else the soft limit to the hard one and returns why
// the hard limit stayed.
func raiseNoFile(t *testing.T, want uint64) error {
	t.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
	lim := syscall.Rlimit{Cur: max(old.Cur, want), Max: max(old.Max, want)}
	err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	if err != nil {
		t.Logf("RLIMIT_NOFILE: cannot raise the hard limit %d to %d: %v", old.Max, want, err)
		lim = syscall.Rlimit{Cur: old.Max, Max: old.Max}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatalf("RLIMIT_NOFILE: soft limit to %d: %v", old.Max, err)
		}
	}
	return err
}

// noFileLimits reads a process's RLIMIT_NOFILE from /proc.
func noFileLimits(t *testing.T, pid int) (soft, hard uint64) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	for l := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(l, "Max open files"); ok {
			f := strings.Fields(rest)
			soft, _ = strconv.ParseUint(f[0], 10, 64)
			hard, _ = strconv.ParseUint(f[1], 10, 64)
			return soft, hard
		}
	}
	t.Fatalf("no Max open files in /proc/%d/limits", pid)
	return 0, 0
}

func countFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// procStatusKiB reads a "kB" field of /proc/<pid>/status.
func procStatusKiB(t *testing.T, pid int, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for l := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(l, field+":"); ok {
			v, err := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// gcTrigger has the agent child return what memory it can to the OS.
type gcTrigger struct {
	t    *testing.T
	pid  int
	ack  string
	sent int
}

// settle runs debug.FreeOSMemory in the agent and returns its VmRSS after.
func (g *gcTrigger) settle() int64 {
	g.t.Helper()
	g.sent++
	if err := syscall.Kill(g.pid, syscall.SIGUSR1); err != nil {
		g.t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if b, _ := os.ReadFile(g.ack); string(b) == strconv.Itoa(g.sent) {
			return procStatusKiB(g.t, g.pid, "VmRSS")
		}
		if time.Now().After(deadline) {
			g.t.Fatal("the agent did not acknowledge debug.FreeOSMemory")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// freeOSMemoryOnSIGUSR1 is the agent child's side of gcTrigger.
func freeOSMemoryOnSIGUSR1(ack string) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGUSR1)
	go func() {
		for n := 1; ; n++ {
			<-ch
			debug.FreeOSMemory()
			_ = os.WriteFile(ack, []byte(strconv.Itoa(n)), 0o600)
		}
	}()
}

// metricValue scrapes one unlabelled sample.
func metricValue(t *testing.T, url, name string) float64 {
	t.Helper()
	v, err := scrapeMetric(url, name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func scrapeMetric(url, name string) (float64, error) {
	v, err := scrapeMetrics(url, name)
	if err != nil {
		return 0, err
	}
	return v[0], nil
}

// startTestChild runs this test binary as a child with env added; it is
// killed at the test's end if still running. Its stderr is returned.
func startTestChild(t *testing.T, name string, env []string) (*exec.Cmd, *lockedBuffer) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), env...)
	stderr := &lockedBuffer{}
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
		if t.Failed() && stderr.String() != "" {
			t.Logf("%s stderr:\n%s", name, stderr.String())
		}
	})
	return cmd, stderr
}

// stopTestChild sends SIGTERM and wants exit status 0.
func stopTestChild(t *testing.T, cmd *exec.Cmd, stderr *lockedBuffer) {
	t.Helper()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("agent exit: %v\n%s", err, stderr.String())
		}
	case <-time.After(40 * time.Second):
		t.Errorf("agent did not exit after SIGTERM")
	}
}

func waitDial(t *testing.T, path string, cmd *exec.Cmd) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no socket %s from pid %d", path, cmd.Process.Pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func waitHTTP(t *testing.T, url string, cmd *exec.Cmd, stderr *lockedBuffer) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never answered 200 (pid %d):\n%s", url, cmd.Process.Pid, stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() > 1<<20 {
		return len(p), nil // enough to say what went wrong
	}
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// serveIdleUpstream is the fake upstream child: it accepts a cleartext
// login with idlePassword, answers each simple Query with one row "1", and
// otherwise holds the connection until the peer closes it or SIGTERM.
func serveIdleUpstream(path string) int {
	ln, err := net.Listen("unix", path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "idle upstream:", err)
		return 1
	}
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM)
	go func() { <-ch; ln.Close() }()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return 0
			}
			fmt.Fprintln(os.Stderr, "idle upstream: accept:", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go func() {
			defer c.Close()
			if err := holdIdle(c); err != nil && !errors.Is(err, io.EOF) {
				fmt.Fprintln(os.Stderr, "idle upstream:", err)
			}
		}()
	}
}

func holdIdle(c net.Conn) error {
	code, _, err := faultpg.ReadPacket(c)
	for err == nil && (code == faultpg.SSLRequest || code == faultpg.GSSENCRequest) {
		if _, err = c.Write([]byte{'N'}); err == nil {
			code, _, err = faultpg.ReadPacket(c)
		}
	}
	if err != nil {
		return err
	}
	if code != 196608 {
		return fmt.Errorf("startup code %d", code)
	}
	if _, err := c.Write(faultpg.Message('R', []byte{0, 0, 0, 3})); err != nil {
		return err
	}
	r := bufio.NewReaderSize(c, 256)
	typ, msg, err := readMessage(r)
	if err != nil {
		return err
	}
	if typ != 'p' || string(msg) != idlePassword+"\x00" {
		_, _ = c.Write(faultpg.Message('E', []byte("SFATAL\x00C28P01\x00Mpassword authentication failed\x00\x00")))
		return fmt.Errorf("login: message %q, wrong password", typ)
	}
	var out []byte
	out = append(out, faultpg.Message('R', []byte{0, 0, 0, 0})...)
	for _, kv := range []string{"server_version\x0017.0", "client_encoding\x00UTF8", "standard_conforming_strings\x00on", "DateStyle\x00ISO, MDY", "integer_datetimes\x00on"} {
		out = append(out, faultpg.Message('S', []byte(kv+"\x00"))...)
	}
	out = append(out, faultpg.Message('K', []byte{0, 0, 0, 42, 1, 2, 3, 4})...)
	out = append(out, faultpg.Message('Z', []byte{'I'})...)
	if _, err := c.Write(out); err != nil {
		return err
	}
	// RowDescription for one int4 column, a row "1", CommandComplete, ReadyForQuery.
	rowDesc := []byte("?column?\x00")
	rowDesc = binary.BigEndian.AppendUint32(rowDesc, 0)
	rowDesc = binary.BigEndian.AppendUint16(rowDesc, 0)
	rowDesc = binary.BigEndian.AppendUint32(rowDesc, 23)
	rowDesc = binary.BigEndian.AppendUint16(rowDesc, 4)
	rowDesc = binary.BigEndian.AppendUint32(rowDesc, 0xffffffff)
	rowDesc = binary.BigEndian.AppendUint16(rowDesc, 0)
	var answer []byte
	answer = append(answer, faultpg.Message('T', []byte{0, 1}, rowDesc)...)
	answer = append(answer, faultpg.Message('D', []byte{0, 1, 0, 0, 0, 1, '1'})...)
	answer = append(answer, faultpg.Message('C', []byte("SELECT 1\x00"))...)
	answer = append(answer, faultpg.Message('Z', []byte{'I'})...)
	for {
		typ, _, err := readMessage(r)
		if err != nil {
			return err
		}
		switch typ {
		case 'Q':
			if _, err := c.Write(answer); err != nil {
				return err
			}
		case 'X':
			return nil
		default:
			return fmt.Errorf("unexpected message %q", typ)
		}
	}
}

func readMessage(r *bufio.Reader) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n < 4 || n > 1<<20 {
		return 0, nil, fmt.Errorf("message %q length %d", hdr[0], n)
	}
	body := make([]byte, n-4)
	_, err := io.ReadFull(r, body)
	return hdr[0], body, err
}
