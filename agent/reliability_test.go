package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgward/pgward/broker"
	"github.com/pgward/pgward/exporter"
	"github.com/pgward/pgward/testenv"
)

// FuzzStatStartTime: /proc/<pid>/stat as the kernel writes it, with any
// comm (spaces, parentheses, newlines) and any other fields, gives back the
// start time; arbitrary bytes never panic.
func FuzzStatStartTime(f *testing.F) {
	f.Add([]byte("psql"), uint64(123456), []byte("1234 (psql) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 98765 0 0\n"))
	f.Add([]byte("a) b (c"), uint64(1), []byte("1 (x) R"))
	f.Add([]byte(") 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9 9"), uint64(1<<63), []byte(")"))
	f.Add([]byte("tab\there\nnl"), uint64(0), []byte("9 (a) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 18446744073709551616"))
	f.Fuzz(func(t *testing.T, comm []byte, start uint64, raw []byte) {
		_, _ = StatStartTime(raw)
		if len(comm) > 64 || strings.ContainsRune(string(comm), 0) {
			return
		}
		// Fields 3..21, then starttime (22), then more.
		fields := []string{"S", "1", "2", "3", "0", "-1", "4194560", "100", "0", "0", "0", "0", "0", "0", "0", "20", "0", "1", "0"}
		line := fmt.Sprintf("4242 (%s) %s %d 12345 67890\n", comm, strings.Join(fields, " "), start)
		got, ok := StatStartTime([]byte(line))
		if !ok || got != start {
			t.Fatalf("comm %q start %d: got %d %v from %q", comm, start, got, ok, line)
		}
		// A truncated line (fields cut before starttime) is refused.
		cut := fmt.Sprintf("4242 (%s) %s", comm, strings.Join(fields[:18], " "))
		if v, ok := StatStartTime([]byte(cut)); ok {
			t.Fatalf("truncated stat %q parsed as %d", cut, v)
		}
	})
}

// rawSession logs in over a raw connection and returns it at ReadyForQuery.
func rawSession(t *testing.T, h *harness, params map[string]string) (net.Conn, *pgproto3.Frontend) {
	t.Helper()
	c := rawDial(t, h)
	fe := pgproto3.NewFrontend(c, c)
	p := map[string]string{"user": testenv.ScramUser, "database": "orders"}
	for k, v := range params {
		p[k] = v
	}
	fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber, Parameters: p})
	if err := fe.Flush(); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := fe.Receive()
		if err != nil {
			t.Fatalf("login: %v", err)
		}
		switch m := m.(type) {
		case *pgproto3.ErrorResponse:
			t.Fatalf("login refused: %s %s", m.Code, m.Message)
		case *pgproto3.ReadyForQuery:
			return c, fe
		}
	}
}

// waitUpstreamGone waits until no upstream backend has application_name app
// (with pgward's part after it: upstreams.<name>.application_name).
func waitUpstreamGone(t *testing.T, pg *testenv.Postgres, app string) {
	t.Helper()
	ctx := context.Background()
	admin, err := pg.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		if err := admin.QueryRow(ctx, "select count(*) from pg_stat_activity where application_name = $1 or starts_with(application_name, $1 || ' pgward:')", app).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d upstream sessions %q left", n, app)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func waitNoSessions(t *testing.T, h *harness) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for h.agent.Broker().ActiveSessions() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d sessions still active", h.agent.Broker().ActiveSessions())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A value holding a form feed (which the server's option splitter treats as
// whitespace) cannot smuggle a role change past pgward: found by
// FuzzParseOptions.
func TestOptionsFormFeedCannotSmuggleRole(t *testing.T) {
	h := newHarness(t, nil)
	for _, opts := range []string{
		"-c application_name=x\f-crole=postgres",
		"-c application_name=x\v--session_authorization=postgres",
	} {
		c := rawDial(t, h)
		fe := pgproto3.NewFrontend(c, c)
		fe.Send(&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber, Parameters: map[string]string{
			"user": testenv.ScramUser, "database": "orders", "options": opts}})
		if err := fe.Flush(); err != nil {
			t.Fatal(err)
		}
		m, err := fe.Receive()
		if err != nil {
			t.Fatal(err)
		}
		if e, ok := m.(*pgproto3.ErrorResponse); !ok || e.Code != broker.CodeInsufficientPriv {
			t.Fatalf("options %q: got %#v, want 42501", opts, m)
		}
	}
}

// A client that stops in the middle of a message: the session ends, the
// upstream backend goes, and nothing of the partial statement ran.
func TestClientStopsMidMessage(t *testing.T) {
	h := newHarness(t, nil)
	for _, tc := range []struct {
		name string
		send func(c net.Conn)
	}{
		{"inside an audited Query", func(c net.Conn) {
			b := []byte{'Q', 0, 0, 0x10, 0}
			c.Write(append(b, "insert into never_ran"...))
		}},
		{"inside a header", func(c net.Conn) { c.Write([]byte{'Q', 0, 0}) }},
		{"inside CopyData", func(c net.Conn) {
			c.Write(append([]byte{'d', 0, 1, 0, 0}, make([]byte, 100)...))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			app := fmt.Sprintf("midmsg-%d", time.Now().UnixNano())
			c, _ := rawSession(t, h, map[string]string{"application_name": app})
			tc.send(c)
			c.(*net.UnixConn).CloseWrite()
			// pgward closes its side too.
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.Copy(io.Discard, c); err != nil {
				t.Fatalf("client side not closed cleanly: %v", err)
			}
			waitUpstreamGone(t, h.pg, app)
			waitNoSessions(t, h)
		})
	}
	if strings.Contains(h.logs.String(), "never_ran") {
		t.Fatal("a partial statement was audited")
	}
	if n := strings.Count(h.logs.String(), `"level":"WARN","msg":"client closed the connection in the middle of a message"`); n != 3 {
		t.Fatalf("%d WARN lines for 3 clients that stopped mid-message", n)
	}
}

func raiseNoFile(t testing.TB, n uint64) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur >= n {
		return
	}
	old := lim
	if lim.Max < n && os.Geteuid() == 0 {
		lim.Max = n // root may raise the hard limit (up to fs.nr_open)
	}
	lim.Cur = min(n, lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("raise RLIMIT_NOFILE to %d: %v", lim.Cur, err)
	}
	if lim.Cur < n {
		testenv.SkipUnlessCI(t, "RLIMIT_NOFILE hard limit %d < %d", lim.Max, n)
	}
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
}

// TestSlowlorisClientProcess is the client side of
// TestSlowlorisClosedAtLoginTimeout, in a process of its own so that the
// client and server descriptors do not share one RLIMIT_NOFILE.
func TestSlowlorisClientProcess(t *testing.T) {
	spec := os.Getenv("PGWARD_SLOWLORIS")
	if spec == "" {
		return // not a test: the client process of TestSlowlorisClosedAtLoginTimeout, run by it with its variable set (a skip would fail make test under CI=true)
	}
	f := strings.Fields(spec)
	socket := f[0]
	n, err1 := strconv.Atoi(f[1])
	wait, err2 := time.ParseDuration(f[2])
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	raiseNoFile(t, uint64(n)+256)
	conns := make([]net.Conn, 0, n)
	start := time.Now()
	for range n {
		c, err := net.Dial("unix", socket)
		for try := 0; errors.Is(err, syscall.EAGAIN) && try < 200; try++ {
			time.Sleep(5 * time.Millisecond) // the accept backlog is full: let pgward catch up
			c, err = net.Dial("unix", socket)
		}
		if err != nil {
			t.Fatalf("dial %d: %v", len(conns), err)
		}
		c.Write(slowPacket[:1])
		conns = append(conns, c)
	}
	fmt.Printf("open %d %v\n", n, time.Since(start))
	os.Stdout.Sync()
	stop := make(chan struct{})
	trickled := make(chan struct{})
	go func() { // one more byte per connection every 200ms
		defer close(trickled)
		for i := 1; i < len(slowPacket); i++ {
			for _, c := range conns {
				c.SetWriteDeadline(time.Now().Add(time.Millisecond))
				c.Write(slowPacket[i : i+1])
			}
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	deadline := start.Add(wait)
	buf := make([]byte, 64)
	closed := 0
	var last time.Duration
	for _, c := range conns {
		c.SetReadDeadline(deadline)
		var err error
		for err == nil {
			_, err = c.Read(buf)
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			closed++
			last = time.Since(start)
		}
		c.Close()
	}
	close(stop)
	<-trickled
	fmt.Printf("closed %d %v\n", closed, last)
}

// slowPacket is a valid startup packet, sent one byte per 200ms.
var slowPacket = func() []byte {
	b, _ := (&pgproto3.StartupMessage{ProtocolVersion: pgproto3.ProtocolVersionNumber, Parameters: map[string]string{
		"user": testenv.ScramUser, "database": "orders", "application_name": strings.Repeat("slow", 50)}}).Encode(nil)
	return b
}()

// Slowloris: 10k connections trickle their startup packets; each is closed
// at listen.login_timeout (the deadline is fixed at accept, bytes do not
// extend it) while a legitimate client still logs in quickly.
func TestSlowlorisClosedAtLoginTimeout(t *testing.T) {
	const n = 10000
	// Long enough for a legitimate login on 2 loaded cores under -race,
	// short enough to keep the test bounded. Under -race on a quiet 2-core
	// machine that login took 2.8–3.1 s before the Observer seam (issue 15)
	// and 3.9–4.0 s after it, and a clean-clone CI run went over 5 s once:
	// the bound is 8 s, and the slower login is an open question in the
	// closing note, not settled here.
	const timeout = 8 * time.Second
	raiseNoFile(t, n+2048)
	h := newHarness(t, func(_ *harness, c *Config) {
		c.Listen.LoginTimeout = timeout
		c.Listen.MaxConnections = n + 100
		// The slow clients share the legitimate client's uid here: this
		// test is about login_timeout, not the per-uid share of login
		// slots (TestLoginSlotsPerUID), so the share covers them all.
		c.Limits.ConnectionsPerUID = n + 100
	})
	cmd := exec.Command(os.Args[0], "-test.run=^TestSlowlorisClientProcess$", "-test.v")
	cmd.Env = append(os.Environ(), fmt.Sprintf("PGWARD_SLOWLORIS=%s %d %s", h.agent.SocketPath(), n, timeout+30*time.Second))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	sc := bufio.NewScanner(out)
	var opened, closed int
	var closedAt string
	for sc.Scan() {
		line := sc.Text()
		if strings.Contains(line, "FAIL") || strings.Contains(line, "reliability_test.go") {
			t.Logf("client process: %s", line)
		}
		if strings.HasPrefix(line, "open ") {
			fmt.Sscan(strings.TrimPrefix(line, "open "), &opened)
			t.Logf("slow clients: %s", line)
			// The legitimate client, while they all hold on.
			t0 := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			c, err := pgx.Connect(ctx, h.dsn(testenv.ScramUser, "orders"))
			cancel()
			if err != nil {
				t.Errorf("legitimate client during slowloris: %v", err)
			} else {
				legit := time.Since(t0)
				c.Close(context.Background())
				// Bounded by the context: it logged in before login_timeout
				// released any slow connection's slot.
				t.Logf("legitimate login during slowloris took %v", legit)
			}
		}
		if strings.HasPrefix(line, "closed ") {
			fmt.Sscan(strings.TrimPrefix(line, "closed "), &closed, &closedAt)
			t.Logf("slow clients: %s", line)
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("client process: %v", err)
	}
	if opened != n || closed != n {
		t.Fatalf("%d slow connections opened, %d closed by pgward within login_timeout+30s", opened, closed)
	}
	if !strings.Contains(h.logs.String(), "login timeout: closed a connection") {
		t.Fatal("no WARN line for the timed-out logins")
	}
}

// 100k forged cancel keys (the right backend pid, random secrets) cancel
// nothing: the running query completes; wrong keys are logged at WARN and,
// past the per-uid budget, dropped unread.
func TestForgedCancelKeysCancelNothing(t *testing.T) {
	const n = 100000
	h := newHarness(t, func(_ *harness, c *Config) {
		c.Audit.Durability = exporter.DurabilityAsync // the test is about cancels, not the audit disk
	})
	c := h.connect(t, testenv.ScramUser, "orders")
	res := make(chan error, 1)
	go func() {
		_, err := c.Exec(context.Background(), "select pg_sleep(4)")
		res <- err
	}()
	time.Sleep(200 * time.Millisecond)
	pid := c.PgConn().PID()
	var wg sync.WaitGroup
	var sent atomic.Int64
	start := time.Now()
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 42))
			for i := w; i < n; i += 16 {
				if err := testenv.SendCancel("unix", h.agent.SocketPath(), pid, rng.Uint32()); err != nil {
					t.Error(err)
					return
				}
				sent.Add(1)
			}
		}()
	}
	wg.Wait()
	t.Logf("%d forged cancel requests in %v", sent.Load(), time.Since(start))
	if err := <-res; err != nil {
		t.Fatalf("the query was cancelled by a forged key: %v", err)
	}
	logs := h.logs.String()
	if !strings.Contains(logs, "cancel request with an unknown key") || !strings.Contains(logs, "too many wrong cancel keys") {
		t.Fatal("forged cancels not logged at WARN")
	}
	deadline := time.Now().Add(10 * time.Second)
	for scrapeCounter(t, h, "pgward_cancel_requests_total", `outcome="rejected"`) < n {
		if time.Now().After(deadline) {
			t.Fatalf("rejected cancels counted: %v, want %d", scrapeCounter(t, h, "pgward_cancel_requests_total", `outcome="rejected"`), n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
